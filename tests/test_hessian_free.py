"""Hessian-free against dense references: the damped GGN solve, the reduction ratio of a
quadratic, the backtracking rule, the preconditioned CG and the Armijo line search."""

from __future__ import annotations

import copy
import io
import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import Tensor, nn
from torch.func import functional_call, vmap

from ngexp.curvature.linalg import conjugate_gradient
from ngexp.curvature.products import flatten
from ngexp.curvature.tasks import Classification, Task
from ngexp.optim.build import build_optimizer
from ngexp.optim.hessian_free import (
    HessianFree,
    armijo_rate,
    backtrack,
    kept_iterations,
)
from tests.helpers import compose, ngexp, read_summary, requires_fashion_mnist, run_dirs
from tests.preconditioning import documented_step, sgd
from tests.test_natural_gradient import (
    batch_gradient,
    classifier,
    dense_ggn,
    params_of,
    problem,
    relative_error,
)


class Squared(Task):
    """Loss ``1/2 |z - t|^2`` per example, averaged; ``curvature`` scales the output Hessian the
    GGN products use (1: exact; else a model that mismatches the objective)."""

    name = "squared"

    def __init__(self, curvature: float = 1.0) -> None:
        self.curvature = curvature

    def loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return 0.5 * (outputs - targets).square().sum() / len(outputs)

    def hessian_vector_product(self, outputs: Tensor, vector: Tensor) -> Tensor:
        return self.curvature * vector


def hf(model: nn.Module, task: Task, **options) -> tuple[HessianFree, torch.optim.Optimizer]:
    size = sum(p.numel() for p in model.parameters())
    options = {"cg_iters": 3 * size, "cg_tol": 0.0, "warm_start_decay": 0.0, **options}
    return HessianFree(model, task=task, **options), sgd(model, lr=1.0)


@pytest.mark.parametrize("cg_preconditioner", [False, True])
def test_cg_solution_is_the_dense_damped_ggn_solve(cg_preconditioner: bool) -> None:
    """Without backtracking and line search, the step is -(G + lambda I)^-1 g exactly (float64),
    with or without the diagonal preconditioner (it changes the path, not the solution)."""
    model, task, inputs, targets = problem("classification")
    matrix = dense_ggn(model, task, inputs, targets)
    grad = batch_gradient(model, task, inputs, targets)
    expected = torch.linalg.solve(matrix + 0.3 * torch.eye(len(grad), dtype=grad.dtype), grad)
    before = flatten(params_of(model).values()).clone()
    pre, opt = hf(model, task, damping=0.3, backtracking=False, line_search=False,
                  cg_preconditioner=cg_preconditioner)
    documented_step(model, pre, opt, task, inputs, targets)
    step = before - flatten(params_of(model).values())
    assert relative_error(step, expected) < 1e-6
    assert relative_error(flatten(list(pre.solutions.values())), expected) < 1e-6


def test_preconditioned_cg_converges_to_the_same_solution_in_fewer_iterations() -> None:
    """A badly scaled SPD system: CG with M = diag(A) reaches the dense solution, and needs
    fewer iterations to the tolerance than plain CG."""
    generator = torch.Generator().manual_seed(0)
    basis = torch.randn(40, 40, generator=generator, dtype=torch.float64)
    scales = torch.logspace(-3, 3, 40, dtype=torch.float64)
    matrix = scales[:, None] * (basis @ basis.T / 40 + torch.eye(40, dtype=torch.float64)) \
        * scales[None, :]
    b = torch.randn(40, generator=generator, dtype=torch.float64)
    expected = torch.linalg.solve(matrix, b)
    plain = conjugate_gradient(lambda v: matrix @ v, b, None, 400, 1e-10)
    preconditioned = conjugate_gradient(lambda v: matrix @ v, b, None, 400, 1e-10,
                                        preconditioner=matrix.diagonal())
    assert relative_error(preconditioned.x, expected) < 1e-7
    assert int(preconditioned.iterations) < int(plain.iterations)
    kept = conjugate_gradient(lambda v: matrix @ v, b, None, 400, 1e-10,
                              preconditioner=matrix.diagonal(), keep_at=(1, 3))
    assert [i for i, _, _ in kept.iterates] == [1, 3, int(kept.iterations)]
    for _, x, r in kept.iterates:  # the kept residuals are b - A x
        torch.testing.assert_close(r, b - matrix @ x, rtol=1e-6, atol=1e-8)


