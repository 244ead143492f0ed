"""Pruning: criteria against hand computations, the exact diagonal GGN against a dense GGN,
exact sparsity, schedules, masks through optimizer steps, structured pruning, reports, resume."""

from __future__ import annotations

import copy
import itertools
import math
from types import SimpleNamespace

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev

from ngexp.curvature.diagonal import diagonal_ggn
from ngexp.curvature.tasks import Classification, Reconstruction, Task
from ngexp.data.bundle import DataBundle, Split
from ngexp.data.spec import DataSpec
from ngexp.optim.ekfac import EKFAC
from ngexp.optim.kfac import KFAC
from ngexp.optim.muon import Muon
from ngexp.optim.natural_gradient import NaturalGradient
from ngexp.optim.shampoo import Shampoo
from ngexp.optim.soap import soap
from ngexp.optim.training import TrainingOptimizer
from ngexp.prune.criteria import saliencies, unit_scores
from ngexp.prune.masks import Masks, prunable_layers
from ngexp.prune.pruner import PruneConfig, Pruner
from ngexp.prune.report import output_positions, sparsity_report
from ngexp.prune.schedules import (
    cubic_sparsity,
    iterative_sparsities,
    locality_ladder,
    pruning_events,
)
from ngexp.prune.selection import layerwise_counts, select_global, select_layerwise


@pytest.fixture(autouse=True)
def _float64_one_thread():
    """Double precision, so that comparisons with dense references are tight; one thread, as
    these tensors are tiny and thread hand-offs would dominate on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    yield
    torch.set_default_dtype(torch.float32)
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- helpers
def conv_net(classes: int = 3) -> nn.Module:
    """(N, 1, 6, 6) -> (N, classes): conv (pad 1) -> conv (stride 2) -> linear -> linear."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(),
        nn.Conv2d(4, 6, 3, stride=2), nn.Tanh(), nn.Flatten(),
        nn.Linear(24, 10), nn.Tanh(), nn.Linear(10, classes))


def toy_data(n: int = 192, classes: int = 3) -> DataBundle:
    generator = torch.Generator().manual_seed(1)
    inputs = torch.rand(n, 1, 6, 6, generator=generator)
    targets = (inputs.flatten(1) @ torch.randn(36, classes, generator=generator)).argmax(1)
    split = Split(inputs, targets)
    return DataBundle(DataSpec("toy", (1, 6, 6), classes), split, split)


def fake_engine(model: nn.Module, optimizer: torch.optim.Optimizer | TrainingOptimizer, *,
                steps_per_epoch: int = 4, total_steps: int = 40,
                task: Task | None = None) -> SimpleNamespace:
    """The trainer attributes a pruner uses (ngexp.callbacks.Trainer)."""
    data = toy_data()
    task = task or Classification()
    if not isinstance(optimizer, TrainingOptimizer):
        optimizer = TrainingOptimizer(optimizer)
    engine = SimpleNamespace(model=model, optimizer=optimizer, task=task, data=data, step=0,
                             steps_per_epoch=steps_per_epoch, total_steps=total_steps,
                             generator=torch.Generator().manual_seed(0), logged=[],
                             console=SimpleNamespace(print=lambda *a, **k: None))

    def train_batches(num_examples: int, batch_size: int):
        for begin in range(0, min(num_examples, len(data.train)), batch_size):
            end = min(begin + batch_size, num_examples)
            yield data.train.inputs[begin:end], data.train.targets[begin:end]

    @torch.no_grad()
    def evaluate(split: str = "test") -> dict[str, float]:
        outputs = model(data.test.inputs)
        sums = task.metric_sums(outputs, data.test.targets)
        return {k: float(v) / len(data.test) for k, v in sums.items()}

    engine.train_batches = train_batches
    engine.evaluate = evaluate
    engine.log = lambda metrics: engine.logged.append((engine.step, dict(metrics)))
    return engine


