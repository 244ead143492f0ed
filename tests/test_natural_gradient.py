"""Natural gradient by CG against dense curvature matrices built with torch.func on tiny nets."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from omegaconf import OmegaConf
from torch import Tensor, nn
from torch.func import functional_call, hessian, jacrev, vmap

from ngexp.curvature.choices import KRONECKER_FISHER_TYPES, PRODUCT_FISHER_TYPES, FisherType
from ngexp.curvature.linalg import conjugate_gradient
from ngexp.curvature.products import (
    CurvatureProduct,
    curvature_mode,
    empirical_output_product,
    flatten,
    ggn_output_product,
)
from ngexp.curvature.tasks import Classification, Reconstruction, Task
from ngexp.optim import natural_gradient
from ngexp.optim.build import build_optimizer
from ngexp.optim.natural_gradient import NaturalGradient
from tests.helpers import compose
from tests.preconditioning import sgd

DAMPING = 0.05


def classifier(norm: bool = False, dropout: float = 0.0) -> nn.Module:
    layers = [nn.Linear(4, 6), *([nn.BatchNorm1d(6)] if norm else []), nn.Tanh(),
              *([nn.Dropout(dropout)] if dropout else []), nn.Linear(6, 3)]
    return nn.Sequential(*layers).double()


def autoencoder() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 3), nn.Sigmoid(), nn.Linear(3, 5)).double()


def problem(kind: str, seed: int = 0, batch: int = 8) -> tuple[nn.Module, Task, Tensor, Tensor]:
    """A tiny model with one batch of (inputs, targets) in float64."""
    torch.manual_seed(seed)
    if kind == "classification":
        inputs = torch.randn(batch, 4, dtype=torch.float64)
        return classifier(), Classification(), inputs, torch.randint(0, 3, (batch,))
    inputs = torch.rand(batch, 5, dtype=torch.float64)
    return autoencoder(), Reconstruction(), inputs, inputs


def params_of(model: nn.Module) -> dict[str, Tensor]:
    return {name: p.detach() for name, p in model.named_parameters()}


def jacobian(model: nn.Module, inputs: Tensor) -> Tensor:
    """Dense J (B * outputs, P) of the model outputs w.r.t. all parameters."""
    params = params_of(model)
    blocks = jacrev(lambda p: functional_call(model, p, (inputs,)))(params)
    out_numel = model(inputs).numel()
    return torch.cat([blocks[name].reshape(out_numel, -1) for name in params], dim=1)


def dense_ggn(model: nn.Module, task: Task, inputs: Tensor, targets: Tensor) -> Tensor:
    """J^T (d^2 loss / d outputs^2) J with the output Hessian from autograd, not from the task."""
    outputs = model(inputs).detach()
    h = hessian(lambda z: task.loss(z, targets))(outputs).reshape(outputs.numel(), -1)
    j = jacobian(model, inputs)
    return j.T @ h @ j


def dense_empirical_fisher(model: nn.Module, task: Task, inputs: Tensor, targets: Tensor) -> Tensor:
    """(1/B) sum_b g_b g_b^T with per-example gradients g_b from vmap(grad)."""
    params = params_of(model)

    def example_loss(p: dict[str, Tensor], x: Tensor, t: Tensor) -> Tensor:
        return task.loss(functional_call(model, p, (x[None],)), t[None])

    grads = vmap(torch.func.grad(example_loss), in_dims=(None, 0, 0))(params, inputs, targets)
    g = torch.cat([grads[name].reshape(len(inputs), -1) for name in params], dim=1)
    return g.T @ g / len(inputs)


def batch_gradient(model: nn.Module, task: Task, inputs: Tensor, targets: Tensor) -> Tensor:
    model.zero_grad()
    task.loss(model(inputs), targets).backward()
    return flatten([p.grad for p in model.parameters()])


Pair = tuple[NaturalGradient, torch.optim.Optimizer]


def ng_step(pair: Pair, model: nn.Module, task: Task, inputs: Tensor, targets: Tensor) -> Tensor:
    """One step of the plain loop (``loss.backward()`` is all the natural gradient needs);
    returns the loss before it."""
    pre, opt = pair
    opt.zero_grad()
    loss = task.loss(model(inputs), targets)
    loss.backward()
    pre.step()
    opt.step()
    return loss.detach()


def exact_optimizer(model: nn.Module, task: Task, lr: float = 1.0, momentum: float = 0.0,
                    weight_decay: float = 0.0, **kwargs) -> Pair:
    """CG run to convergence (three times as many iterations as parameters, no tolerance),
    no KL clipping unless asked for; plain SGD steps the direction."""
    size = sum(p.numel() for p in model.parameters())
    kwargs.setdefault("kl_clip", None)
    pre = NaturalGradient(model, task=task, damping=DAMPING, cg_iters=3 * size, cg_tol=0.0,
                          **kwargs)
    return pre, sgd(model, lr, momentum, weight_decay)


def relative_error(actual: Tensor, expected: Tensor) -> float:
    return float((actual - expected).norm() / expected.norm())


@pytest.mark.parametrize("kind", ["classification", "reconstruction"])
def test_ggn_vector_product_matches_dense(kind: str) -> None:
    model, task, inputs, targets = problem(kind)
    dense = dense_ggn(model, task, inputs, targets)
    product = CurvatureProduct(model, dict(model.named_parameters()), (inputs,),
                               ggn_output_product(task))
    vectors = torch.randn(3, dense.shape[0], dtype=torch.float64)
    for v in vectors:
        assert relative_error(product(v), dense @ v) < 1e-10


@pytest.mark.parametrize("kind", ["classification", "reconstruction"])
def test_empirical_fisher_product_matches_per_example_gradients(kind: str) -> None:
    model, task, inputs, targets = problem(kind)
    dense = dense_empirical_fisher(model, task, inputs, targets)
    outputs = model(inputs)
    output_grad, = torch.autograd.grad(task.loss(outputs, targets), outputs)
    product = CurvatureProduct(model, dict(model.named_parameters()), (inputs,),
                               empirical_output_product(output_grad * len(inputs)))
    v = torch.randn(dense.shape[0], dtype=torch.float64)
    assert relative_error(product(v), dense @ v) < 1e-10


@pytest.mark.parametrize("kind", ["classification", "reconstruction"])
@pytest.mark.parametrize("curvature, fisher_type", [("fisher", "exact"), ("ggn", "exact"),
                                                    ("fisher", "empirical")])
def test_step_is_dense_damped_natural_gradient(kind: str, curvature: str,
                                               fisher_type: str) -> None:
    model, task, inputs, targets = problem(kind)
    reference = dense_empirical_fisher if fisher_type == "empirical" else dense_ggn
    matrix = reference(model, task, inputs, targets)
    grad = batch_gradient(model, task, inputs, targets)
    expected = torch.linalg.solve(matrix + DAMPING * torch.eye(len(grad), dtype=grad.dtype), grad)
    before = flatten(params_of(model).values()).clone()
    pair = exact_optimizer(model, task, lr=0.5, curvature=curvature, fisher_type=fisher_type)
    ng_step(pair, model, task, inputs, targets)
    direction = flatten([p.grad for p in model.parameters()])  # .grad: the direction
    assert direction.dtype == torch.float64  # a float64 model is solved in float64
    assert relative_error(direction, expected) < 1e-12
    stepped = (before - flatten(params_of(model).values())) / 0.5
    assert relative_error(stepped, expected) < 1e-10
    assert torch.dot(direction, grad) > 0  # a descent direction


def test_empirical_fisher_under_bf16_autocast_solves_in_float32() -> None:
    """A float32 model whose forward runs under bf16 autocast: the bf16 output gradients are
    upcast, the direction is float32 and the dense float32 solve up to bf16's rounding of them."""
    model, task, inputs, targets = problem("classification")
    model, inputs = model.float(), inputs.float()
    matrix = dense_empirical_fisher(model, task, inputs, targets)
    grad = batch_gradient(model, task, inputs, targets)
    expected = torch.linalg.solve(matrix + DAMPING * torch.eye(len(grad)), grad)
    pre, opt = exact_optimizer(model, task, curvature="fisher", fisher_type="empirical")
    opt.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = model(inputs)
    assert outputs.dtype == torch.bfloat16
    task.loss(outputs, targets).backward()
    pre.step()
    direction = flatten([p.grad for p in model.parameters()])
    assert direction.dtype == torch.float32
    assert relative_error(direction, expected) < 5e-2