class Scale(nn.Module):
    """A raw ``nn.Parameter`` the capture does not cover."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, size))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale


def test_cg_preconditioner_is_the_damped_empirical_fisher_diagonal_to_the_075() -> None:
    """M = ((1/B) sum_n g_n^2 + lambda)^0.75 with per-example gradients g_n from vmap(grad), for
    the weights and biases of a Conv2d, a Linear and a LayerNorm; lambda^0.75 for a raw
    parameter (no per-example gradients in the capture)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1, stride=2), nn.Tanh(), nn.Flatten(),
                          nn.Linear(2 * 3 * 3, 4), nn.LayerNorm(4), Scale(4))
    inputs, targets = torch.randn(6, 1, 5, 5), torch.randint(0, 4, (6,))
    task = Classification()
    pre = HessianFree(model, task=task, damping=0.5)
    outputs = model(inputs)
    pre.backward(task.loss(outputs, targets), outputs, targets=targets)
    grad = flatten([p.grad for p in model.parameters()])
    actual = pre._diagonal_preconditioner(grad)
    params = {name: p.detach() for name, p in model.named_parameters()}

    def example_loss(p: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        return task.loss(functional_call(model, p, (x[None],)), y[None])

    grads = vmap(torch.func.grad(example_loss), in_dims=(None, 0, 0))(params, inputs, targets)
    squares = {name: g.square().mean(0) for name, g in grads.items()}
    squares["5.scale"] = torch.zeros_like(squares["5.scale"])
    expected = (flatten(list(squares.values())) + 0.5) ** 0.75
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-7)


def linear_problem(curvature: float) -> tuple[nn.Module, Task, Tensor, Tensor]:
    torch.manual_seed(0)
    model = nn.Linear(3, 2).double()
    inputs = torch.randn(16, 3, dtype=torch.float64)
    return model, Squared(curvature), inputs, torch.randn(16, 2, dtype=torch.float64)


@pytest.mark.parametrize("curvature, grows", [(1.0, False), (0.05, True)])
def test_damping_follows_the_reduction_ratio_on_a_quadratic(curvature: float,
                                                            grows: bool) -> None:
    """A linear model with a squared loss is a quadratic whose GGN is its Hessian: the model
    is exact, rho = 1 (to rounding), lambda *= 2/3. A model with 1/20 of the curvature takes
    too long a step: rho < 1/4 (here the loss even rises), lambda *= 3/2. rho is checked
    against (f(theta + p) - f(theta)) / (g^T p + 1/2 p^T G p) computed densely."""
    model, task, inputs, targets = linear_problem(curvature)
    grad = batch_gradient(model, task, inputs, targets)
    matrix = curvature * dense_ggn(model, Squared(), inputs, targets)
    with torch.no_grad():
        before_loss = float(task.loss(model(inputs), targets))
    before = flatten(params_of(model).values()).clone()
    pre, opt = hf(model, task, damping=1e-3, backtracking=False, line_search=False)
    documented_step(model, pre, opt, task, inputs, targets)
    p = flatten(params_of(model).values()) - before
    with torch.no_grad():
        after_loss = float(task.loss(model(inputs), targets))
    rho = (after_loss - before_loss) / float(grad @ p + 0.5 * p @ matrix @ p)
    assert math.isclose(float(pre._rho), rho, rel_tol=1e-9)
    if grows:
        assert rho < 0.25 and after_loss > before_loss
        assert math.isclose(float(pre._lambda), 1e-3 * 1.5, rel_tol=1e-12)
    else:
        assert abs(rho - 1) < 1e-9
        assert math.isclose(float(pre._lambda), 1e-3 * 2 / 3, rel_tol=1e-12)
    assert pre.log_metrics()["rho"] == float(pre._rho)


