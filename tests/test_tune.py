"""Tuning with any Hydra sweeper: the objective a run returns, the validation of a sampler's
search space, and a 3-trial Optuna sweep from the command line."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ngexp.cli import validate_overrides
from ngexp.errors import OptionError
from ngexp.train.objective import objective_value
from tests.helpers import REPO, ngexp, read_summary, requires_fashion_mnist, run_dirs

try:
    import hydra_plugins.hydra_optuna_sweeper  # noqa: F401

    HAVE_OPTUNA = True
except ImportError:
    HAVE_OPTUNA = False
requires_optuna = pytest.mark.skipif(not HAVE_OPTUNA,
                                     reason="hydra-optuna-sweeper not installed (ngexp[tune])")
TINY = ("data=synthetic", "trainer.max_steps=3", "trainer.epochs=1", "trainer.progress=none",
        "logger=[]")

SUMMARY = {"status": "completed", "final": {"train/loss": 0.9, "test/loss": 0.7, "test/acc": 0.8},
           "best": {"test/loss": 0.6, "test/acc": 0.85}}


@pytest.mark.parametrize(("objective", "at", "mode", "expected"), [
    ("test/loss", "final", "auto", 0.7), ("test/acc", "best", "auto", 0.85),
    ("train/loss", "final", "max", 0.9), (None, "final", "auto", 0.8),  # the selection metric
    ("val/loss", "final", "auto", math.inf),  # never recorded: the worst value
    ("test/acc", "best", "min", 0.85), ("train/loss", "best", "auto", math.inf)])
def test_objective_is_the_named_metric_or_the_worst_value(objective, at, mode, expected) -> None:
    assert objective_value(SUMMARY, objective, at, mode) == expected


def test_a_failed_run_returns_the_worst_value_for_its_direction() -> None:
    failed = {**SUMMARY, "status": "failed"}
    assert objective_value(failed, "test/loss", "final", "auto") == math.inf
    assert objective_value(failed, "test/acc", "final", "auto") == -math.inf
    assert objective_value(None, "test/acc", "best", "min") == math.inf
    nan = {**SUMMARY, "final": {"test/loss": math.nan}}
    assert objective_value(nan, "test/loss", "final", "auto") == math.inf


@pytest.mark.parametrize(("overrides", "message"), [
    (["optimizer.lr=interval(-1,0.1)"], "optimizer.lr=-1.0 is invalid"),
    (["optimizer.lr=interval(0.2,0.1)"], "lower end must be below"),
    (["optimizer.lr=tag(log, interval(0,0.1))"], "log-scale interval needs a lower end > 0"),
    (["trainer.batch_size=interval(32,256)"], "use int(interval(...))"),
    (["optimizer=choice(sgd,nope)"], "nope"),
    (["optimizer.momentum=range(0,3)"], "optimizer.momentum=1.0 is invalid"),
])
def test_search_spaces_are_validated(overrides: list[str], message: str) -> None:
    with pytest.raises(Exception, match=re.escape(message)):
        validate_overrides(["objective=test/loss", *overrides])


@pytest.mark.parametrize(("sweeper", "direction"), [
    ({"direction": "maximize"}, "maximize"), ({"direction": ["minimize"]}, ["minimize"]),
    ({"optim": {"maximize": True}}, "maximize"), ({"optim": {"maximize": False}}, "minimize"),
    ({"ax_config": {"experiment": {"minimize": True}}}, "minimize"),
    ({"params": None}, None)])
def test_the_direction_of_optuna_nevergrad_and_ax(sweeper: dict, direction) -> None:
    from omegaconf import OmegaConf

    from ngexp.cli import sweeper_direction

    assert sweeper_direction(OmegaConf.create(sweeper)) == direction


def test_valid_search_spaces_pass() -> None:
    validate_overrides(["optimizer.lr=tag(log, interval(1e-4,1e-1))",
                        "trainer.batch_size=tag(log, int(interval(32,256)))",
                        "optimizer=choice(sgd,adam)", "seed=range(0,3)", "objective=val/loss"])


@requires_optuna
def test_an_optimizing_sweeper_needs_a_named_objective_of_its_direction() -> None:
    with pytest.raises(OptionError, match="objective=None is invalid"):
        validate_overrides(["hydra/sweeper=optuna", "optimizer.lr=interval(0.01,0.1)"])
    with pytest.raises(OptionError, match="direction='minimize' is invalid: expected maximize for "
                                          "objective=test/acc"):
        validate_overrides(["hydra/sweeper=optuna", "objective=test/acc"])
    validate_overrides(["hydra/sweeper=optuna", "objective=test/acc",
                        "hydra.sweeper.direction=maximize"])


@requires_optuna
def test_three_trial_optuna_sweep_records_the_best_trial(tmp_path: Path) -> None:
    """TPE over a log-scale interval; each trial returns its final test loss."""
    result = ngexp("train", "-m", "hydra/sweeper=optuna", "hydra.sweeper.n_trials=3",
                   "hydra.sweeper.sampler.seed=0", "objective=test/loss",
                   "optimizer.lr=tag(log, interval(0.001,0.3))", *TINY,
                   f"output_root={tmp_path}", timeout=600)
    runs = run_dirs(tmp_path)
    assert len(runs) == 3
    losses = {read_summary(r)["final"]["test/loss"]: r for r in runs}
    [results] = list((tmp_path / "sweeps").glob("*/optimization_results.yaml"))
    best = yaml.safe_load(results.read_text())
    assert best["best_value"] == min(losses)
    lr = yaml.safe_load((losses[min(losses)] / "config.yaml").read_text())["optimizer"]["lr"]
    assert best["best_params"]["optimizer.lr"] == lr
    assert "Best value" in result.stdout + result.stderr


@pytest.mark.slow
@requires_optuna
def test_a_diverged_trial_is_the_worst_not_the_end_of_the_sweep(tmp_path: Path) -> None:
    ngexp("train", "-m", "hydra/sweeper=optuna", "hydra/sweeper/sampler=grid",
          "hydra.sweeper.n_trials=2", "objective=train/loss", "optimizer.lr=choice(0.05,1e30)",
          *TINY, f"output_root={tmp_path}", timeout=600)
    statuses = sorted(read_summary(r)["status"] for r in run_dirs(tmp_path))
    assert statuses == ["completed", "failed"]
    [results] = list((tmp_path / "sweeps").glob("*/optimization_results.yaml"))
    assert yaml.safe_load(results.read_text())["best_params"]["optimizer.lr"] == 0.05


@pytest.mark.slow
@requires_fashion_mnist
@requires_optuna
def test_frontier_study_driver_at_a_tiny_budget(tmp_path: Path) -> None:
    """scripts/frontier_study.py end to end: 1 trial per optimizer, 2 seeds, 256 images."""
    result = subprocess.run(
        [sys.executable, "scripts/frontier_study.py", "autoencoder", "--trials", "1",
         "--subset", "256", "--epochs", "1", "--seeds", "0,1", "--optimizers", "adam,muon",
         "--out", str(tmp_path), "--output-root", str(tmp_path / "runs")],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
        capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    text = (tmp_path / "frontier_autoencoder.md").read_text()
    assert "| adam | `optimizer.lr=tag(log" in text and "| muon | `optimizer.lr=" in text
    assert "## Time to target" in text and "| adam | completed | 2/2 |" in text
    with (tmp_path / "frontier_autoencoder" / "target.csv").open() as stream:
        assert len(stream.read().splitlines()) == 1 + 4  # header, 2 optimizers x 2 seeds


def test_a_skipped_finished_run_returns_the_objective_in_its_summary(tmp_path: Path) -> None:
    """A re-run sweep skips finished runs (train returns no summary): the objective is read
    from the run directory."""
    from omegaconf import OmegaConf

    from ngexp.cli import run_objective

    (tmp_path / "summary.json").write_text(json.dumps(SUMMARY))
    cfg = OmegaConf.create({"objective": "test/loss", "objective_at": "best",
                            "objective_mode": "auto"})
    assert run_objective(cfg, None, tmp_path) == 0.6
    assert run_objective(cfg, None, tmp_path / "missing") == math.inf
