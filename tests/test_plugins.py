"""The example plugin (``examples/ngexp_example``, installed by ``make setup``) through ngexp's
front door: each extension point on the command line, checked against hand computations, its
options in ``--help``, its errors as one line, its runs resumed bit for bit, and configs that
name code no one registered refused before anything runs."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

pytest.importorskip("ngexp_example")

from ngexp_example.lion import Lion  # noqa: E402
from ngexp_example.relative_kfac import RelativeKFAC  # noqa: E402

from ngexp.cli import main  # noqa: E402
from ngexp.curvature.tasks import build_task  # noqa: E402
from ngexp.optim.build import build_optimizer  # noqa: E402
from ngexp.prune.criteria import saliencies  # noqa: E402
from tests.helpers import (  # noqa: E402
    TIMINGS,
    compose,
    read_metrics,
    read_summary,
    requires_fashion_mnist,
    run_dirs,
)
from tests.test_resume import assert_identical, final_checkpoint  # noqa: E402
from tests.test_tune import HAVE_OPTUNA  # noqa: E402

#: A short in-process run on the CPU.
QUICK = ("trainer.device=cpu", "trainer.progress=none", "trainer.batch_size=64")


@pytest.fixture(scope="module")
def npz_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2000 training and 500 test images of real Fashion-MNIST as ``train.npz``/``test.npz``
    (uint8 ``x (N, 28, 28)``, integer ``y (N,)``)."""
    from ngexp.data.images import load_image_splits

    folder = tmp_path_factory.mktemp("npz")
    train, test = load_image_splits("fashion_mnist", None, False)
    for name, split, count in (("train", train, 2000), ("test", test, 500)):
        pixels = (split.inputs[:count, 0] * 255).round().to(torch.uint8).numpy()
        np.savez(folder / f"{name}.npz", x=pixels, y=split.targets[:count].numpy())
    return folder


def train(*overrides: str) -> None:
    assert main(["train", *QUICK, *overrides]) == 0


