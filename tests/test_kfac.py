"""K-FAC optimizer (ngexp/optim/kfac.py) and the shared outer step (ngexp/optim/kronecker.py)."""

from __future__ import annotations

import io
import logging
import math
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from ngexp.optim import build_optimizer
from ngexp.optim.kfac import KFAC, KFACConfig, pi_ratio
from ngexp.optim.kronecker import KroneckerOptimizer
from ngexp.train.tasks import Classification
from tests.conftest import (
    compose,
    ngexp,
    read_metrics,
    read_summary,
    requires_fashion_mnist,
    run_dirs,
)

TASK = Classification()


def data(seed: int = 0, n: int = 64) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=generator)
    return x, (x[:, :3].sum(1) > 0).long() + (x[:, 3] > 1).long()


def net(batch_norm: bool = False) -> nn.Module:
    torch.manual_seed(0)
    middle = [nn.BatchNorm1d(8)] if batch_norm else []
    return nn.Sequential(nn.Linear(6, 8), *middle, nn.Tanh(), nn.Linear(8, 3))


def train_step(model: nn.Module, optimizer: KroneckerOptimizer, x: Tensor, y: Tensor) -> None:
    optimizer.zero_grad(set_to_none=True)
    outputs = model(x)
    loss = TASK.loss(outputs, y)
    optimizer.backward(loss, outputs=outputs, inputs=x, task=TASK, targets=y)
    optimizer.step()


def snapshot(model: nn.Module) -> list[Tensor]:
    return [p.detach().clone() for p in model.parameters()]


# ---------------------------------------------------------------------------- preconditioning
@pytest.mark.parametrize("damping_mode", ["factored", "eigen"])
def test_step_equals_dense_damped_kronecker_inverse(damping_mode: str) -> None:
    model = net()
    optimizer = KFAC(model, lr=1.0, momentum=0.0, kl_clip=None, damping=0.05,
                     damping_mode=damping_mode, fisher_type="empirical")
    before = snapshot(model)
    x, y = data()
    train_step(model, optimizer, x, y)
    curvature = optimizer.curvature()
    for layer in optimizer.layers:
        a, g = curvature[layer.name]["A"][0].double(), curvature[layer.name]["G"][0].double()
        if damping_mode == "factored":  # (G + d/pi I) (x) (A + d pi I), pi from the traces
            pi = math.sqrt((a.trace() / len(a)) / (g.trace() / len(g)))
            root = math.sqrt(0.05)
            matrix = torch.kron(g + root / pi * torch.eye(len(g)),
                                a + root * pi * torch.eye(len(a)))
            torch.testing.assert_close(curvature[layer.name]["pi"].double(),
                                       torch.tensor([pi], dtype=torch.float64))
        else:
            matrix = torch.kron(g, a) + 0.05 * torch.eye(len(g) * len(a))
        weight, bias = layer.module.weight, layer.module.bias
        grad = layer.matrix(weight.grad, bias.grad)[0].double().flatten()
        expected = torch.linalg.solve(matrix, grad)
        index = [i for i, p in enumerate(model.parameters()) if p is weight][0]
        step = layer.matrix(before[index] - weight.detach(), before[index + 1] - bias.detach())
        torch.testing.assert_close(step[0].double().flatten(), expected, rtol=2e-4, atol=1e-6)


def test_pi_ratio() -> None:
    a = torch.diag(torch.tensor([4.0, 2.0]))[None]
    g = torch.diag(torch.tensor([0.5, 0.1, 0.3]))[None]
    torch.testing.assert_close(pi_ratio(a, g), torch.tensor([math.sqrt(3.0 / 0.3)]))


@pytest.mark.parametrize("fisher_type", ["empirical", "mc"])
def test_update_is_a_descent_direction(fisher_type: str) -> None:
    model = net()
    optimizer = KFAC(model, lr=0.1, momentum=0.0, fisher_type=fisher_type)
    x, y = data()
    for seed in range(4):  # later steps use running factors from other batches
        x, y = data(seed)
        before = snapshot(model)
        train_step(model, optimizer, x, y)
        for old, param in zip(before, model.parameters(), strict=True):
            direction = old - param.detach()  # the step is -lr * d
            assert (direction * param.grad).sum() > 0


def test_mc_passes_leave_the_training_gradient() -> None:
    model, reference = net(), net()
    optimizer = KFAC(model, fisher_type="mc", mc_samples=3)
    x, y = data()
    outputs = model(x)
    optimizer.backward(TASK.loss(outputs, y), outputs=outputs, inputs=x, task=TASK)
    TASK.loss(reference(x), y).backward()
    for param, expected in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(param.grad, expected.grad)
    assert all(len(layer.grads) == 3 for layer in optimizer.layers)  # three MC passes recorded


