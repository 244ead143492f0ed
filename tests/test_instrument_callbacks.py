"""The instruments as training callbacks (ngexp/instruments/callbacks.py): ``dynamics/`` records
of CLI runs on real Fashion-MNIST checked against their definitions, training unchanged by them
(bit-identical weights), resume keeping the probe set and the running averages, pruning at the
end restoring the weights, and one-line errors."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import nn

from ngexp.cli import main
from ngexp.data.bundle import Split
from ngexp.instruments.callbacks import FilterSparsity, GradientNoise, TangentAlignment
from ngexp.instruments.tangent import probe_indices
from tests.helpers import (
    InterruptAfter,
    build_trainer,
    compose,
    read_metrics,
    read_summary,
    requires_fashion_mnist,
    run_dirs,
)

#: 1000 examples, batch 128: 7 steps per epoch; 20 steps end in epoch 3 (evaluations 7, 14, 20).
SMALL = ["model=lenet5", "data.subset=1000", "trainer.max_steps=20", "trainer.device=cpu",
         "trainer.progress=none", "logger=[]"]
ALL = ["callbacks=[tangent_alignment,filter_sparsity,gradient_noise]",
       "callbacks.tangent_alignment.probe_size=64", "callbacks.filter_sparsity.probe_size=64"]


def train(root: Path, capsys: pytest.CaptureFixture, *extra: str) -> tuple[int, str]:
    rc = main(["train", *SMALL, *extra, f"output_root={root}"])
    return rc, capsys.readouterr().err


def dynamics(records: list[dict[str, Any]], prefix: str) -> dict[int, dict[str, float]]:
    """Step -> the ``dynamics/<prefix>`` scalars logged at that step (one record per step)."""
    found: dict[int, dict[str, float]] = {}
    for record in records:
        values = {k.removeprefix("dynamics/"): v for k, v in record.items()
                  if k.startswith(f"dynamics/{prefix}")}
        if values:
            found.setdefault(record["step"], {}).update(values)
    return found


# ---------------------------------------------------------------------------- from the CLI
@requires_fashion_mnist
def test_instruments_log_dynamics_from_the_cli(tmp_path: Path,
                                               capsys: pytest.CaptureFixture) -> None:
    rc, err = train(tmp_path, capsys, *ALL, "callbacks.gradient_noise.every_n_steps=5",
                    "callbacks.filter_sparsity.prune_at_end=true")
    assert rc == 0, err
    [run] = run_dirs(tmp_path)
    records, summary = read_metrics(run), read_summary(run)

    tangent = dynamics(records, "tangent/")
    assert sorted(tangent) == [0, 7, 14, 20]  # initialization, then each evaluation
    layers = ["features.0", "features.3", "classifier.0", "classifier.2", "classifier.4"]
    for values in tangent.values():
        for prefix in ["tangent/", *(f"tangent/{layer}/" for layer in layers)]:
            assert -1 <= values[f"{prefix}cka"] <= 1
            assert 1 <= values[f"{prefix}participation_ratio"] <= values[
                f"{prefix}effective_rank"] <= 64
            assert 0 < values[f"{prefix}top10_mass"] <= 1
        assert values["tangent/seconds"] > 0
    assert tangent[20]["tangent/cka"] > tangent[0]["tangent/cka"]  # training aligns

    filters = dynamics(records, "filters/")
    assert sorted(filters) == [0, 7, 14, 20]
    for values in filters.values():
        for key in ("activation", "either", "features.0/activation", "features.3/either"):
            assert 0 <= values[f"filters/{key}"] <= 1
        assert values["filters/scale"] == 0 and "filters/features.0/scale" not in values  # no BN
        # 6 and 16 filters: the total is their weighted mean
        mean = (6 * values["filters/features.0/either"]
                + 16 * values["filters/features.3/either"]) / 22
        assert values["filters/either"] == pytest.approx(mean)
        assert 0 <= values["filters/dead_flops_fraction"] <= 1
    assert filters[0]["filters/either"] == 0  # nothing dead at initialization
    end = filters[20]
    assert end["filters/test_acc_before_prune"] == summary["final"]["test/acc"]
    assert 0 <= end["filters/test_acc_after_prune"] <= 1
    assert end["filters/pruned_fraction"] == end["filters/either"]
    assert end["filters/pruned_flops_fraction"] == pytest.approx(end["filters/dead_flops_fraction"])

    grads = dynamics(records, "grad/")
    assert sorted(grads) == [5, 10, 15, 20]
    traces, squares = [], []
    for values in grads.values():
        assert values["grad/norm_q10"] <= values["grad/norm_q50"] <= values["grad/norm_q90"]
        assert values["grad/trace_sigma"] > 0
        assert values["grad/b_simple"] == pytest.approx(values["grad/trace_sigma"]
                                                        / values["grad/grad_sq"])
        traces.append(values["grad/trace_sigma"])
        squares.append(values["grad/grad_sq"])
        # plain running means (decay 1) and B_simple of the means
        assert values["grad/trace_sigma_avg"] == pytest.approx(sum(traces) / len(traces))
        assert values["grad/grad_sq_avg"] == pytest.approx(sum(squares) / len(squares))
        assert values["grad/b_simple_avg"] == pytest.approx(sum(traces) / sum(squares))
        assert values["grad/b_simple_avg"] > 0
        per_layer = sum(values[f"grad/{layer}/trace_sigma"] for layer in layers)
        assert per_layer == pytest.approx(values["grad/trace_sigma"])  # disjoint coordinates
        assert values["grad/excluded_params"] == 0


# ---------------------------------------------------------------------------- training unchanged
def final_weights(root: Path) -> dict[str, torch.Tensor]:
    [run] = run_dirs(root)
    return torch.load(run / "checkpoints" / "last.pt", weights_only=True)["model"]


def train_losses(root: Path) -> list[float]:
    [run] = run_dirs(root)
    return [r["train/loss"] for r in read_metrics(run) if "train/loss" in r]


@requires_fashion_mnist
@pytest.mark.parametrize(("optimizer", "callbacks"), [
    ("sgd", [*ALL, "callbacks.tangent_alignment.every_n_steps=3",
             "callbacks.filter_sparsity.every_n_steps=3",
             "callbacks.filter_sparsity.prune_at_end=true",
             "callbacks.gradient_noise.every_n_steps=1"]),
    ("kfac", ["callbacks=[gradient_noise]", "callbacks.gradient_noise.every_n_steps=1"]),
])
def test_instruments_do_not_change_training(tmp_path: Path, capsys: pytest.CaptureFixture,
                                            optimizer: str, callbacks: list[str]) -> None:
    common = (f"optimizer={optimizer}", "trainer.max_steps=12", "trainer.log_every=2")
    assert train(tmp_path / "plain", capsys, *common)[0] == 0
    assert train(tmp_path / "measured", capsys, *common, *callbacks)[0] == 0
    plain, measured = final_weights(tmp_path / "plain"), final_weights(tmp_path / "measured")
    assert plain.keys() == measured.keys()
    for name, weight in plain.items():
        assert torch.equal(weight, measured[name]), name
    assert train_losses(tmp_path / "plain") == train_losses(tmp_path / "measured")


# ---------------------------------------------------------------------------- resume
@requires_fashion_mnist
def test_resume_keeps_the_probe_set_and_the_running_averages(tmp_path: Path) -> None:
    from ngexp.train.session import run_session
    from ngexp.train.stop import RunInterrupted

    overrides = [*SMALL, *ALL, "callbacks.tangent_alignment.every_n_steps=5",
                 "callbacks.tangent_alignment.probe_size=32", "seed=3",
                 "callbacks.gradient_noise.every_n_steps=1", "callbacks.gradient_noise.decay=0.5"]
    choices = {"model": "lenet5"}
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    for folder in (reference, resumed):
        folder.mkdir()
    run_session(build_trainer(compose(*overrides, f"output_root={reference}"), choices,
                              reference))
    trainer = build_trainer(compose(*overrides, f"output_root={resumed}"), choices, resumed)
    trainer.callbacks.append(InterruptAfter(10))
    with pytest.raises(RunInterrupted):
        run_session(trainer)
    state = torch.load(resumed / "checkpoints" / "last.pt", weights_only=True)["callbacks"]
    assert state["tangent_alignment"]["measured_step"] == 5  # step 10 not measured yet
    assert state["gradient_noise"]["pending"]  # step 10's gradient noise not logged yet
    run_session(build_trainer(compose(*overrides, f"output_root={resumed}"), choices, resumed))

    def measured(folder: Path) -> list[tuple[int, dict[str, float]]]:
        return [(r["step"], {k: v for k, v in r.items() if k.startswith("dynamics/")
                             and "seconds" not in k}) for r in read_metrics(folder)
                if any(k.startswith("dynamics/") for k in r)]

    assert measured(resumed) == measured(reference)
    final = {name: torch.load(folder / "checkpoints" / "last.pt", weights_only=True)["callbacks"]
             for name, folder in (("reference", reference), ("resumed", resumed))}
    for name in ("tangent_alignment", "filter_sparsity"):
        index = final["resumed"][name]["probe_index"]
        assert torch.equal(index, final["reference"][name]["probe_index"])
        assert len(index) == 32 if name == "tangent_alignment" else len(index) == 64
    assert final["resumed"]["gradient_noise"]["sums"] == pytest.approx(
        final["reference"]["gradient_noise"]["sums"], rel=1e-12)
    grads = dynamics(read_metrics(resumed), "grad/")
    assert sorted(grads) == list(range(1, 21))
    ema_trace = ema_weight = 0.0  # decay 0.5: sums S <- 0.5 S + x, weights W <- 0.5 W + 1
    ema_square = 0.0
    for step in range(1, 21):
        values = grads[step]
        ema_trace = 0.5 * ema_trace + values["grad/trace_sigma"]
        ema_square = 0.5 * ema_square + values["grad/grad_sq"]
        ema_weight = 0.5 * ema_weight + 1
        assert values["grad/trace_sigma_avg"] == pytest.approx(ema_trace / ema_weight)
        assert values["grad/b_simple_avg"] == pytest.approx(ema_trace / ema_square)


# ---------------------------------------------------------------------------- units
def fake_trainer(model: nn.Module, split: Split, seed: int = 0) -> Any:
    """What the callbacks use of a trainer; ``logged`` collects ``log`` calls; ``evaluate``
    returns the accuracy of ``model`` on ``split``."""

    def evaluate(name: str = "test") -> dict[str, float]:
        with torch.no_grad():
            return {"acc": float((model(split.inputs).argmax(1) == split.targets).double().mean())}

    trainer = SimpleNamespace(model=model, data=SimpleNamespace(train=split), step=0,
                              generator=torch.Generator().manual_seed(seed), logged=[],
                              evaluate=evaluate)
    trainer.log = lambda metrics: trainer.logged.append((trainer.step, dict(metrics)))
    return trainer


def bn_cnn() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([1.0, 0.0, 0.5, -1e-4]))  # filters 1 and 3 scale-dead
        model[1].bias.copy_(torch.tensor([0.1, 0.2, -5.0, 0.3]))  # filter 2 dead after the ReLU
    return model.eval()


def test_filter_sparsity_measures_and_prunes_at_the_end_with_weights_restored() -> None:
    model = bn_cnn()
    split = Split(torch.randn(40, 1, 6, 6), torch.arange(40) % 3)
    trainer = fake_trainer(model, split)
    callback = FilterSparsity(probe_size=12, prune_at_end=True, prune_criterion="scale")
    callback.on_train_start(trainer)
    [(step, values)] = trainer.logged
    assert step == 0
    assert values["dynamics/filters/scale"] == 0.5
    assert values["dynamics/filters/activation"] == 0.25
    assert values["dynamics/filters/either"] == 0.75
    # 2 * 9 weights * 36 positions per filter; the Linear layer has 2 * 12 FLOPs
    assert values["dynamics/filters/dead_flops"] == 3 * 648
    assert values["dynamics/filters/dead_flops_fraction"] == pytest.approx(1944 / (4 * 648 + 24))
    before = {name: p.detach().clone() for name, p in model.state_dict().items()}
    masked = bn_cnn()
    with torch.no_grad():
        masked[0].weight[[1, 3]] = 0
        masked[0].bias[[1, 3]] = 0
    expected_after = fake_trainer(masked, split).evaluate()["acc"]
    trainer.step = 5
    callback.on_train_end(trainer)  # step 5 is not due (every_n_steps=0): the pruning only
    [(step, values)] = trainer.logged[1:]
    assert step == 5
    assert values["dynamics/filters/test_acc_before_prune"] == trainer.evaluate()["acc"]
    assert values["dynamics/filters/test_acc_after_prune"] == expected_after
    assert values["dynamics/filters/pruned_fraction"] == 0.5
    assert values["dynamics/filters/pruned_flops_fraction"] == pytest.approx(1296 / 2616)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name


def test_probe_is_drawn_from_the_seed_once_and_kept_in_the_state() -> None:
    split = Split(torch.randn(60, 1, 4, 4), torch.arange(60) % 3)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    first = TangentAlignment(probe_size=9)
    first.on_train_start(fake_trainer(model, split, seed=4))
    assert torch.equal(first.probe_index, probe_indices(split.targets, 9, seed=4))
    assert split.targets[first.probe_index].bincount().tolist() == [3, 3, 3]  # stratified
    again = TangentAlignment(probe_size=9)
    again.load_state_dict(first.state_dict())
    trainer = fake_trainer(model, split, seed=5)  # another seed: the saved probe is kept
    trainer.step = first.measured_step
    again.on_train_start(trainer)
    assert torch.equal(again.probe_index, first.probe_index) and trainer.logged == []


def test_gradient_noise_every_evaluation_measures_the_step_after_it() -> None:
    """``every_n_steps=0``: the first step and the step after each evaluation are armed."""
    callback = GradientNoise(every_n_steps=0)
    trainer = fake_trainer(nn.Linear(2, 2), Split(torch.zeros(4, 2), torch.zeros(4)))
    callback.on_train_start(trainer)
    armed = []
    for step in range(6):
        trainer.step = step
        callback.on_step_start(trainer)
        armed.append(callback.armed)
        callback.armed = False
        if step == 2:
            callback.on_evaluation(trainer, {})
    callback.on_train_end(trainer)
    assert armed == [True, False, False, True, False, False]


# ---------------------------------------------------------------------------- errors
@pytest.mark.parametrize(("overrides", "expected"), [
    (["callbacks=[tangent_alignment]", "callbacks.tangent_alignment.every_n_steps=-1"],
     "every_n_steps=-1 is invalid: expected an integer >= 0"),
    (["callbacks=[gradient_noise]", "callbacks.gradient_noise.decay=1.5"],
     "decay=1.5 is invalid: expected a number in (0, 1]"),
    (["callbacks=[filter_sparsity]", "callbacks.filter_sparsity.prune_criterion=dead"],
     "prune_criterion='dead' is invalid: expected one of scale, activation, either"),
])
def test_bad_options_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture,
                                  overrides: list[str], expected: str) -> None:
    rc, err = train(tmp_path, capsys, *overrides)
    assert rc == 2 and expected in err and len(err.strip().splitlines()) == 1
    assert not tmp_path.exists() or not list(tmp_path.rglob("*.jsonl"))


@requires_fashion_mnist
@pytest.mark.parametrize(("overrides", "expected"), [
    (["callbacks=[tangent_alignment]", "callbacks.tangent_alignment.probe_size=5000"],
     "callbacks.tangent_alignment.probe_size=5000 exceeds the 1000 training examples"),
    (["model=mlp", "callbacks=[filter_sparsity]"],
     "callbacks=[filter_sparsity] needs a model with Conv2d layers; MLP has none"),
])
def test_impossible_measurements_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture,
                                              overrides: list[str], expected: str) -> None:
    rc, err = train(tmp_path, capsys, *overrides)
    assert rc == 2 and expected in err and len(err.strip().splitlines()) == 1
