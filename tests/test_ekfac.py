"""EKFAC preconditioner (ngexp/optim/ekfac.py) against dense computations."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

from ngexp.curvature.capture import TRAINING
from ngexp.curvature.kronecker import PassGroup, eigenbasis_moments, pass_groups
from ngexp.curvature.tasks import Classification
from ngexp.optim.ekfac import EKFAC
from ngexp.optim.kronecker_terms import LayerGradient, eigenbasis_precondition
from tests.curvature_reference import (
    capture_factors,
    captured,
    empirical_fisher_block,
    per_example_matrices,
)
from tests.preconditioning import documented_step, sgd

TASK = Classification()


def conv_net() -> tuple[nn.Module, Tensor, Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, stride=2), nn.ReLU(), nn.Flatten(),
                          nn.Linear(3 * 3 * 3, 4))
    return model, torch.randn(32, 2, 6, 6), torch.randint(0, 4, (32,))


def train_step(model: nn.Module, pre: EKFAC, opt: torch.optim.Optimizer, x: Tensor,
               y: Tensor) -> None:
    documented_step(model, pre, opt, TASK, x, y)


def precondition(grad: Tensor, basis_a: Tensor, basis_g: Tensor, scale: Tensor) -> Tensor:
    """The eigenbasis preconditioning of a bias-free gradient matrix ``(groups, d_out, d_in)``."""
    return eigenbasis_precondition(LayerGradient(grad, None), basis_a, basis_g, scale)


def test_eigenbasis_round_trip_with_unit_scaling_returns_the_input() -> None:
    torch.manual_seed(0)
    grad = torch.randn(2, 5, 7)
    basis_a = torch.linalg.qr(torch.randn(2, 7, 7))[0]
    basis_g = torch.linalg.qr(torch.randn(2, 5, 5))[0]
    torch.testing.assert_close(precondition(grad, basis_a, basis_g, torch.ones(2, 5, 7)), grad,
                               rtol=1e-5, atol=1e-6)


def test_preconditioning_inverts_the_eigenvalue_corrected_matrix() -> None:
    """vec(V) = (U diag(s) U^T)^-1 vec(M) with U = U_G (x) U_A in the row-major layout: a
    transposed basis anywhere (the known orientation bug) fails this."""
    torch.manual_seed(1)
    grad = torch.randn(1, 4, 6, dtype=torch.float64)
    basis_a = torch.linalg.qr(torch.randn(1, 6, 6, dtype=torch.float64))[0]
    basis_g = torch.linalg.qr(torch.randn(1, 4, 4, dtype=torch.float64))[0]
    scale = torch.rand(1, 4, 6, dtype=torch.float64) + 0.1
    basis = torch.kron(basis_g[0], basis_a[0])
    dense = basis @ torch.diag(scale.flatten()) @ basis.T
    expected = torch.linalg.solve(dense, grad.flatten())
    ours = precondition(grad, basis_a, basis_g, scale)
    torch.testing.assert_close(ours.flatten(), expected)


def test_scaling_is_the_exact_fisher_diagonal_in_the_kronecker_eigenbasis() -> None:
    """s = diag(U^T F U) of the layer's empirical Fisher on the batch, hence EKFAC is at least as
    close to F as K-FAC (Frobenius; George et al. 2018, Sec. 3.2), strictly here."""
    model, x, y = conv_net()
    factors = capture_factors(model, TASK, x, y)
    capture = captured(model, TASK, x, y)
    for layer in capture.layers:
        a, g = factors[layer.name]
        basis_a, basis_g = torch.linalg.eigh(a).eigenvectors, torch.linalg.eigh(g).eigenvectors
        scale = eigenbasis_moments(layer, [PassGroup(-1, capture.passes(TRAINING), len(x))],
                                       basis_a, basis_g, len(x))
        capture.active = False
        exact = empirical_fisher_block(
            per_example_matrices(model, TASK, x, y, layer, f"{layer.name}.")[:, 0])
        capture.active = True
        basis = torch.kron(basis_g[0], basis_a[0]).double()
        torch.testing.assert_close(scale[0].flatten().double(),
                                   (basis.T @ exact @ basis).diagonal(), rtol=1e-4, atol=1e-9)
        kfac = torch.kron(g[0], a[0]).double()
        ekfac = basis @ torch.diag(scale[0].flatten().double()) @ basis.T
        kfac_error = (exact - kfac).norm()
        assert (exact - ekfac).norm() < kfac_error
        assert kfac_error > 1e-3 * exact.norm()  # K-FAC is not exact here: the test has teeth
    capture.remove()


def test_step_equals_dense_inverse_of_damped_scaling() -> None:
    model, x, y = conv_net()
    pre = EKFAC(model, kl_clip=None, damping=0.01, fisher_type="empirical")
    opt = sgd(model)
    raw, _, _ = conv_net()
    TASK.loss(raw(x), y).backward()
    raw_grads = {name: p.grad for name, p in raw.named_parameters()}
    before = [p.detach().clone() for p in model.parameters()]
    train_step(model, pre, opt, x, y)
    params = list(model.parameters())
    for layer in pre.layers:
        state = pre.curvature()[layer.name]
        basis = torch.kron(state["U_G"][0], state["U_A"][0]).double()
        dense = basis @ torch.diag(state["s"][0].flatten().double() + 0.01) @ basis.T
        grad = layer.matrix(raw_grads[f"{layer.name}.weight"],
                            raw_grads[f"{layer.name}.bias"])[0].double()
        index = next(i for i, p in enumerate(params) if p is layer.module.weight)
        step = layer.matrix(before[index] - params[index].detach(),
                            before[index + 1] - params[index + 1].detach())
        torch.testing.assert_close(step[0].double().flatten(),
                                   torch.linalg.solve(dense, grad.flatten()), rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("fisher_type", ["empirical", "mc"])
def test_scaling_refresh_schedule_and_running_average(fisher_type: str) -> None:
    """``s`` is re-estimated every ``scale_update_freq`` steps from that step's passes of the
    Fisher type (MC: targets sampled on those steps too, not only on statistics steps), as the
    running average ``e = min(scale_decay, 1 - 1/k)``."""
    model, x, y = conv_net()
    pre = EKFAC(model, cov_update_freq=10, inv_update_freq=10, scale_update_freq=2,
                scale_decay=0.5, fisher_type=fisher_type)
    opt = sgd(model, lr=0.1)
    was_captured, scales, batches = [], [], []
    for step in range(5):
        batch = x[step::2][:16], y[step::2][:16]
        opt.zero_grad()
        outputs = model(batch[0])
        was_captured.append(pre.capture.captured_inputs)
        pre.backward(TASK.loss(outputs, batch[1]), outputs, batch[1])
        state = pre.curvature().get("3")
        if was_captured[-1] and state is not None:  # this batch's moments in the current basis
            groups, terms = pass_groups(pre.capture, fisher_type, TASK)
            batches.append(eigenbasis_moments(pre.layers[1], groups, state["U_A"], state["U_G"],
                                              terms))
        pre.step()
        opt.step()
        scales.append(pre.curvature()["3"]["s"].clone())
    assert was_captured == [True, False, True, False, True]
    torch.testing.assert_close(scales[1], scales[0])
    torch.testing.assert_close(scales[2], 0.5 * scales[1] + 0.5 * batches[0])  # e = min(.5, 1/2)
    torch.testing.assert_close(scales[4], 0.5 * scales[3] + 0.5 * batches[1])
    assert not torch.equal(scales[4], scales[2])


def test_mc_scaling_step_without_sampled_passes_raises() -> None:
    """A scaling step that is not a statistics step still needs ``pre.backward`` with MC."""
    model, x, y = conv_net()
    pre = EKFAC(model, cov_update_freq=10, scale_update_freq=1, fisher_type="mc")
    opt = sgd(model, lr=0.1)
    train_step(model, pre, opt, x, y)
    opt.zero_grad()
    TASK.loss(model(x), y).backward()
    with pytest.raises(RuntimeError, match="pre.backward"):
        pre.step()


def test_resume_continues_bit_identically() -> None:
    model, x, y = conv_net()
    options = dict(fisher_type="mc", cov_update_freq=2, inv_update_freq=3, scale_decay=0.9)
    pre, opt = EKFAC(model, **options), sgd(model, lr=0.05, momentum=0.9)
    batches = [(x[i:i + 8], y[i:i + 8]) for i in range(0, 32, 4)]
    for batch in batches[:3]:
        train_step(model, pre, opt, *batch)
    saved = copy.deepcopy((model.state_dict(), pre.state_dict(), opt.state_dict()))
    for batch in batches[3:]:
        train_step(model, pre, opt, *batch)
    resumed, _, _ = conv_net()
    resumed.load_state_dict(saved[0])
    resumed_pre, resumed_opt = EKFAC(resumed, **options), sgd(resumed, lr=0.05, momentum=0.9)
    resumed_pre.load_state_dict(saved[1])
    resumed_opt.load_state_dict(saved[2])
    for batch in batches[3:]:
        train_step(resumed, resumed_pre, resumed_opt, *batch)
    assert resumed_pre.counters == pre.counters
    for mine, theirs in zip(model.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(mine, theirs)


@pytest.mark.parametrize("fisher_type", ["empirical", "mc"])
def test_learns_a_small_problem(fisher_type: str) -> None:
    model, x, y = conv_net()
    pre, opt = EKFAC(model, fisher_type=fisher_type, inv_update_freq=5), sgd(model, 0.1, 0.9)
    with torch.no_grad():
        initial = float(TASK.loss(model(x), y))
    for _ in range(30):
        train_step(model, pre, opt, x, y)
    with torch.no_grad():
        assert float(TASK.loss(model(x), y)) < 0.5 * initial
