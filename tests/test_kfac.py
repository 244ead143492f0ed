"""K-FAC preconditioner (ngexp/optim/kfac.py) and the shared Kronecker machinery
(ngexp/optim/kronecker_preconditioner.py, ngexp/optim/preconditioner.py)."""

from __future__ import annotations

import copy
import io
import logging
import math
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from ngexp.curvature.capture import SAMPLED, TRAINING
from ngexp.curvature.kronecker import PassGroup, kronecker_factors
from ngexp.curvature.tasks import Classification
from ngexp.optim.build import build_optimizer
from ngexp.optim.hyperparams import Piecewise
from ngexp.optim.kfac import KFAC
from ngexp.optim.kronecker_terms import pi_ratio
from tests.helpers import (
    compose,
    ngexp,
    read_metrics,
    read_summary,
    requires_fashion_mnist,
    run_dirs,
    sum_tolerance,
)
from tests.preconditioning import documented_step, sgd, snapshot

TASK = Classification()


def data(seed: int = 0, n: int = 64) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=generator)
    return x, (x[:, :3].sum(1) > 0).long() + (x[:, 3] > 1).long()


def net(batch_norm: bool = False) -> nn.Module:
    torch.manual_seed(0)
    middle = [nn.BatchNorm1d(8)] if batch_norm else []
    return nn.Sequential(nn.Linear(6, 8), *middle, nn.Tanh(), nn.Linear(8, 3))


def kfac(model: nn.Module, lr: float = 1.0, momentum: float = 0.0, weight_decay: float = 0.0,
         **options) -> tuple[KFAC, torch.optim.SGD]:
    return KFAC(model, **options), sgd(model, lr, momentum, weight_decay)


def train_step(model: nn.Module, pre: KFAC, opt: torch.optim.Optimizer, x: Tensor,
               y: Tensor) -> None:
    documented_step(model, pre, opt, TASK, x, y)


# ---------------------------------------------------------------------------- preconditioning
@pytest.mark.parametrize("damping_mode", ["factored", "eigen"])
def test_step_equals_dense_damped_kronecker_inverse(damping_mode: str) -> None:
    model = net()
    pre, opt = kfac(model, kl_clip=None, damping=0.05, damping_mode=damping_mode,
                    fisher_type="empirical")
    before = snapshot(model)
    x, y = data()
    raw = {id(p): r.grad for p, r in zip(model.parameters(), reference_grads(x, y), strict=True)}
    train_step(model, pre, opt, x, y)
    curvature = pre.curvature()
    assert ("A_inv" in curvature["0"]) == (damping_mode == "factored")
    assert ("U_A" in curvature["0"]) == (damping_mode == "eigen")  # no eigh when factored
    for layer in pre.layers:
        a, g = curvature[layer.name]["A"][0].double(), curvature[layer.name]["G"][0].double()
        if damping_mode == "factored":  # (G + d/pi I) (x) (A + d pi I), pi from the traces
            pi = math.sqrt((a.trace() / len(a)) / (g.trace() / len(g)))
            root = math.sqrt(0.05)
            matrix = torch.kron(g + root / pi * torch.eye(len(g)),
                                a + root * pi * torch.eye(len(a)))
            # pi: float32 means of len(a) and len(g) positive terms, a ratio and a root
            torch.testing.assert_close(curvature[layer.name]["pi"].double(),
                                       torch.tensor([pi], dtype=torch.float64), atol=0,
                                       rtol=sum_tolerance(torch.float32, len(a) + len(g), 1.0))
        else:
            matrix = torch.kron(g, a) + 0.05 * torch.eye(len(g) * len(a))
        weight, bias = layer.module.weight, layer.module.bias
        grad = layer.matrix(raw[id(weight)], raw[id(bias)])[0].double().flatten()
        expected = torch.linalg.solve(matrix, grad)
        index = [i for i, p in enumerate(model.parameters()) if p is weight][0]
        step = layer.matrix(before[index] - weight.detach(), before[index + 1] - bias.detach())
        torch.testing.assert_close(step[0].double().flatten(), expected, rtol=2e-4, atol=1e-6)