def test_backtracking_keeps_geometric_iterates_and_stops_when_the_loss_rises() -> None:
    """Kept iterations are ceil(1.3^j); from the last iterate back, the rule moves while the
    loss decreases (Martens 2010, Sec. 4.6)."""
    assert kept_iterations(20, 1.3) == sorted({math.ceil(1.3**j) for j in range(12)
                                               if math.ceil(1.3**j) <= 20})
    assert kept_iterations(20, 1.3)[:6] == [1, 2, 3, 4, 5, 7]
    iterates = tuple((i, torch.tensor([float(i)]), torch.zeros(1)) for i in range(5))
    for losses, chosen in [([5.0, 3.0, 2.0, 2.5, 4.0], 2),  # the best
                           ([1.0, 3.0, 2.0, 2.5, 4.0], 2),  # stops at the first rise
                           ([5.0, 4.0, 3.0, 2.0, 1.0], 4)]:  # the last is best
        index, seen = backtrack(iterates, lambda x, values=losses: torch.tensor(values[int(x)]))
        assert index == chosen
        assert min(float(v) for v in seen.values()) == losses[chosen]


def test_backtracking_in_a_step_takes_the_best_kept_iterate_it_visits() -> None:
    """On the curvature batch, the loss after an HF step with backtracking is no higher than at
    the last CG iterate, and the chosen iteration is a kept one."""
    model, task, inputs, targets = problem("classification")
    reference = copy.deepcopy(model)
    pre, opt = hf(model, task, damping=1e-4, cg_iters=30, line_search=False)
    plain, plain_opt = hf(reference, task, damping=1e-4, cg_iters=30, line_search=False,
                          backtracking=False)
    documented_step(model, pre, opt, task, inputs, targets)
    documented_step(reference, plain, plain_opt, task, inputs, targets)
    assert pre._chosen in {*kept_iterations(30, 1.3), int(pre._cg.iterations)}
    with torch.no_grad():
        assert float(task.loss(model(inputs), targets)) <= float(task.loss(reference(inputs),
                                                                           targets))


def test_armijo_rate_is_the_largest_sufficient_decrease() -> None:
    """f(x) = (x - 1)^2 from 0 along p = 4 (x = -p in HF's sign): rate 0.8^i until f(rate p)
    <= f(0) + 0.01 rate f'(0) p."""
    def loss_at(x: Tensor) -> Tensor:
        return (-x - 1).square().sum()

    x = torch.tensor([-4.0], dtype=torch.float64)
    before, after = loss_at(torch.zeros(1, dtype=torch.float64)), loss_at(x)
    slope = torch.tensor(-8.0, dtype=torch.float64)
    rate = float(armijo_rate(before, after, slope, x, loss_at))
    expected = next(0.8**i for i in range(60)
                    if (0.8**i * 4 - 1) ** 2 <= 1 + 0.01 * 0.8**i * -8.0)
    assert math.isclose(rate, expected, rel_tol=1e-12)
    assert float(armijo_rate(before, loss_at(-x), torch.tensor(8.0), -x, loss_at)) == 0.0


def test_pruned_weights_stay_zero() -> None:
    model, task, inputs, targets = problem("classification")
    mask = (torch.rand_like(model[0].weight) > 0.5).double()
    with torch.no_grad():
        model[0].weight *= mask
    pre, opt = hf(model, task, damping=0.1)
    pre.restrict_to({model[0].weight: mask})
    for _ in range(3):
        opt.zero_grad()
        outputs = model(inputs)
        pre.backward(task.loss(outputs, targets), outputs, targets)
        model[0].weight.grad *= mask
        pre.step()
        opt.step()
    assert torch.equal(model[0].weight[mask == 0], torch.zeros(int((mask == 0).sum()),
                                                               dtype=torch.float64))