def test_kl_clip_scales_the_preconditioned_update() -> None:
    x, y = data()
    steps = {}
    for kl_clip in (None, 1e-4):
        model = net()
        optimizer = KFAC(model, lr=0.1, momentum=0.0, kl_clip=kl_clip, fisher_type="empirical")
        before = snapshot(model)
        train_step(model, optimizer, x, y)
        steps[kl_clip] = [old - p.detach()
                          for old, p in zip(before, model.parameters(), strict=True)]
        grads = [p.grad for p in model.parameters()]
    # nu = min(1, sqrt(kl_clip / (lr^2 sum <v, g>))), v the unclipped direction = step / lr
    quadratic = sum((step / 0.1 * grad).sum()
                    for step, grad in zip(steps[None], grads, strict=True))
    nu = math.sqrt(1e-4 / (0.1**2 * float(quadratic)))
    assert nu < 0.5
    for clipped, unclipped in zip(steps[1e-4], steps[None], strict=True):  # float32 noise
        torch.testing.assert_close(clipped, nu * unclipped, rtol=1e-3, atol=1e-7)
        assert clipped.abs().max() > 1e-4


def test_uncovered_parameters_get_the_plain_momentum_step(caplog: pytest.LogCaptureFixture) -> None:
    model = net(batch_norm=True)
    with caplog.at_level(logging.INFO, logger="ngexp"):
        optimizer = KFAC(model, lr=0.05, momentum=0.5, weight_decay=0.1)
    assert optimizer.uncovered_parameters == ["1.weight", "1.bias"]
    assert "1.weight, 1.bias" in caplog.text
    reference_model = net(batch_norm=True)
    bn = reference_model[1]
    sgd = torch.optim.SGD(bn.parameters(), lr=0.05, momentum=0.5, weight_decay=0.1)
    for seed in range(3):
        x, y = data(seed)
        train_step(model, optimizer, x, y)
        sgd.zero_grad()
        TASK.loss(reference_model(x), y).backward()
        sgd.step()
        with torch.no_grad():  # keep the covered layers equal so the BN gradients agree
            for mine, theirs in zip(model.parameters(), reference_model.parameters(), strict=True):
                if theirs is not bn.weight and theirs is not bn.bias:
                    theirs.copy_(mine)
        torch.testing.assert_close(model[1].weight, bn.weight)
        torch.testing.assert_close(model[1].bias, bn.bias)


# ---------------------------------------------------------------------------- schedules
def test_statistics_every_cov_update_freq_steps_and_factor_average() -> None:
    model = net()
    optimizer = KFAC(model, cov_update_freq=3, inv_update_freq=3, stat_decay=0.5,
                     fisher_type="empirical")
    captured, factors = [], []
    for step in range(7):
        x, y = data(step)
        outputs = model(x)
        captured.append(optimizer.capture.captured_inputs)
        optimizer.backward(TASK.loss(outputs, y), outputs=outputs, inputs=x, task=TASK)
        batch_a = optimizer.layers[0].factors(len(x))[0] if captured[-1] else None
        optimizer.step()
        factors.append((batch_a, optimizer.curvature()["0"]["A"].clone()))
    assert captured == [True, False, False, True, False, False, True]
    torch.testing.assert_close(factors[0][1], factors[0][0])  # the first estimate replaces
    # second update: e = min(0.5, 1 - 1/2) = 0.5; third: e = 0.5
    torch.testing.assert_close(factors[3][1], 0.5 * factors[0][1] + 0.5 * factors[3][0])
    torch.testing.assert_close(factors[5][1], factors[3][1])
    torch.testing.assert_close(factors[6][1], 0.5 * factors[3][1] + 0.5 * factors[6][0])
    model.eval()
    model(data()[0])
    assert not optimizer.capture.captured_inputs


def test_exponential_damping_schedule() -> None:
    model = net()
    optimizer = KFAC(model, damping=1e-2, damping_schedule="exponential", damping_decay=0.5,
                     damping_decay_steps=2, damping_min=4e-3)
    values = []
    for step in range(4):
        train_step(model, optimizer, *data(step))
        values.append(optimizer.log_metrics()["damping"])
    assert values == pytest.approx([1e-2 * 0.5**0.5, 5e-3, 4e-3, 4e-3])


@pytest.mark.parametrize(("lr", "direction"), [(1e-4, "down"), (50.0, "up")])
def test_adaptive_damping_follows_the_reduction_ratio(lr: float, direction: str) -> None:
    model = net()
    optimizer = KFAC(model, lr=lr, momentum=0.0, kl_clip=None, damping=1e-2,
                     damping_schedule="adaptive", adapt_interval=1, fisher_type="empirical")
    train_step(model, optimizer, *data())
    omega = 19 / 20
    metrics = optimizer.log_metrics()
    if direction == "down":  # tiny step: the quadratic model is accurate, rho ~ 1
        assert metrics["rho"] == pytest.approx(1.0, abs=0.05)
        assert metrics["damping"] == pytest.approx(1e-2 * omega)
    else:  # huge step: the loss goes up, rho < 1/4
        assert metrics["rho"] < 0.25
        assert metrics["damping"] == pytest.approx(1e-2 / omega)


def test_adaptive_damping_needs_targets() -> None:
    model = net()
    optimizer = KFAC(model, damping_schedule="adaptive")
    x, y = data()
    outputs = model(x)
    with pytest.raises(ValueError, match="targets"):
        optimizer.backward(TASK.loss(outputs, y), outputs=outputs, inputs=x, task=TASK)