def test_factored_path_equals_the_direct_product_and_yields_to_changed_gradients() -> None:
    """On the CPU, (D G^-1)^T ([X|1] A^-1) replaces G^-1 M A^-1 for a wide Linear layer at a
    small batch -- the same direction; a masked or clipped .grad takes the direct path."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 30), nn.Tanh(), nn.Linear(30, 3))
    x, y = torch.randn(8, 40), torch.randint(0, 3, (8,))
    directions = {}
    for case in ("factored", "direct", "scaled"):
        pre = KFAC(copy.deepcopy(model), fisher_type="empirical", kl_clip=None)
        if case == "direct":  # what a GPU does
            pre._factored_direction = lambda *a: None
        TASK.loss(pre.model(x), y).backward()
        if case == "scaled":  # e.g. gradient clipping between backward and pre.step()
            for p in pre.model.parameters():
                p.grad.mul_(0.5)
        calls: list[Tensor | None] = []

        def recorded(*args, calls=calls, original=pre._factored_direction):
            calls.append(original(*args))
            return calls[-1]

        pre._factored_direction = recorded
        pre.step()
        directions[case] = [p.grad.clone() for p in pre.model.parameters()]
        used = [c is not None for c in calls]
        assert used == {"factored": [True, False], "direct": [False, False],
                        "scaled": [False, False]}[case], case  # layer 2: 3x31, not cheaper
    assert pre._cheaper == {"0": True, "2": False} and pre.capture.active  # every step
    for ours, direct in zip(directions["factored"], directions["direct"], strict=True):
        torch.testing.assert_close(ours, direct, rtol=1e-4, atol=1e-6)
    for half, direct in zip(directions["scaled"], directions["direct"], strict=True):
        torch.testing.assert_close(half, 0.5 * direct, rtol=1e-4, atol=1e-6)


def test_pi_ratio() -> None:
    a = torch.diag(torch.tensor([4.0, 2.0]))[None]
    g = torch.diag(torch.tensor([0.5, 0.1, 0.3]))[None]
    torch.testing.assert_close(pi_ratio(a, g), torch.tensor([math.sqrt(3.0 / 0.3)]))


@pytest.mark.parametrize("fisher_type", ["empirical", "mc"])
def test_update_is_a_descent_direction(fisher_type: str) -> None:
    model = net()
    pre, opt = kfac(model, lr=0.1, fisher_type=fisher_type)
    for seed in range(4):  # later steps use running factors from other batches
        x, y = data(seed)
        before = snapshot(model)
        before_state = [t.clone() for t in model.state_dict().values()]
        train_step(model, pre, opt, x, y)
        raw = copy.deepcopy(model)
        raw.load_state_dict(dict(zip(model.state_dict(), before_state, strict=True)))
        TASK.loss(raw(x), y).backward()
        for old, param, reference in zip(before, model.parameters(), raw.parameters(),
                                         strict=True):
            direction = old - param.detach()  # the step is -lr * d
            assert (direction * reference.grad).sum() > 0


def test_mc_passes_leave_the_training_gradient() -> None:
    model, reference = net(), net()
    pre = KFAC(model, fisher_type="mc", mc_samples=3)
    x, y = data()
    outputs = model(x)
    pre.backward(TASK.loss(outputs, y))  # the outputs default to the hooked forward's
    TASK.loss(reference(x), y).backward()
    for param, expected in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(param.grad, expected.grad)
    assert pre.capture.pass_kinds == [SAMPLED] * 3 + [TRAINING]  # three MC passes, then training


def reference_grads(x: Tensor, y: Tensor) -> list[nn.Parameter]:
    """The raw gradients of ``net()`` on ``(x, y)`` (a preconditioner overwrites its own)."""
    model = net()
    TASK.loss(model(x), y).backward()
    return list(model.parameters())


def test_kl_clip_scales_the_preconditioned_update() -> None:
    x, y = data()
    steps = {}
    for kl_clip in (None, 1e-4):
        model = net()
        pre, opt = kfac(model, lr=0.1, kl_clip=kl_clip, fisher_type="empirical")
        before = snapshot(model)
        train_step(model, pre, opt, x, y)
        steps[kl_clip] = [old - p.detach()
                          for old, p in zip(before, model.parameters(), strict=True)]
        grads = [p.grad for p in reference_grads(x, y)]
    # nu = min(1, sqrt(kl_clip / (lr^2 sum <v, g>))), v the unclipped direction = step / lr
    quadratic = sum((step / 0.1 * grad).sum()
                    for step, grad in zip(steps[None], grads, strict=True))
    nu = math.sqrt(1e-4 / (0.1**2 * float(quadratic)))
    assert nu < 0.5
    for clipped, unclipped in zip(steps[1e-4], steps[None], strict=True):  # float32 noise
        torch.testing.assert_close(clipped, nu * unclipped, rtol=1e-3, atol=1e-7)
        assert clipped.abs().max() > 1e-4


def test_uncovered_parameters_get_the_plain_momentum_step(caplog: pytest.LogCaptureFixture) -> None:
    """A PReLU slope (no curvature block) keeps the plain gradient: the torch optimizer's
    momentum and weight decay step on it exactly as without the preconditioner."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.PReLU(8), nn.Linear(8, 3))
    with caplog.at_level(logging.INFO, logger="ngexp"):
        pre, opt = kfac(model, lr=0.05, momentum=0.5, weight_decay=0.1)
    assert pre.coverage.plain == ["1.weight"]
    assert "1 keep the plain gradient (8 values, 8.8%): 1.weight" in caplog.text
    reference_model = copy.deepcopy(model)
    prelu = reference_model[1]
    reference_sgd = torch.optim.SGD(prelu.parameters(), lr=0.05, momentum=0.5, weight_decay=0.1)
    for seed in range(3):
        x, y = data(seed)
        train_step(model, pre, opt, x, y)
        reference_sgd.zero_grad()
        TASK.loss(reference_model(x), y).backward()
        reference_sgd.step()
        with torch.no_grad():  # keep the covered layers equal so the PReLU gradients agree
            for mine, theirs in zip(model.parameters(), reference_model.parameters(), strict=True):
                if theirs is not prelu.weight:
                    theirs.copy_(mine)
        torch.testing.assert_close(model[1].weight, prelu.weight)