def test_restricted_step_solves_on_the_free_coordinates_only() -> None:
    """With pruned (held) weights, d_F = (C_FF + damping I)^-1 grad_F and d = 0 elsewhere."""
    model, task, inputs, targets = problem("classification")
    first = model[0].weight
    keep = (torch.rand(first.shape, generator=torch.Generator().manual_seed(1)) > 0.5).double()
    with torch.no_grad():
        first.mul_(keep)  # pruned weights are zero, as the pruning callback leaves them
    matrix = dense_ggn(model, task, inputs, targets)
    grad = batch_gradient(model, task, inputs, targets)
    free = flatten([keep if p is first else torch.ones_like(p)
                    for p in model.parameters()]).bool()
    expected = torch.zeros_like(grad)
    expected[free] = torch.linalg.solve(
        matrix[free][:, free] + DAMPING * torch.eye(int(free.sum()), dtype=grad.dtype), grad[free])
    before = flatten(params_of(model).values()).clone()
    pre, opt = exact_optimizer(model, task, lr=0.5)
    pre.restrict_to({first: keep})
    opt.zero_grad()
    task.loss(model(inputs), targets).backward()
    first.grad.mul_(keep)  # the callback masks gradients before the step
    pre.step()
    opt.step()
    direction = (before - flatten(params_of(model).values())) / 0.5
    assert torch.count_nonzero(direction[~free]) == 0
    assert relative_error(direction, expected) < 1e-4
    unrestricted = torch.linalg.solve(matrix + DAMPING * torch.eye(len(grad), dtype=grad.dtype),
                                      grad * free)
    assert relative_error(unrestricted * free, expected) > 1e-2  # projecting would differ