def one_line_error(capsys: pytest.CaptureFixture[str], *overrides: str) -> str:
    """The stderr of a ``ngexp train`` that must exit 2 with one line."""
    capsys.readouterr()
    assert main(["train", *QUICK, *overrides]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ngexp: error: ") and "\n" not in err, err
    return err


# --------------------------------------------------------------------------- discovery
def test_help_lists_every_plugin_option(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--help"]) == 0
    lines = {line.split(":")[0].strip(): line for line in capsys.readouterr().out.splitlines()
             if line.startswith("  ") and ":" in line}
    expected = {"data": ["npz_folder"], "model": ["resmlp"],
                "optimizer": ["kfac_relative", "lion", "lion_fast"], "logger": ["ndjson"],
                "callbacks": ["weight_norms"]}
    for group, names in expected.items():
        listed = lines[group].split(":", 1)[1].replace("*", "").replace(",", " ").split()
        assert set(names) <= set(listed), (group, listed)


# --------------------------------------------------------------------------- optimizer
def test_lion_preset_steps_as_computed_by_hand() -> None:
    """``optimizer=lion_fast`` (the plugin's preset: lr 3e-4, weight decay 0.1) built as ngexp
    builds it; two steps on a 4-vector against Algorithm 2 of Chen et al. (2023), with a second
    gradient whose sign differs from the interpolation's in coordinate 0."""
    cfg = compose("optimizer=lion_fast")
    model = nn.Linear(4, 1, bias=False)
    start = [1.0, -2.0, 0.5, 0.0]
    with torch.no_grad():
        model.weight.copy_(torch.tensor([start]))
    optimizer = build_optimizer(cfg.optimizer, model, build_task("classification")).optimizer
    assert isinstance(optimizer, Lion)
    lr, wd, (beta1, beta2) = 3e-4, 0.1, (0.9, 0.99)
    group = optimizer.param_groups[0]
    assert (group["lr"], group["weight_decay"], group["betas"]) == (lr, wd, (beta1, beta2))
    gradients = [[1.0, -1.0, 2.0, 0.0], [-0.05, -1.0, -1.0, 3.0]]
    theta, m = list(start), [0.0] * 4
    for gradient in gradients:
        model.weight.grad = torch.tensor([gradient])
        optimizer.step()
        for i, g in enumerate(gradient):
            c = beta1 * m[i] + (1 - beta1) * g
            theta[i] = theta[i] * (1 - lr * wd) - lr * ((c > 0) - (c < 0))
            m[i] = beta2 * m[i] + (1 - beta2) * g
    assert (beta1 * 0.01 * 1.0 + 0.1 * -0.05) > 0  # coordinate 0 steps against its gradient
    torch.testing.assert_close(model.weight[0], torch.tensor(theta), rtol=0, atol=1e-7)
    torch.testing.assert_close(optimizer.state[model.weight]["exp_avg"][0], torch.tensor(m),
                               rtol=1e-6, atol=1e-9)


# --------------------------------------------------------------------------- preconditioner
def test_relative_kfac_direction_is_the_dense_damped_solve() -> None:
    """One step on a Linear(3 -> 2) with bias: the preconditioned gradient equals ``(G + d_G
    I)^-1 M (A + d_A I)^-1`` with ``d_A = sqrt(damping) tr(A)/4`` and ``d_G = sqrt(damping)
    tr(G)/2`` (pi-corrected relative damping), solved densely in float64."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2))
    damping = 0.3
    pre = RelativeKFAC(model, damping=damping, fisher_type="empirical", cov_update_freq=1,
                       inv_update_freq=1, kl_clip=None)
    inputs, targets = torch.randn(8, 3), torch.randint(2, (8,))
    F.cross_entropy(model(inputs), targets).backward()
    layer = model[0]
    gradient = torch.cat([layer.weight.grad, layer.bias.grad[:, None]], 1).double()
    pre.step()
    curvature = pre.curvature()["0"]
    a, g = curvature["A"][0].double(), curvature["G"][0].double()
    d_a, d_g = math.sqrt(damping) * a.trace() / 4, math.sqrt(damping) * g.trace() / 2
    expected = torch.linalg.solve(g + d_g * torch.eye(2, dtype=torch.float64),
                                  gradient) @ torch.linalg.inv(a + d_a * torch.eye(4,
                                                                                   dtype=torch.float64))
    got = torch.cat([layer.weight.grad, layer.bias.grad[:, None]], 1).double()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
    plain = torch.linalg.solve(g + math.sqrt(damping) * torch.eye(2, dtype=torch.float64),
                               gradient)  # absolute damping differs: the rule took effect
    assert not torch.allclose(got, plain @ torch.linalg.inv(a + math.sqrt(damping) * torch.eye(
        4, dtype=torch.float64)), rtol=1e-2)


# --------------------------------------------------------------------------- pruning criterion
def test_synflow_scores_are_the_dense_synaptic_flow() -> None:
    """``R = 1^T |W2| (|W1| 1 + |b1|) + 1^T |b2|`` for Linear(3 -> 4) -> ReLU -> Linear(4 -> 2)
    (all terms >= 0, so the ReLU passes everything): ``|W1| * (1^T |W2|)^T 1^T`` and ``|W2| *
    1 h^T``, ``h = |W1| 1 + |b1|``; filter units sum their rows; the penalty adds
    ``lambda/2 ||w_u||^2``."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).eval()
    w1, b1, w2 = (p.detach().double().abs() for p in (model[0].weight, model[0].bias,
                                                      model[2].weight))
    hidden = w1.sum(1) + b1
    dense = {"0": w1 * w2.sum(0)[:, None], "2": w2 * hidden[None, :]}
    layers = {"0": model[0], "2": model[2]}
    before = [p.clone() for p in model.parameters()]
    scores = saliencies("synflow", model, build_task("classification"), [], layers,
                        {"0": 12, "2": 8}, generator=None)
    for name in layers:
        torch.testing.assert_close(scores[name], dense[name].flatten(), rtol=1e-12, atol=0)
    filters = saliencies("synflow", model, build_task("classification"), [], layers,
                         {"0": 4, "2": 2}, penalty=0.5, generator=None)
    for name, layer in layers.items():
        penalty = 0.25 * layer.weight.detach().double().square().sum(1)
        torch.testing.assert_close(filters[name], dense[name].sum(1) + penalty, rtol=1e-12,
                                   atol=0)
    assert all(torch.equal(p, q) for p, q in zip(before, model.parameters(), strict=True))


# --------------------------------------------------------------------------- command line
@requires_fashion_mnist
def test_plugin_run_trains_and_reports(tmp_path: Path, npz_folder: Path) -> None:
    """``data=npz_folder model=resmlp optimizer=lion_fast callbacks=[weight_norms]
    logger=[ndjson]`` on real Fashion-MNIST: above chance, the callback's norms are those of
    the final weights (and of the start, by their ratio), the logger's file holds exactly the
    records of ``metrics.jsonl``."""
    train("data=npz_folder", f"data.path={npz_folder}", "model=resmlp", "model.width=64",
          "optimizer=lion_fast", "optimizer.lr=1e-3", "callbacks=[weight_norms]",
          "logger=[ndjson]", "trainer.max_steps=60", "trainer.eval_every=30",
          "trainer.log_every=20", f"output_root={tmp_path}")
    [run] = run_dirs(tmp_path)
    assert run.relative_to(tmp_path).parts[0] == "npz_folder-resmlp-lion_fast"
    summary = read_summary(run)
    assert summary["status"] == "completed" and summary["final"]["test/acc"] > 0.6  # chance 0.1
    weights = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["model"]
    layers = ["stem", "blocks.0.branch.1", "blocks.0.branch.3", "blocks.1.branch.1",
              "blocks.1.branch.3", "head.1"]
    records = read_metrics(run)
    evaluations = [r for r in records if "dynamics/weight_norm/stem" in r]
    assert [r["step"] for r in evaluations] == [30, 60]
    for layer in layers:
        norm = weights[f"{layer}.weight"].double().norm().item()
        assert evaluations[-1][f"dynamics/weight_norm/{layer}"] == pytest.approx(norm, rel=1e-12)
        ratio = evaluations[-1][f"dynamics/weight_ratio/{layer}"]
        assert 0.5 < ratio < 2 and ratio != 1.0
        assert summary["final"][f"dynamics/weight_norm/{layer}"] == pytest.approx(norm)
    events = [json.loads(line) for line in (run / "events.ndjson").read_text().splitlines()]
    assert [e["event"] for e in (events[0], events[-1])] == ["start", "finish"]
    assert events[0]["hparams"]["optimizer.weight_decay"] == 0.1
    assert events[0]["hparams"]["optimizer.lr"] == 1e-3 and events[-1]["status"] == "completed"
    logged = [e for e in events if e["event"] == "metrics"]
    assert [(e["step"], e["metrics"]) for e in logged] == [
        (r["step"], {k: v for k, v in r.items() if k not in ("step", "epoch", "time")})
        for r in records]


@requires_fashion_mnist
def test_relative_kfac_with_synflow_pruning_from_the_command_line(tmp_path: Path,
                                                                  npz_folder: Path) -> None:
    """``optimizer=kfac_relative`` trains the resmlp, ``prune.criterion=synflow`` prunes it
    gradually to half its weights (events at steps 10 and 20, 3 exponential locality steps
    each), and the pruned run still learns."""
    train("data=npz_folder", f"data.path={npz_folder}", "data.val_size=200", "model=resmlp",
          "model.width=32", "optimizer=kfac_relative", "optimizer.damping=10", "prune=gradual",
          "prune.criterion=synflow", "prune.target_sparsity=0.5", "prune.steps=3",
          "prune.step_schedule=exponential", "prune.start_step=10", "prune.end_step=20",
          "prune.frequency=10", "trainer.max_steps=30", "logger=[]", f"output_root={tmp_path}")
    [run] = run_dirs(tmp_path)
    summary = read_summary(run)
    assert summary["final"]["prune/sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert summary["final"]["test/acc"] > 0.5 and summary["final"]["val/acc"] > 0.5
    weights = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["model"]
    zeros = sum(int((weights[f"{n}.weight"] == 0).sum()) for n in ("stem", "head.1"))
    assert zeros > 0
    assert [r["optim/damping"] for r in read_metrics(run) if "optim/damping" in r][0] == 10


# --------------------------------------------------------------------------- errors
def test_bad_plugin_values_are_one_line_errors(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    root = f"output_root={tmp_path / 'runs'}"
    assert "optimizer.betas=[0.9, 1.0] is invalid: expected two numbers in [0, 1)" in \
        one_line_error(capsys, "optimizer=lion", "optimizer.betas=[0.9,1.0]", root)
    assert "optimizer.lr=-0.1 is invalid" in one_line_error(capsys, "optimizer=lion_fast",
                                                            "optimizer.lr=-0.1", root)
    assert "model.width=0 is invalid" in one_line_error(capsys, "model=resmlp", "model.width=0",
                                                        root)
    assert "optimizer.damping_mode='eigen' is invalid" in one_line_error(
        capsys, "optimizer=kfac_relative", "optimizer.damping_mode=eigen", root)
    assert "is not a folder" in one_line_error(capsys, "data=npz_folder",
                                               f"data.path={tmp_path / 'nowhere'}", root)
    assert not (tmp_path / "runs").exists()


def test_untrusted_targets_are_refused_before_anything_runs(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``model._target_=builtins.print`` on the command line, and an ``+experiment`` file of
    one's own naming an unregistered callable: one line, no run directory."""
    root = f"output_root={tmp_path / 'runs'}"
    error = one_line_error(capsys, "model._target_=builtins.print", root)
    assert "model._target_='builtins.print' is not a trusted target" in error
    error = one_line_error(capsys, "model=resmlp", "model._target_=ngexp.models.mlp.MLP", root)
    assert "cannot replace ngexp_example.resmlp.ResMLP" in error and "model=mlp" in error
    (tmp_path / "conf" / "experiment").mkdir(parents=True)
    (tmp_path / "conf" / "experiment" / "evil.yaml").write_text(
        "# @package _global_\noptimizer:\n  _target_: subprocess.call\n")
    error = one_line_error(capsys, "+experiment=evil", f"hydra.searchpath=[file://{tmp_path}/conf]",
                           root)
    assert "optimizer._target_='subprocess.call' is not a trusted target" in error
    error = one_line_error(capsys, "hydra.launcher._target_=os.system", root)
    assert "hydra.launcher._target_='os.system' is not one of Hydra's launchers" in error
    error = one_line_error(capsys, "--config-dir", str(tmp_path / "conf"), "+experiment=evil",
                           root)
    assert "optimizer._target_='subprocess.call' is not a trusted target" in error
    assert not (tmp_path / "runs").exists()
    # a saved config (a run's .hydra/config.yaml, edited) given as the whole config
    assert main(["train", "--cfg", "job", root]) == 0
    saved = capsys.readouterr().out.replace("_target_: ngexp.models.mlp.MLP",
                                            "_target_: builtins.exec")
    (tmp_path / "saved.yaml").write_text(saved)
    error = one_line_error(capsys, "-cp", str(tmp_path), "-cn", "saved")
    assert "model._target_='builtins.exec' is not a trusted target" in error
    assert sorted(path.name for path in tmp_path.iterdir()) == ["conf", "saved.yaml"]


# --------------------------------------------------------------------------- resume
def events_without_time(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """``(step, metrics)`` of the ``metrics`` events of ``events.ndjson``, timings left out."""
    events = [json.loads(line) for line in path.read_text().splitlines()]
    return [(e["step"], {k: v for k, v in e["metrics"].items() if k not in TIMINGS})
            for e in events if e["event"] == "metrics"]


@pytest.mark.parametrize("overrides", [
    ("optimizer=lion", "optimizer.lr=1e-3", "callbacks=[weight_norms]", "logger=[ndjson]",
     "trainer.eval_every=4"),
    ("optimizer=kfac_relative", "optimizer.cov_update_freq=4", "optimizer.inv_update_freq=8",
     "prune=gradual", "prune.criterion=synflow", "prune.start_step=4", "prune.end_step=20",
     "prune.frequency=6"),
], ids=["lion+weight_norms+ndjson", "kfac_relative+synflow"])
def test_plugin_run_resumes_bit_identically(tmp_path: Path, overrides: tuple[str, ...]) -> None:
    """Stopped after 9 of 24 steps (the trainer's SIGTERM path) and resumed: every tensor of the
    final checkpoint (weights, Lion's momentum or K-FAC's factors and inverses, the callback's
    initial norms, the masks) equals the uninterrupted run's, and so do the logger's events."""
    reference = final_checkpoint(tmp_path / "reference", overrides)
    resumed = final_checkpoint(tmp_path / "resumed", overrides, 9)
    assert_identical(resumed, reference)
    if "logger=[ndjson]" in overrides:
        assert reference["callbacks"]["weight_norms"]["initial"]
        expected = events_without_time(tmp_path / "reference" / "events.ndjson")
        assert len(expected) > 6 and any("dynamics/weight_ratio/layers.0" in metrics
                                         for _, metrics in expected)
        assert events_without_time(tmp_path / "resumed" / "events.ndjson") == expected


@pytest.mark.skipif(not HAVE_OPTUNA, reason="hydra-optuna-sweeper not installed (ngexp[tune])")
def test_a_plugin_optimizer_is_tuned_and_judged_against_a_built_in(tmp_path: Path) -> None:
    """A 2-trial Optuna sweep of Lion's lr beside SGD, then ``ngexp report --target-from sgd``:
    the best trial is the lowest final loss of the sweep's runs, and the report's time to the
    target has a row for every run of both optimizers."""
    tiny = ("data=synthetic", "trainer.max_steps=6", "trainer.epochs=1", "logger=[]",
            "objective=train/loss", "trainer.log_every=2", f"output_root={tmp_path}")
    assert main(["train", "-m", "hydra/sweeper=optuna", "hydra.sweeper.n_trials=2",
                 "hydra.sweeper.sampler.seed=0", "optimizer=lion",
                 "optimizer.lr=tag(log, interval(1e-4,1e-2))", *QUICK, *tiny]) == 0
    assert main(["train", "optimizer=sgd", *QUICK, *tiny]) == 0
    lion = [r for r in run_dirs(tmp_path) if "lion" in r.parts[-3]]
    assert len(lion) == 2 and all(read_summary(r)["status"] == "completed" for r in lion)
    [results] = list((tmp_path / "sweeps").glob("*/optimization_results.yaml"))
    best = yaml.safe_load(results.read_text())
    assert best["best_value"] == min(read_summary(r)["final"]["train/loss"] for r in lion)
    out = tmp_path / "report"
    assert main(["report", str(tmp_path), "--by", "optimizer", "--metric", "train/loss",
                 "--target-from", "sgd", "--out", str(out)]) == 0
    with (out / "target.csv").open() as stream:
        rows = list(csv.DictReader(stream))
    assert sorted(row["optimizer"] for row in rows) == ["lion", "lion", "sgd"]