# ---------------------------------------------------------------------------- schedules
def test_statistics_every_cov_update_freq_steps_and_factor_average() -> None:
    model = net()
    # eigen mode: the layers are captured only on statistics steps (factored mode on the CPU
    # captures every step for its factored preconditioning)
    pre, opt = kfac(model, cov_update_freq=3, inv_update_freq=3, stat_decay=0.5,
                    fisher_type="empirical", damping_mode="eigen")
    captured, factors = [], []
    for step in range(7):
        x, y = data(step)
        opt.zero_grad()
        outputs = model(x)
        captured.append(pre.capture.captured_inputs)
        TASK.loss(outputs, y).backward()  # the plain loop
        layer = pre.layers[0]
        batch_a = (kronecker_factors(layer, [PassGroup(-1, pre.capture.passes(TRAINING), len(x))],
                                      len(x))[0]
                   if captured[-1] else None)
        pre.step()
        opt.step()
        factors.append((batch_a, pre.curvature()["0"]["A"].clone()))
    assert captured == [True, False, False, True, False, False, True]
    torch.testing.assert_close(factors[0][1], factors[0][0])  # the first estimate replaces
    # second update: e = min(0.5, 1 - 1/2) = 0.5; third: e = 0.5
    torch.testing.assert_close(factors[3][1], 0.5 * factors[0][1] + 0.5 * factors[3][0])
    torch.testing.assert_close(factors[5][1], factors[3][1])
    torch.testing.assert_close(factors[6][1], 0.5 * factors[3][1] + 0.5 * factors[6][0])
    model.eval()
    model(data()[0])
    assert not pre.capture.captured_inputs