def test_weight_decay_and_momentum_follow_the_dense_recurrence() -> None:
    model, task, inputs, targets = problem("classification")
    lr, decay, momentum = 0.3, 0.01, 0.9
    reference = copy.deepcopy(model)
    pair = exact_optimizer(model, task, lr=lr, weight_decay=decay, momentum=momentum)
    buffer = None
    for step in range(2):
        x, y = inputs[4 * step:4 * step + 4], targets[4 * step:4 * step + 4]
        w = flatten(params_of(reference).values())
        matrix = dense_ggn(reference, task, x, y) + DAMPING * torch.eye(len(w), dtype=w.dtype)
        update = torch.linalg.solve(matrix, batch_gradient(reference, task, x, y)) + decay * w
        buffer = update if buffer is None else momentum * buffer + update
        torch.nn.utils.vector_to_parameters(w - lr * buffer, reference.parameters())
        ng_step(pair, model, task, x, y)
        actual = flatten(params_of(model).values())
        assert relative_error(actual, flatten(params_of(reference).values())) < 1e-8


@pytest.mark.parametrize("kl_clip", [1e-4, 1e3])
def test_kl_clipping_bounds_the_step(kl_clip: float) -> None:
    """lr^2 <nu d, grad> = kl_clip when the unclipped step exceeds it; otherwise nu = 1."""
    model, task, inputs, targets = problem("classification")
    grad = batch_gradient(model, task, inputs, targets)
    matrix = dense_ggn(model, task, inputs, targets)
    solution = torch.linalg.solve(matrix + DAMPING * torch.eye(len(grad), dtype=grad.dtype), grad)
    unclipped = 0.5**2 * torch.dot(solution, grad)
    assert 1e-4 < unclipped < 1e3
    before = flatten(params_of(model).values()).clone()
    pair = exact_optimizer(model, task, lr=0.5, kl_clip=kl_clip)
    ng_step(pair, model, task, inputs, targets)
    step = before - flatten(params_of(model).values())
    expected_scale = min(1.0, float((kl_clip / unclipped).sqrt()))
    assert relative_error(step, 0.5 * expected_scale * solution) < 1e-4
    assert pair[0].log_metrics()["kl_scale"] == pytest.approx(expected_scale, rel=1e-6)