# ---------------------------------------------------------------------------- state
def test_resume_continues_bit_identically() -> None:
    options = dict(lr=0.05, fisher_type="mc", mc_samples=2, cov_update_freq=2,
                   inv_update_freq=3, damping_schedule="adaptive", adapt_interval=2,
                   weight_decay=1e-3)
    batches = [data(seed, n=32) for seed in range(12)]
    model = net(batch_norm=True)
    optimizer = KFAC(model, **options)
    for x, y in batches[:5]:
        train_step(model, optimizer, x, y)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    for x, y in batches[5:]:
        train_step(model, optimizer, x, y)

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)
    torch.manual_seed(123)  # a different global RNG state must not matter
    resumed = net(batch_norm=True)
    resumed.load_state_dict(saved["model"])
    resumed_optimizer = KFAC(resumed, **options)
    resumed_optimizer.load_state_dict(saved["optimizer"])
    for x, y in batches[5:]:
        train_step(resumed, resumed_optimizer, x, y)
    for mine, theirs in zip(model.state_dict().values(), resumed.state_dict().values(),
                            strict=True):
        assert torch.equal(mine, theirs)
    assert optimizer.log_metrics() == resumed_optimizer.log_metrics()


def test_reset_state_clears_moments_and_curvature() -> None:
    model = net()
    optimizer = KFAC(model, cov_update_freq=5, inv_update_freq=5)
    for step in range(3):
        train_step(model, optimizer, *data(step))
    assert optimizer.curvature() and optimizer.state
    optimizer.reset_state()
    assert not optimizer.curvature() and not optimizer.state
    x, y = data(7)
    outputs = model(x)  # step 3 is no statistics step, but a reset one captures
    assert optimizer.capture.captured_inputs
    optimizer.backward(TASK.loss(outputs, y), outputs=outputs, inputs=x, task=TASK)
    optimizer.step()
    assert set(optimizer.curvature()["0"]) == {"A", "G", "U_A", "U_G", "lambda_A", "lambda_G", "pi"}
    assert optimizer.counters == {"step": 4, "factor_updates": 1}


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_failed_eigendecomposition_keeps_previous_basis(bad: float) -> None:
    model = net()
    optimizer = KFAC(model, cov_update_freq=100, inv_update_freq=1)
    for step in range(2):
        train_step(model, optimizer, *data(step))
    state = optimizer.curvature()["0"]
    previous = state["U_A"].clone(), state["lambda_A"].clone(), state["pi"].clone()
    state["A"][0, 0, 0] = bad
    train_step(model, optimizer, *data(5))
    state = optimizer.curvature()["0"]
    assert torch.equal(state["U_A"], previous[0]) and torch.equal(state["lambda_A"], previous[1])
    assert torch.equal(state["pi"], previous[2])
    assert optimizer.log_metrics()["kept_bases"] == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_non_finite_batch_statistics_are_skipped() -> None:
    model = net()
    optimizer = KFAC(model, cov_update_freq=1)
    train_step(model, optimizer, *data())
    factor = optimizer.curvature()["0"]["A"].clone()
    x, y = data(1)
    x[0, 0] = float("inf")
    outputs = model(x)
    optimizer.backward(TASK.loss(outputs, y), outputs=outputs, inputs=x, task=TASK)
    for param in model.parameters():
        param.grad = torch.nan_to_num(param.grad, nan=0.0, posinf=0.0, neginf=0.0)
    optimizer.step()
    assert torch.equal(optimizer.curvature()["0"]["A"], factor)
    assert optimizer.log_metrics()["skipped_statistics"] >= 1
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ---------------------------------------------------------------------------- config
def test_config_checks_name_key_and_choices() -> None:
    with pytest.raises(ValueError, match="optimizer.stat_decay=1.5"):
        KFACConfig(stat_decay=1.5)
    with pytest.raises(ValueError, match="optimizer.damping_mode='tikhonov'.*factored, eigen"):
        KFACConfig(damping_mode="tikhonov")
    with pytest.raises(ValueError, match="optimizer.mc_samples=4"):
        KFACConfig(fisher_type="empirical", mc_samples=4)
    with pytest.raises(ValueError, match="optimizer.damping_min"):
        KFACConfig(damping=1e-3, damping_min=1e-2)


@pytest.mark.parametrize("option", ["kfac", "ekfac"])
def test_option_composes_and_builds(option: str) -> None:
    cfg = compose(f"optimizer={option}", "optimizer.damping=0.01")
    optimizer = build_optimizer(cfg.optimizer, net())
    assert type(optimizer).__name__ == option.upper()
    assert optimizer.options.damping == 0.01
    assert optimizer.options.lr == cfg.optimizer.lr
    with pytest.raises(ValueError, match="optimizer.cov_update_freq"):
        from omegaconf import OmegaConf

        OmegaConf.to_object(compose(f"optimizer={option}", "optimizer.cov_update_freq=0"))


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