def test_exponential_damping_schedule() -> None:
    model = net()
    pre, opt = kfac(model, lr=0.1, damping=1e-2, damping_schedule="exponential",
                    damping_decay=0.5, damping_decay_steps=2, damping_min=4e-3)
    values = []
    for step in range(4):
        train_step(model, pre, opt, *data(step))
        values.append(pre.log_metrics()["damping"])  # the damping this step used
    assert values == pytest.approx([1e-2, 1e-2 * 0.5**0.5, 5e-3, 4e-3])


def test_hyperparameters_follow_schedules_of_the_step() -> None:
    """damping as a callable, inv_update_freq as a piecewise schedule (kfac-pytorch's style)."""
    model = net()
    pre, opt = kfac(model, lr=0.1, damping=lambda step: 0.1 / (step + 1),
                    inv_update_freq=Piecewise([1, 3], [2]), cov_update_freq=1,
                    fisher_type="empirical")
    dampings, inverses = [], []
    for step in range(6):
        train_step(model, pre, opt, *data(step))
        dampings.append(pre.log_metrics()["damping"])
        inverses.append(pre.curvature()["0"]["A_inv"].clone())
    assert dampings == pytest.approx([0.1 / (t + 1) for t in range(6)])
    # refreshed at steps 0, 1 (every step), then 3 (every 3): 2, 4 and 5 keep the inverses -- but
    # a changed damping re-inverts (factored damping folds it into the inverses), so compare
    # against the damping-free schedule instead
    pre, opt = kfac(net(), lr=0.1, inv_update_freq=Piecewise([1, 3], [2]), cov_update_freq=1,
                    fisher_type="empirical")
    kept = []
    for step in range(6):
        before = pre.curvature().get("0", {}).get("A_inv")
        train_step(pre.model, pre, opt, *data(step))
        kept.append(before is not None and torch.equal(before, pre.curvature()["0"]["A_inv"]))
    assert kept == [False, False, True, False, True, True]


@pytest.mark.parametrize(("lr", "direction"), [(1e-4, "down"), (50.0, "up")])
def test_adaptive_damping_follows_the_reduction_ratio(lr: float, direction: str) -> None:
    model = net()
    pre, opt = kfac(model, lr=lr, kl_clip=None, damping=1e-2, damping_schedule="adaptive",
                    adapt_interval=1, fisher_type="empirical")
    train_step(model, pre, opt, *data())
    omega = 19 / 20
    metrics = pre.log_metrics()
    if direction == "down":  # tiny step: the quadratic model is accurate, rho ~ 1
        assert metrics["rho"] == pytest.approx(1.0, abs=0.05)
        assert metrics["damping"] == pytest.approx(1e-2 * omega)
    else:  # huge step: the loss goes up, rho < 1/4
        assert metrics["rho"] < 0.25
        assert metrics["damping"] == pytest.approx(1e-2 / omega)


def test_adaptive_damping_needs_targets() -> None:
    model = net()
    pre = KFAC(model, damping_schedule="adaptive")
    x, y = data()
    pre.backward(TASK.loss(model(x), y))
    with pytest.raises(RuntimeError, match=r"pre.backward\(loss, targets=targets\)"):
        pre.step()


# ---------------------------------------------------------------------------- state
def test_resume_continues_bit_identically() -> None:
    options = dict(fisher_type="mc", mc_samples=2, cov_update_freq=2, inv_update_freq=3,
                   damping_schedule="adaptive", adapt_interval=2)
    batches = [data(seed, n=32) for seed in range(12)]
    model = net(batch_norm=True)
    pre, opt = kfac(model, lr=0.05, momentum=0.9, weight_decay=1e-3, **options)
    for x, y in batches[:5]:
        train_step(model, pre, opt, x, y)
    saved = copy.deepcopy({"model": model.state_dict(), "pre": pre.state_dict(),
                           "opt": opt.state_dict()})
    for x, y in batches[5:]:
        train_step(model, pre, opt, x, y)

    torch.manual_seed(123)  # a different global RNG state must not matter
    resumed = net(batch_norm=True)
    resumed.load_state_dict(saved["model"])
    resumed_pre, resumed_opt = kfac(resumed, lr=0.05, momentum=0.9, weight_decay=1e-3, **options)
    resumed_pre.load_state_dict(saved["pre"])
    resumed_opt.load_state_dict(saved["opt"])
    for x, y in batches[5:]:
        train_step(resumed, resumed_pre, resumed_opt, x, y)
    for mine, theirs in zip(model.state_dict().values(), resumed.state_dict().values(),
                            strict=True):
        assert torch.equal(mine, theirs)
    assert pre.log_metrics() == resumed_pre.log_metrics()