def test_batch_norm_statistics_untouched_and_dropout_off() -> None:
    """Products use batch statistics without a second running-stat update, and no dropout."""
    torch.manual_seed(0)
    model = classifier(norm=True, dropout=0.5).train()
    inputs, targets = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,))
    task = Classification()
    # Reference: the same weights, batch-statistics normalization, dropout off.
    reference = copy.deepcopy(model)
    reference[1].track_running_stats = False
    reference[3].eval()
    dense = dense_ggn(reference, task, inputs, targets)
    norm = model[1]
    with curvature_mode(model):
        product = CurvatureProduct(model, dict(model.named_parameters()), (inputs,),
                                   ggn_output_product(task))
        v = torch.randn(dense.shape[0], dtype=torch.float64)
        assert relative_error(product(v), dense @ v) < 1e-10
    assert norm.track_running_stats and model[3].training  # restored
    pre = NaturalGradient(model, cg_iters=5)
    outputs = model(inputs)  # the training forward updates the running statistics once
    stats = norm.running_mean.clone(), norm.running_var.clone(), norm.num_batches_tracked.clone()
    task.loss(outputs, targets).backward()
    pre.step()
    assert torch.equal(norm.running_mean, stats[0]) and torch.equal(norm.running_var, stats[1])
    assert int(norm.num_batches_tracked) == int(stats[2]) == 1


def test_conjugate_gradient_solves_and_stops_at_tolerance() -> None:
    torch.manual_seed(0)
    a = torch.randn(30, 30, dtype=torch.float64)
    a = a @ a.T + 0.1 * torch.eye(30, dtype=torch.float64)
    b = torch.randn(30, dtype=torch.float64)
    exact = torch.linalg.solve(a, b)
    solved = conjugate_gradient(lambda v: a @ v, b, None, iters=200, tol=0.0)
    assert relative_error(solved.x, exact) < 1e-8
    stopped = conjugate_gradient(lambda v: a @ v, b, None, iters=200, tol=1e-3, early_exit=True)
    masked = conjugate_gradient(lambda v: a @ v, b, None, iters=200, tol=1e-3, early_exit=False)
    assert 0 < int(stopped.iterations) < 200 and float(stopped.residual) <= 1e-3
    assert float(torch.linalg.vector_norm(b - a @ stopped.x) / b.norm()) <= 1.0001e-3
    assert torch.equal(stopped.x, masked.x) and int(masked.iterations) == int(stopped.iterations)
    # A warm start at the solution needs no iteration.
    assert int(conjugate_gradient(lambda v: a @ v, b, exact, iters=5, tol=1e-6).iterations) == 0


def test_curvature_subsample_uses_first_examples() -> None:
    model, task, inputs, targets = problem("reconstruction", batch=12)
    grad = batch_gradient(model, task, inputs, targets)
    matrix = dense_ggn(model, task, inputs[:5], targets[:5])
    expected = torch.linalg.solve(matrix + DAMPING * torch.eye(len(grad), dtype=grad.dtype), grad)
    before = flatten(params_of(model).values()).clone()
    pair = exact_optimizer(model, task, lr=1.0, curvature_batch_size=5)
    ng_step(pair, model, task, inputs, targets)
    assert relative_error(before - flatten(params_of(model).values()), expected) < 1e-4


def training_run(state: dict | None = None, steps: int = 3) -> tuple[nn.Module, Pair]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    pair = NaturalGradient(model, cg_iters=4), sgd(model, 0.2, 0.5, 1e-3)
    if state is not None:
        model.load_state_dict(state["model"])
        pair[0].load_state_dict(state["pre"])
        pair[1].load_state_dict(state["opt"])
    generator = torch.Generator().manual_seed(0 if state is None else 1)
    for _ in range(steps):
        inputs = torch.randn(16, 4, generator=generator)
        targets = torch.randint(0, 3, (16,), generator=generator)
        ng_step(pair, model, Classification(), inputs, targets)
    return model, pair


