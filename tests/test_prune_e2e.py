"""End to end: ``ngexp train prune=...`` as a subprocess on real Fashion-MNIST."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.helpers import (
    REPO,
    THREADS,
    compose,
    ngexp,
    read_metrics,
    read_summary,
    requires_fashion_mnist,
    run_dirs,
)

SHORT = ("data.subset=2000", "model=lenet300_100", "trainer.progress=plain",
         "trainer.log_every=5")
#: Weights of LeNet-300-100's three Linear layers.
WEIGHTS = 784 * 300 + 300 * 100 + 100 * 10


def pruned_fraction(masks: dict[str, torch.Tensor]) -> float:
    return sum(int((~m).sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())


@pytest.mark.parametrize("preset", ["magnitude", "taylor1", "obd", "qm", "kfac", "ekfac",
                                    "random", "gradual", "iterative", "filter"])
def test_presets_compose_and_build(preset: str) -> None:
    from hydra.utils import instantiate

    from ngexp.config import validate

    cfg = compose(f"prune={preset}")
    validate(cfg)
    pruner = instantiate(cfg.prune, _partial_=True)()
    assert pruner.name == "pruner" and pruner.settings.criterion == cfg.prune.criterion


def test_bad_prune_value_fails_with_one_line() -> None:
    result = ngexp("train", "prune=magnitude", "prune.scope=blockwise", check=False)
    assert result.returncode != 0
    assert "prune.scope='blockwise' is invalid: expected one of global, layerwise" in result.stderr
    assert "Traceback" not in result.stderr


@requires_fashion_mnist
def test_prune_after_init_from_reaches_target_and_fine_tunes(tmp_path: Path) -> None:
    ngexp("train", *SHORT, "trainer.epochs=2", f"output_root={tmp_path / 'dense'}")
    [dense] = run_dirs(tmp_path / "dense")
    ngexp("train", *SHORT, "trainer.epochs=1", f"init_from={dense}", "prune=qm",
          "prune.target_sparsity=0.9", "prune.steps=3", "prune.finetune_epochs=1",
          "prune.num_examples=500", f"output_root={tmp_path / 'pruned'}")
    [run] = run_dirs(tmp_path / "pruned")
    summary = read_summary(run)
    assert summary["status"] == "completed" and summary["choices"]["prune"] == "qm"
    target = round(0.9 * WEIGHTS) / WEIGHTS
    assert summary["final"]["prune/sparsity"] == pytest.approx(target, abs=1e-12)
    assert summary["final"]["prune/nonzero_params"] == 266610 - round(0.9 * WEIGHTS)
    [event] = [r for r in read_metrics(run) if "prune/test_acc_after_prune" in r]
    assert event["step"] == 0 and event["prune/test_acc_after_prune"] > 0.3
    assert summary["final"]["test/acc"] > 0.7
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=False)
    masks = state["callbacks"]["pruner"]["masks"]
    assert pruned_fraction(masks) == pytest.approx(target, abs=1e-12)
    for key, mask in masks.items():
        assert bool((state["model"][key][~mask] == 0).all()), key


@requires_fashion_mnist
def test_interrupted_pruned_run_resumes_with_its_masks(tmp_path: Path) -> None:
    args = ["train", *SHORT, "trainer.epochs=8", "prune=magnitude", "prune.finetune_epochs=7",
            "prune.target_sparsity=0.95", "optimizer=adam", f"output_root={tmp_path}"]
    process = subprocess.Popen([sys.executable, "-m", "ngexp", *args], cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin",
                                    "OMP_NUM_THREADS": THREADS})
    deadline = time.time() + 180
    while time.time() < deadline:  # wait for the event (step 15) and a few steps after it
        found = list(tmp_path.rglob("metrics.jsonl"))
        lines = found[0].read_text().splitlines() if found else []
        if any(json.loads(line)["step"] >= 25 for line in lines[:-1]):  # last may be partial
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    process.communicate(timeout=60)
    [run] = run_dirs(tmp_path)
    summary = read_summary(run)
    assert summary["status"] == "interrupted" and 15 < summary["step"] < 120
    saved = torch.load(run / "checkpoints" / "last.pt", weights_only=False)
    masks = saved["callbacks"]["pruner"]["masks"]
    assert pruned_fraction(masks) == pytest.approx(round(0.95 * WEIGHTS) / WEIGHTS, abs=1e-12)

    resumed = ngexp(*args)
    assert f"resuming from step {summary['step']}" in resumed.stdout
    assert read_summary(run)["status"] == "completed"
    final = torch.load(run / "checkpoints" / "last.pt", weights_only=False)
    for key, mask in masks.items():
        assert torch.equal(final["callbacks"]["pruner"]["masks"][key], mask), key
        assert bool((final["model"][key][~mask] == 0).all()), key
    events = [r for r in read_metrics(run) if "prune/test_acc_after_prune" in r]
    assert [r["step"] for r in events] == [15]  # not pruned again after the resume


def test_laurent2020_experiment_composes_every_sweep_job() -> None:
    from ngexp.config import validate

    cfg = compose("+experiment=prune_laurent2020", "prune=qm", "prune.steps=14")
    validate(cfg)
    assert cfg.model.widths == [300, 100] and cfg.trainer.epochs == cfg.prune.finetune_epochs
    assert cfg.prune.criterion == "qm" and cfg.prune.steps == 14
    assert cfg.prune.step_schedule == "exponential"