def test_state_dict_loads_with_weights_only() -> None:
    """A checkpoint of the preconditioner holds plain tensors and containers only."""
    model = net()
    pre, opt = kfac(model, fisher_type="mc")
    train_step(model, pre, opt, *data())
    buffer = io.BytesIO()
    torch.save(pre.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    assert set(state["layers"]["0"]) == {"A", "G", "pi", "A_inv", "G_inv"}


def test_reset_clears_curvature() -> None:
    model = net()
    pre, opt = kfac(model, lr=0.1, cov_update_freq=5, inv_update_freq=5)
    for step in range(3):
        train_step(model, pre, opt, *data(step))
    assert pre.curvature()
    pre.reset()
    assert not pre.curvature()
    x, y = data(7)
    outputs = model(x)  # step 3 is no statistics step, but a reset one captures
    assert pre.capture.captured_inputs
    pre.backward(TASK.loss(outputs, y), outputs)
    pre.step()
    assert set(pre.curvature()["0"]) == {"A", "G", "A_inv", "G_inv", "pi"}
    assert pre.counters == {"factor_updates": 1} and pre.steps == 4


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_failed_eigendecomposition_keeps_previous_basis(bad: float) -> None:
    model = net()
    pre, opt = kfac(model, lr=0.1, cov_update_freq=100, inv_update_freq=1, damping_mode="eigen")
    for step in range(2):
        train_step(model, pre, opt, *data(step))
    state = pre.curvature()["0"]
    previous = state["U_A"].clone(), state["lambda_A"].clone()
    state["A"][0, 0, 0] = bad
    train_step(model, pre, opt, *data(5))
    state = pre.curvature()["0"]
    assert torch.equal(state["U_A"], previous[0]) and torch.equal(state["lambda_A"], previous[1])
    assert pre.log_metrics()["kept_bases"] == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_failed_cholesky_keeps_previous_inverse(bad: float) -> None:
    model = net()
    pre, opt = kfac(model, lr=0.1, cov_update_freq=100, inv_update_freq=1, pi_correction=False)
    for step in range(2):
        train_step(model, pre, opt, *data(step))
    previous = pre.curvature()["0"]["A_inv"].clone()
    pre.curvature()["0"]["A"][0, 0, 0] = bad
    train_step(model, pre, opt, *data(5))
    assert torch.equal(pre.curvature()["0"]["A_inv"], previous)
    assert pre.log_metrics()["kept_bases"] == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_damped_inverses_equal_dense_inverses_and_retry_in_float64(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from ngexp.curvature import linalg

    torch.manual_seed(0)
    factors = [torch.randn(2, 5, 5), torch.randn(1, 5, 5), torch.randn(1, 3, 3)]
    factors = [f @ f.mT for f in factors]
    dampings = [torch.tensor([[0.1], [0.2]]), torch.tensor([[0.3]]), torch.tensor([[1e-3]])]
    inverses, kept = linalg.damped_inverses(factors, dampings, [None] * 3, ["a", "b", "c"])
    for factor, damping, inverse in zip(factors, dampings, inverses, strict=True):
        dense = torch.linalg.inv(factor.double() + damping[..., None].double() * torch.eye(
            factor.shape[-1], dtype=torch.float64))
        torch.testing.assert_close(inverse.double(), dense, rtol=1e-4, atol=1e-5)
    assert int(kept) == 0
    real = torch.linalg.cholesky_ex

    def fail_in_float32(matrix: Tensor):  # a float32 factorization that reports failure
        lower, info = real(matrix)
        return lower, info + int(matrix.dtype == torch.float32)

    monkeypatch.setattr(torch.linalg, "cholesky_ex", fail_in_float32)
    retried, kept = linalg.damped_inverses(factors, dampings, [None] * 3, ["a", "b", "c"])
    for first, second in zip(inverses, retried, strict=True):
        torch.testing.assert_close(first, second, rtol=1e-4, atol=1e-5)


def test_non_finite_batch_statistics_are_skipped() -> None:
    model = net()
    pre, opt = kfac(model, lr=0.1, cov_update_freq=1)
    train_step(model, pre, opt, *data())
    factor = pre.curvature()["0"]["A"].clone()
    x, y = data(1)
    x[0, 0] = float("inf")
    opt.zero_grad()
    outputs = model(x)
    pre.backward(TASK.loss(outputs, y), outputs)
    for param in model.parameters():
        param.grad = torch.nan_to_num(param.grad, nan=0.0, posinf=0.0, neginf=0.0)
    pre.step()
    assert torch.equal(pre.curvature()["0"]["A"], factor)
    assert pre.log_metrics()["skipped_statistics"] >= 1


# ---------------------------------------------------------------------------- config
def test_options_are_checked_with_one_line_errors() -> None:
    with pytest.raises(ValueError, match="stat_decay=1.5"):
        KFAC(net(), stat_decay=1.5)
    with pytest.raises(ValueError, match="damping_mode='tikhonov'.*factored, eigen"):
        KFAC(net(), damping_mode="tikhonov")
    with pytest.raises(ValueError, match="mc_samples=4"):
        KFAC(net(), fisher_type="empirical", mc_samples=4)
    with pytest.raises(ValueError, match="damping_min"):
        KFAC(net(), damping=1e-3, damping_min=1e-2)
    with pytest.raises(ValueError, match="damping=inf"):
        KFAC(net(), damping=float("inf"))
    from omegaconf import OmegaConf

    with pytest.raises(ValueError, match="optimizer.cov_update_freq=0"):
        OmegaConf.to_object(compose("optimizer=kfac", "optimizer.cov_update_freq=0"))


@pytest.mark.parametrize("option", ["kfac", "ekfac"])
@pytest.mark.parametrize("base", ["sgd", "adam", "rmsprop"])
def test_option_composes_and_builds_preconditioner_and_base(option: str, base: str) -> None:
    cfg = compose(f"optimizer={option}", "optimizer.damping=0.01", f"optimizer.base={base}")
    built = build_optimizer(cfg.optimizer, net(), TASK)
    assert type(built.preconditioner).__name__ == option.upper()
    assert built.preconditioner.damping == 0.01
    expected = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "rmsprop": torch.optim.RMSprop}
    assert type(built.optimizer) is expected[base]
    group = built.optimizer.param_groups[0]
    assert group["lr"] == 0.03 and group["weight_decay"] == 0.0
    if base == "adam":
        assert group["betas"] == (0.9, 0.999)  # momentum is Adam's beta1
    else:
        assert group["momentum"] == 0.9


# ---------------------------------------------------------------------------- end to end
@requires_fashion_mnist
@pytest.mark.parametrize("optimizer", ["kfac", "ekfac"])
def test_lenet5_experiment_learns_fashion_mnist(optimizer: str, tmp_path: Path) -> None:
    ngexp("train", f"+experiment=lenet5_{optimizer}", "data.subset=4000", "trainer.max_steps=60",
          "trainer.log_every=20", "trainer.progress=none", f"output_root={tmp_path}")
    [run] = run_dirs(tmp_path)
    summary = read_summary(run)
    assert summary["status"] == "completed"
    assert summary["final"]["test/acc"] > 0.75  # chance is 0.10; measured 0.82
    records = [r for r in read_metrics(run) if "optim/damping" in r]
    assert {20, 40, 60} <= {r["step"] for r in records}
    assert all(r["optim/kept_bases"] == 0 and 0 < r["optim/kl_scale"] <= 1 for r in records)