def training_run(state: dict | None = None) -> tuple[nn.Module, HessianFree, list]:
    torch.manual_seed(0)
    model, task = classifier(), Classification()
    pre, opt = HessianFree(model, task=task, cg_iters=8), sgd(model, lr=1.0)
    generator = torch.Generator().manual_seed(0 if state is None else 1)
    if state is not None:
        model.load_state_dict(state["model"])
        pre.load_state_dict(state["pre"])
        opt.load_state_dict(state["opt"])
    for _ in range(3):
        x = torch.randn(16, 4, generator=generator, dtype=torch.float64)
        documented_step(model, pre, opt, task, x, torch.randint(0, 3, (16,), generator=generator))
    return model, pre, [opt, generator]


def test_state_dict_round_trip_resumes_bit_identically() -> None:
    model, pre, (opt, _) = training_run()
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "pre": pre.state_dict(),
                "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    generator = torch.Generator().manual_seed(1)
    for _ in range(3):
        x = torch.randn(16, 4, generator=generator, dtype=torch.float64)
        documented_step(model, pre, opt, Classification(), x,
                        torch.randint(0, 3, (16,), generator=generator))
    resumed, resumed_pre, _ = training_run(copy.deepcopy(saved))
    for a, b in zip(model.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)
    assert pre.log_metrics() == resumed_pre.log_metrics()


def test_config_builds_and_misuse_is_clear() -> None:
    assert HessianFree(classifier()).cg_iters == 10  # the preset's default, measured
    cfg = compose("optimizer=hessian_free", "optimizer.cg_iters=7")
    built = build_optimizer(cfg.optimizer, classifier(), Classification())
    assert isinstance(built.preconditioner, HessianFree)
    assert built.preconditioner.cg_iters == 7 and built.preconditioner.kl_clip is None
    group = built.optimizer.param_groups[0]
    assert (group["lr"], group["momentum"]) == (1.0, 0.0)
    with pytest.raises(ValueError, match="optimizer.backtrack_spacing=1.0 is invalid"):
        OmegaConf.to_object(compose("optimizer=hessian_free", "optimizer.backtrack_spacing=1.0"))
    with pytest.raises(ValueError, match="damping=.*no schedule"):
        HessianFree(classifier(), damping={"schedule": "exponential"})
    model, task, inputs, targets = problem("classification")
    pre, opt = hf(model, task)
    documented_step(model, pre, opt, task, inputs, targets)
    opt.zero_grad()
    task.loss(model(inputs), targets).backward()  # the next step without its targets
    with pytest.raises(RuntimeError, match=r"pre.backward\(loss, targets=targets\)"):
        pre.step()
    opt.zero_grad()
    for rows in (slice(0, 4), slice(4, 8)):  # gradient accumulation: one batch per step only
        outputs = model(inputs[rows])
        pre.backward(task.loss(outputs, targets[rows]) / 2, outputs, targets=targets[rows])
    with pytest.raises(RuntimeError, match="does not support gradient accumulation"):
        pre.step()


@requires_fashion_mnist
def test_learns_fashion_mnist_from_the_command_line(tmp_path: Path) -> None:
    ngexp("train", "optimizer=hessian_free", "data.subset=2000",
          "trainer.max_steps=20", "trainer.device=cpu", "trainer.progress=none",
          f"output_root={tmp_path}")
    [run] = run_dirs(tmp_path)
    summary = read_summary(run)
    assert summary["status"] == "completed"
    assert summary["final"]["test/acc"] > 0.6, summary["final"]  # chance: 0.1