def train(engine: SimpleNamespace, pruner: Pruner, steps: int, batch_size: int = 32) -> None:
    """The trainer's training step order (ngexp.train.trainer.Trainer.train_step)."""
    data = engine.data.train
    for _ in range(steps):
        pruner.on_step_start(engine)
        index = torch.randint(len(data), (batch_size,), generator=engine.generator)
        engine.optimizer.zero_grad()
        outputs = engine.model(data.inputs[index])
        loss = engine.task.loss(outputs, data.targets[index])
        engine.optimizer.backward(loss, outputs, data.targets[index])
        pruner.before_optimizer_step(engine)
        engine.optimizer.step()
        pruner.after_optimizer_step(engine)
        engine.step += 1


def dense_ggn_diagonal(model: nn.Module, task: Task, inputs: Tensor) -> dict[str, Tensor]:
    """diag((1/B) sum_n J_n^T H_n J_n) from full per-example Jacobians (torch.func.jacrev) and
    the dense output Hessian H_n built from ``task.hessian_vector_product``."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    names = list(params)
    sizes = [params[k].numel() for k in names]

    def output(flat: Tensor, x: Tensor) -> Tensor:
        pieces = dict(zip(names, [p.view_as(params[k]) for k, p in
                                  zip(names, flat.split(sizes), strict=True)], strict=True))
        return functional_call(model, pieces, (x[None],))[0]

    flat = torch.cat([p.flatten() for p in params.values()])
    ggn = torch.zeros(flat.numel(), flat.numel())
    for x in inputs:
        jac = jacrev(output)(flat, x)  # (C, P)
        out = output(flat, x)[None]
        eye = torch.eye(out.shape[-1])
        hessian = torch.stack([task.hessian_vector_product(out, e[None])[0] for e in eye])
        ggn += jac.T @ hessian @ jac
    diagonal = (ggn / len(inputs)).diagonal().split(sizes)
    return {k: d.view_as(params[k]) for k, d in zip(names, diagonal, strict=True)}


# ----------------------------------------------------------------------------- criteria
def test_unit_scores_match_the_formula_by_hand():
    w = torch.tensor([1.0, -2.0, 3.0, 0.5])
    g = torch.tensor([0.5, 1.0, -1.0, 2.0])
    d = torch.tensor([2.0, 1.0, 4.0, 8.0])
    # |-g w + d w^2 / 2| + 0.5 * 0.5 w^2, weight by weight
    expected = {
        "magnitude": [0.5 + 0.25, 2 + 1, 4.5 + 2.25, 0.125 + 0.0625],
        "taylor1": [0.5 + 0.25, 2 + 1, 3 + 2.25, 1 + 0.0625],
        "obd": [1 + 0.25, 2 + 1, 18 + 2.25, 1 + 0.0625],
        "qm": [0.5 + 0.25, 4 + 1, 21 + 2.25, 0 + 0.0625],
    }
    terms = {"magnitude": (None, torch.ones(4)), "taylor1": (g, None), "obd": (None, d),
             "qm": (g, d)}
    for name, (grad, curv) in terms.items():
        torch.testing.assert_close(unit_scores(w, grad, curv, 0.5, 4), torch.tensor(expected[name]))
    # two units of two weights: the changes add inside the absolute value
    torch.testing.assert_close(unit_scores(w, g, d, 0.5, 2),
                               torch.tensor([abs(0.5 + 4) + 1.25, abs(21 + 0) + 2.3125]))


@pytest.mark.parametrize("criterion", ["magnitude", "taylor1", "obd", "qm"])
def test_saliencies_of_a_softmax_regression_match_hand_derivation(criterion):
    """z = W x: grad_W = mean_n (p_n - y_n) x_n^T and
    diag GGN_W[i, j] = mean_n p_ni (1 - p_ni) x_nj^2."""
    torch.manual_seed(3)
    model = nn.Linear(5, 4, bias=False)
    inputs, targets = torch.randn(12, 5), torch.randint(0, 4, (12,))
    p = torch.softmax(model(inputs), -1).detach()
    y = nn.functional.one_hot(targets, 4).double()
    g = ((p - y).T @ inputs) / 12
    d = ((p * (1 - p)).T @ inputs.square()) / 12
    w = model.weight.detach()
    hand = {"magnitude": 0.5 * w**2, "taylor1": (g * w).abs(), "obd": 0.5 * d * w**2,
            "qm": (-g * w + 0.5 * d * w**2).abs()}[criterion] + 0.5 * 0.1 * w**2
    batches = [(inputs[:7], targets[:7]), (inputs[7:], targets[7:])]
    scores = saliencies(criterion, model, Classification(), batches, {"": model}, {"": 20},
                        penalty=0.1)
    torch.testing.assert_close(scores[""], hand.flatten())


def test_kfac_saliency_of_a_softmax_regression_matches_hand_derivation():
    """One Linear layer without bias, empirical Fisher, one batch: A = mean_n x x^T and
    G = mean_n (p - y)(p - y)^T, so diag(G (x) A)[i, j] = mean (p - y)_i^2 * mean x_j^2."""
    torch.manual_seed(3)
    model = nn.Linear(5, 4, bias=False)
    inputs, targets = torch.randn(12, 5), torch.randint(0, 4, (12,))
    residual = torch.softmax(model(inputs), -1).detach() - nn.functional.one_hot(targets, 4)
    d = residual.square().mean(0)[:, None] * inputs.square().mean(0)[None, :]
    w = model.weight.detach()
    scores = saliencies("kfac", model, Classification(), [(inputs, targets)], {"": model},
                        {"": 20}, fisher_type="empirical")
    torch.testing.assert_close(scores[""], (0.5 * d * w**2).flatten())


def test_ekfac_saliency_keeps_the_trace_of_the_empirical_fisher():
    """EKFAC rescales K-FAC's eigenbasis with per-example second moments, so the sum of its
    diagonal is trace(F) = mean_n ||(p_n - y_n) x_n^T||^2 exactly; OBD scores with |w| = 1.
    (In float32: the EKFAC code keeps its factors in float32.)"""
    torch.set_default_dtype(torch.float32)
    torch.manual_seed(3)
    model = nn.Linear(5, 4, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.randn(4, 5).sign())  # |w| = 1
    inputs, targets = torch.randn(12, 5), torch.randint(0, 4, (12,))
    residual = torch.softmax(model(inputs), -1).detach() - nn.functional.one_hot(targets, 4)
    trace = (residual.square().sum(1) * inputs.square().sum(1)).mean()
    scores = saliencies("ekfac", model, Classification(), [(inputs, targets)], {"": model},
                        {"": 20}, fisher_type="empirical")
    torch.testing.assert_close(2 * scores[""].sum(), trace, rtol=1e-5, atol=0)


def test_random_scores_are_reproducible_uniforms():
    layers = {"a": nn.Linear(3, 2), "b": nn.Linear(2, 2)}
    first = saliencies("random", nn.Sequential(), Classification(), [], layers, {"a": 6, "b": 4},
                       generator=torch.Generator().manual_seed(5))
    again = saliencies("random", nn.Sequential(), Classification(), [], layers, {"a": 6, "b": 4},
                       generator=torch.Generator().manual_seed(5))
    assert first["a"].shape == (6,) and bool((first["b"] >= 0).all() & (first["b"] < 1).all())
    torch.testing.assert_close(first, again)


# ----------------------------------------------------------------------------- diagonal GGN
@pytest.mark.parametrize("task", [Classification(), Reconstruction()])
def test_hessian_factor_reproduces_output_hessian(task):
    outputs = torch.randn(3, 5)
    blocks = list(task.hessian_factor(outputs, block=2))  # (k, B, C) each
    factor = torch.cat(blocks).permute(1, 2, 0)  # (B, C, K)
    dense = torch.stack([task.hessian_vector_product(outputs, e.expand(3, 5))
                         for e in torch.eye(5)], -1)
    torch.testing.assert_close(factor @ factor.transpose(1, 2), dense)


def ggn_models() -> dict[str, tuple[nn.Module, Task, Tensor]]:
    torch.manual_seed(4)
    images = torch.rand(6, 2, 5, 5)
    grouped = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding="same", padding_mode="reflect"), nn.BatchNorm2d(4), nn.Tanh(),
        nn.Conv2d(4, 4, 2, stride=2, dilation=1, groups=2), nn.Tanh(), nn.Flatten(),
        nn.Linear(16, 3))
    grouped[1].running_mean.normal_()
    shared = nn.Linear(4, 4)
    tied = nn.Sequential(nn.Flatten(), nn.Linear(50, 4), nn.Tanh(), shared, nn.Tanh(), shared)
    autoencoder = nn.Sequential(nn.Flatten(), nn.Linear(50, 3), nn.Tanh(), nn.Linear(3, 50))
    return {"conv": (grouped.eval(), Classification(), images),
            "shared_layer": (tied, Classification(), images),
            "bernoulli": (autoencoder, Reconstruction(), images)}


@pytest.mark.parametrize("case", ["conv", "shared_layer", "bernoulli"])
def test_exact_diagonal_ggn_matches_dense_ggn(case):
    model, task, inputs = ggn_models()[case]
    layers = prunable_layers(model)
    targets = inputs.flatten(1) if isinstance(task, Reconstruction) else torch.zeros(6).long()
    batches = [(inputs[:4], targets[:4]), (inputs[4:], targets[4:])]
    diagonal = diagonal_ggn(model, task, batches, layers)
    dense = dense_ggn_diagonal(model, task, inputs)
    assert set(diagonal) == {f"{name}.weight" for name in layers}
    for key, value in diagonal.items():
        torch.testing.assert_close(value.double(), dense[key], rtol=1e-5, atol=1e-8)


# ----------------------------------------------------------------------------- selection
@pytest.mark.parametrize("sparsity", [0.1, 0.5, 0.9, 0.987])
def test_global_and_layerwise_selection_hit_the_target_count_exactly(sparsity):
    torch.manual_seed(int(sparsity * 1000))
    sizes = [7, 130, 33, 1000]
    scores = [torch.rand(n) for n in sizes]
    alive = [torch.rand(n) > 0.05 for n in sizes]
    alive[0][:2] = False  # a small layer already pruned past a 10% share
    target = round(sparsity * sum(sizes))
    keep = select_global(scores, alive, target)
    assert sum(int((~k).sum()) for k in keep) == target
    assert all(bool((k <= a).all()) for k, a in zip(keep, alive, strict=True))  # stays pruned
    assert all(int(k.sum()) >= 1 for k in keep)  # no layer loses its last unit
    pruned = [int((~a).sum()) for a in alive]
    counts = layerwise_counts(sparsity, sizes, pruned)
    assert sum(counts) == target
    assert all(abs(c - sparsity * n) <= 1 or c in (p, n - 1)  # capped: kept >= 1, pruned stays
               for c, n, p in zip(counts, sizes, pruned, strict=True))
    keep = select_layerwise(scores, alive, counts)
    assert [int((~k).sum()) for k in keep] == counts


def test_global_selection_removes_the_lowest_scores():
    scores = [torch.tensor([0.3, 0.1, 0.9]), torch.tensor([0.2, 0.8])]
    alive = [torch.ones(3, dtype=torch.bool), torch.ones(2, dtype=torch.bool)]
    keep = select_global(scores, alive, 2)
    assert keep[0].tolist() == [True, False, True] and keep[1].tolist() == [False, True]


# ----------------------------------------------------------------------------- schedules
def test_locality_ladders():
    linear = locality_ladder(0.2, 0.9, 7, "linear")
    torch.testing.assert_close(torch.tensor(linear), torch.linspace(0.3, 0.9, 7))
    expo = locality_ladder(0.0, 0.98, 14, "exponential")
    remaining = [1.0] + [1 - s for s in expo]
    ratios = [b / a for a, b in itertools.pairwise(remaining)]
    assert math.isclose(expo[-1], 0.98) and all(math.isclose(r, 0.02 ** (1 / 14)) for r in ratios)


def test_cubic_and_iterative_schedules():
    assert cubic_sparsity(0, 0.0, 0.9, 0, 100) == 0.0
    assert math.isclose(cubic_sparsity(50, 0.0, 0.9, 0, 100), 0.9 - 0.9 * 0.5**3)
    assert math.isclose(cubic_sparsity(75, 0.1, 0.9, 50, 150), 0.9 - 0.8 * 0.75**3)
    assert cubic_sparsity(500, 0.0, 0.9, 0, 100) == 0.9
    rounds = iterative_sparsities(0.9, 0.2)
    assert len(rounds) == 11 and rounds[-1] == 0.9  # 0.8^10 = 0.107 > 0.1 >= 0.8^11
    assert math.isclose(rounds[2], 1 - 0.8**3)
    assert iterative_sparsities(0.36, 0.2) == pytest.approx([0.2, 0.36])
    events = pruning_events("oneshot", target=0.9, steps_per_epoch=10, total_steps=100,
                            finetune_epochs=3)
    assert events == {70: 0.9}
    events = pruning_events("iterative", target=0.36, steps_per_epoch=10, total_steps=100,
                            rate_per_round=0.2, round_epochs=2, start_epoch=1)
    assert list(events) == [10, 30]
    events = pruning_events("gradual", target=0.8, steps_per_epoch=10, total_steps=100,
                            finetune_epochs=2, start_step=20, frequency=25)
    assert list(events) == [20, 45, 70, 80] and events[80] == 0.8
    assert math.isclose(events[45], 0.8 - 0.8 * (1 - 25 / 60) ** 3)


# ----------------------------------------------------------------------------- pruner
def make_pruner(**settings) -> Pruner:
    return Pruner(**{"finetune_epochs": 5, **settings})


@pytest.mark.parametrize("scope", ["global", "layerwise"])
@pytest.mark.parametrize("criterion,steps,schedule", [
    ("magnitude", 1, "linear"), ("qm", 5, "exponential"), ("taylor1", 3, "linear"),
    ("random", 2, "exponential")])
def test_pruner_reaches_the_target_sparsity_exactly(scope, criterion, steps, schedule):
    model = conv_net()
    engine = fake_engine(model, torch.optim.SGD(model.parameters(), lr=0.05))
    pruner = make_pruner(criterion=criterion, scope=scope, target_sparsity=0.83, steps=steps,
                         step_schedule=schedule, num_examples=64, batch_size=32)
    train(engine, pruner, 21)
    total = sum(m.weight.numel() for m in prunable_layers(model).values())
    zeros = sum(int((m.weight == 0).sum()) for m in prunable_layers(model).values())
    assert zeros == round(0.83 * total)
    metrics = pruner.metrics(engine)
    assert metrics["prune/sparsity"] == round(0.83 * total) / total
    if scope == "layerwise":
        for name, layer in prunable_layers(model).items():
            assert abs(metrics[f"prune/{name}/sparsity"] * layer.weight.numel()
                       - 0.83 * layer.weight.numel()) < 1
    step, logged = engine.logged[0]
    assert step == 20
    assert {"prune/test_acc_after_prune", "prune/test_loss_after_prune"} <= set(logged)


def test_pruning_at_the_end_happens_before_the_final_evaluation():
    model = conv_net()
    engine = fake_engine(model, torch.optim.SGD(model.parameters(), lr=0.05), total_steps=8)
    pruner = make_pruner(target_sparsity=0.5, finetune_epochs=0)
    train(engine, pruner, 4)
    pruner.on_epoch_end(engine)
    assert pruner.sparsity() == 0.0
    train(engine, pruner, 4)
    pruner.on_epoch_end(engine)
    assert pruner.sparsity() == 261 / 522 and engine.logged[0][0] == 8


def test_locality_steps_rescore_the_masked_network():
    """With 4 steps the scores of step k see the weights pruned at step k-1: the resulting
    mask differs from one-shot pruning for a curvature-based criterion."""
    masks = {}
    for steps in (1, 4):
        model = conv_net()
        engine = fake_engine(model, torch.optim.SGD(model.parameters(), lr=0.0))
        pruner = make_pruner(criterion="obd", target_sparsity=0.9, steps=steps, finetune_epochs=10)
        pruner.prune(engine, 0.9)
        masks[steps] = torch.cat([m.flatten() for m in pruner.masks.tensors])
    assert masks[1].sum() == masks[4].sum() and not torch.equal(masks[1], masks[4])


def make_optimizer(name: str, model: nn.Module) -> TrainingOptimizer:
    """Optimizers with momentum and weight decay (coupled and decoupled); K-FAC and EKFAC
    precondition with dense per-layer matrices, which mix pruned and kept coordinates; the
    natural gradient solves on the unpruned coordinates only."""
    params = list(model.parameters())
    base = torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=0.1)
    if name == "natural_gradient":
        return TrainingOptimizer(base, NaturalGradient(model, cg_iters=10))
    if name in ("kfac", "ekfac"):
        return TrainingOptimizer(base, (KFAC if name == "kfac" else EKFAC)(
            model, damping=0.01, cov_update_freq=1, inv_update_freq=5, fisher_type="mc"))
    if name == "shampoo":
        return TrainingOptimizer(Shampoo(params, lr=0.01, weight_decay=0.1,
                                         precondition_frequency=5))
    if name == "soap":
        return TrainingOptimizer(soap(params, lr=0.01, weight_decay=0.1, precondition_frequency=5))
    if name == "muon":
        return TrainingOptimizer(Muon(model, lr=0.02, weight_decay=0.1, adam_lr=0.01,
                                      adam_weight_decay=0.1))
    if name == "sgd":
        return TrainingOptimizer(torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=0.1,
                                                 nesterov=True))
    if name == "rmsprop":
        return TrainingOptimizer(torch.optim.RMSprop(params, lr=0.01, momentum=0.9,
                                                     weight_decay=0.1))
    return TrainingOptimizer(getattr(torch.optim, {"adam": "Adam", "adamw": "AdamW"}[name])(
        params, lr=0.01, weight_decay=0.1))


@pytest.mark.parametrize("name", ["sgd", "rmsprop", "adam", "adamw", "kfac", "ekfac",
                                  "natural_gradient", "shampoo", "soap", "muon"])
def test_pruned_weights_stay_exactly_zero_through_training(name):
    if name in ("kfac", "ekfac"):
        torch.set_default_dtype(torch.float32)  # their curvature is kept in float32
    model = conv_net()
    engine = fake_engine(model, make_optimizer(name, model), total_steps=60)
    pruner = make_pruner(criterion="magnitude", target_sparsity=0.7, finetune_epochs=14)
    train(engine, pruner, 5)  # momentum / second moments build up before the event at step 4
    before = copy.deepcopy(model.state_dict())
    train(engine, pruner, 55)
    for key, mask in pruner.masks.state_dict().items():
        weight = dict(model.named_parameters())[key]
        assert bool((weight[~mask] == 0).all()), key
        assert not torch.equal(weight[mask], before[key][mask])  # the rest still trains
        if name in ("kfac", "ekfac", "shampoo", "soap"):  # they mix coordinates (SOAP's second
            continue  # moment lives in the eigenbasis): only the re-mask holds pruned weights
        # masked gradients + state reset at the event: no moment of a pruned weight is non-zero
        moments = [v for v in engine.optimizer.optimizer.state[weight].values()
                   if isinstance(v, Tensor) and v.shape == weight.shape]
        assert moments and all(bool((v[~mask] == 0).all()) for v in moments), key
    assert pruner.sparsity() == round(0.7 * 522) / 522


def test_structured_pruning_removes_whole_filters_and_neurons():
    model = conv_net()
    engine = fake_engine(model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9))
    pruner = make_pruner(criterion="taylor1", structure="filter", target_sparsity=0.5,
                         keep_last_dense=True, num_examples=64)
    train(engine, pruner, 30)
    layers = prunable_layers(model, keep_last_dense=True)
    removed = 0
    for name, layer in layers.items():
        per_unit = layer.weight.flatten(1)
        dead = (per_unit == 0).all(1)
        assert bool(((per_unit != 0).all(1) | dead).all())  # a unit is all or nothing
        assert bool((layer.bias[dead] == 0).all())
        removed += int(dead.sum())
        assert pruner.metrics(engine)[f"prune/{name}/channels"] == int((~dead).sum())
    assert removed == round(0.5 * (4 + 6 + 10))
    assert pruner.metrics(engine)["prune/channel_sparsity"] == removed / 20


def test_sparsity_report_counts_flops_by_hand():
    model = conv_net()
    masks = Masks(prunable_layers(model))
    positions = output_positions(model, torch.rand(1, 1, 6, 6))
    assert positions == {"0": 36, "2": 4, "5": 1, "7": 1}
    dense = 2 * (36 * 36 + 216 * 4 + 240 + 30)
    assert sparsity_report(model, masks, positions)["prune/flops"] == dense
    masks.set_alive("0", torch.arange(36) < 6)  # keep 6 of the first conv's 36 weights
    report = sparsity_report(model, masks, positions)
    assert report["prune/flops"] == dense - 2 * 30 * 36 and report["prune/flops_dense"] == dense
    assert report["prune/0/sparsity"] == 30 / 36 and report["prune/sparsity"] == 30 / 522
    assert report["prune/nonzero_params"] == sum(p.numel() for p in model.parameters()) - 30


def test_masks_survive_a_state_dict_round_trip_and_resume():
    model = conv_net()
    engine = fake_engine(model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9))
    pruner = make_pruner(criterion="obd", target_sparsity=0.6, num_examples=64)
    train(engine, pruner, 25)
    state = copy.deepcopy(pruner.state_dict())
    # resume: a fresh model (pruned weights not zero) and pruner; load before first use
    resumed_model = conv_net()
    resumed = fake_engine(resumed_model, torch.optim.Adam(resumed_model.parameters(), lr=0.01))
    resumed.step = 20  # resumed at the event's step: the event must see it is done
    fresh = make_pruner(criterion="obd", target_sparsity=0.6, num_examples=64)
    fresh.load_state_dict(state)
    train(resumed, fresh, 10)
    assert resumed.logged == []  # the event was not repeated
    for key, mask in state["masks"].items():
        assert torch.equal(fresh.masks.state_dict()[key], mask)
        assert bool((dict(resumed_model.named_parameters())[key][~mask] == 0).all())


def test_bad_settings_fail_with_one_line():
    with pytest.raises(ValueError, match=r"prune.criterion='l1' is invalid: expected one of "
                                         r"magnitude, taylor1, obd, qm, kfac, ekfac, random"):
        PruneConfig(criterion="l1")
    with pytest.raises(ValueError, match=r"prune.target_sparsity=1.0 is invalid"):
        PruneConfig(target_sparsity=1.0)
    model = conv_net()
    engine = fake_engine(model, torch.optim.SGD(model.parameters(), lr=0.1), total_steps=36)
    pruner = Pruner(schedule="iterative", target_sparsity=0.9, round_epochs=1)
    with pytest.raises(Exception, match="the last pruning event is at step 40"):
        pruner.on_train_start(engine)