def test_state_dict_round_trip_resumes_bit_identically() -> None:
    model, (pre, opt) = training_run()
    assert set(pre.solutions) == {name for name, _ in model.named_parameters()}
    state = copy.deepcopy({"model": model.state_dict(), "pre": pre.state_dict(),
                           "opt": opt.state_dict()})
    # Continue the original run (batches from seed 1) and a restored one.
    generator = torch.Generator().manual_seed(1)
    for _ in range(3):
        inputs = torch.randn(16, 4, generator=generator)
        targets = torch.randint(0, 3, (16,), generator=generator)
        ng_step((pre, opt), model, Classification(), inputs, targets)
    resumed, _ = training_run(state)
    for a, b in zip(model.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)
    pre.reset()
    assert not pre.solutions and set(pre.log_metrics()) == {"damping", "kl_scale"}


def test_converges_faster_than_sgd_at_the_same_lr() -> None:
    """Ten full-batch steps on a small autoencoder: natural gradient reaches under half the loss."""
    torch.manual_seed(0)
    inputs = torch.rand(64, 8).round()
    task, losses = Reconstruction(), {}
    for name in ("sgd", "ng"):
        torch.manual_seed(1)
        model = nn.Sequential(nn.Linear(8, 4), nn.Tanh(), nn.Linear(4, 8))
        pre = (NaturalGradient(model, task=task, damping=1e-2, cg_iters=20, kl_clip=None)
               if name == "ng" else None)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        for _ in range(10):
            optimizer.zero_grad()
            task.loss(model(inputs), inputs).backward()
            if pre is not None:
                pre.step()
            optimizer.step()
        losses[name] = float(task.loss(model(inputs), inputs).detach())
        if pre is not None:
            metrics = pre.log_metrics()
            assert 1 <= metrics["cg_iters"] <= 20 and metrics["cg_residual"] < 1
    assert losses["ng"] < 0.5 * losses["sgd"], losses  # measured: 1.74 vs 4.58


def test_config_composes_instantiates_and_checks_ranges() -> None:
    cfg = compose("optimizer=natural_gradient", "optimizer.cg_iters=7",
                  "optimizer.curvature_batch_size=32")
    built = build_optimizer(cfg.optimizer, classifier(), Classification())
    assert isinstance(built.preconditioner, NaturalGradient)
    assert built.preconditioner.cg_iters == 7 and built.preconditioner.curvature_batch_size == 32
    group = built.optimizer.param_groups[0]
    assert (group["lr"], group["momentum"]) == (0.1, 0.0)  # the natural gradient's base defaults
    with pytest.raises(ValueError, match="optimizer.damping=0.0 is invalid"):
        OmegaConf.to_object(compose("optimizer=natural_gradient", "optimizer.damping=0.0"))
    with pytest.raises(ValueError, match="curvature='hessian'.*fisher, ggn"):
        NaturalGradient(classifier(), curvature="hessian")
    with pytest.raises(ValueError, match="fisher_type='empirical'.*curvature=ggn"):
        NaturalGradient(classifier(), curvature="ggn", fisher_type="empirical")
    with pytest.raises(RuntimeError, match="no batch was seen"):
        NaturalGradient(classifier()).step()


def test_curvature_ggn_is_the_old_spelling_of_the_exact_fisher_said_once(
        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(natural_gradient, "_DEPRECATIONS_SAID", set())
    with caplog.at_level(logging.WARNING, logger="ngexp"):
        old = NaturalGradient(classifier(), curvature="ggn")
        NaturalGradient(classifier(), curvature="ggn")
    said = [record.getMessage() for record in caplog.records if "deprecated" in record.getMessage()]
    assert said == ["optimizer.curvature=ggn is deprecated: use optimizer.fisher_type=exact (the "
                    "same curvature)"]
    assert old.fisher_type == FisherType.EXACT == "exact" and not old._empirical


def test_fisher_type_names_are_shared_and_each_preconditioner_lists_its_own() -> None:
    with pytest.raises(ValueError, match="fisher_type='mc' is invalid: expected one of exact, "
                                         "empirical"):
        NaturalGradient(classifier(), fisher_type="mc")
    assert {str(t) for t in PRODUCT_FISHER_TYPES} | {str(t) for t in KRONECKER_FISHER_TYPES} \
        == {t.value for t in FisherType}
