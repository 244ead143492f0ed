"""Shampoo, SOAP, Muon and NAdamW: each against its update written densely or torch's own
optimizer on a tiny problem, resumed bit-identically through ngexp's checkpoint files with an lr
schedule and gradient clipping, and built from the command line's config."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from ngexp.optim.build import build_optimizer
from ngexp.optim.muon import Muon, split_parameters
from ngexp.optim.shampoo import Shampoo
from ngexp.optim.soap import soap
from ngexp.optim.training import TrainingOptimizer
from ngexp.train.checkpoint import read_checkpoint, save_checkpoint
from tests.helpers import compose

STEPS = 6


def fixed_grads(shapes: list[torch.Size], steps: int, seed: int = 0) -> list[list[Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [[torch.randn(shape, generator=generator, dtype=torch.float64) for shape in shapes]
            for _ in range(steps)]


def run(optimizer: torch.optim.Optimizer, params: list[Tensor], grads: list[list[Tensor]]) -> None:
    for step in grads:
        for p, g in zip(params, step, strict=True):
            p.grad = g.clone()
        optimizer.step()


def fractional_power(matrix: Tensor, power: float) -> Tensor:
    values, vectors = torch.linalg.eigh(matrix)
    return vectors @ torch.diag(values.pow(power)) @ vectors.T


# ---------------------------------------------------------------------------- Shampoo
def dense_shampoo(w: Tensor, b: Tensor, grads: list[list[Tensor]], lr: float, betas, eps: float,
                  frequency: int, max_dim: int, start: int = 1, graft_beta2: float = 0.999,
                  graft_eps: float = 1e-8) -> tuple[Tensor, Tensor]:
    """Shampoo with Adam grafting as in ngexp/optim/shampoo.py's docstring, the Kronecker
    preconditioner applied as the full matrix ``(L (x) R)^(-1/2k)`` on ``vec(M)``."""
    beta1, beta2 = betas
    w, b = w.clone(), b.clone()
    m, n = w.shape
    left, right = torch.zeros(m, m, dtype=w.dtype), torch.zeros(n, n, dtype=w.dtype)
    moments = [torch.zeros_like(w), torch.zeros_like(b)]
    squares = [torch.zeros_like(w), torch.zeros_like(b)]
    full = None
    for t, (gw, gb) in enumerate(grads, start=1):
        directions = []
        for i, g in enumerate((gw, gb)):
            moments[i] = beta1 * moments[i] + (1 - beta1) * g
            squares[i] = graft_beta2 * squares[i] + (1 - graft_beta2) * g * g
            directions.append((moments[i] / (1 - beta1 ** t))
                              / ((squares[i] / (1 - graft_beta2 ** t)).sqrt() + graft_eps))
        left = beta2 * left + (1 - beta2) * gw @ gw.T
        right = beta2 * right + (1 - beta2) * gw.T @ gw
        if (t - 1) % frequency == 0:
            sides = [side for side, size in ((left, m), (right, n)) if size <= max_dim]
            eye_l, eye_r = torch.eye(m, dtype=w.dtype), torch.eye(n, dtype=w.dtype)
            lhat = left / (1 - beta2 ** t) + eps * eye_l if m <= max_dim else eye_l
            rhat = right / (1 - beta2 ** t) + eps * eye_r if n <= max_dim else eye_r
            full = fractional_power(torch.kron(lhat, rhat), -1 / (2 * len(sides)))
        filtered = moments[0] / (1 - beta1 ** t)
        shampoo = (full @ filtered.flatten()).view(m, n)
        w -= lr * (directions[0].norm() / shampoo.norm() * shampoo if t >= start
                   else directions[0])  # Adam (the graft) before start_preconditioning_step
        b -= lr * directions[1]
    return w, b


@pytest.mark.parametrize(("frequency", "max_dim", "start"), [(1, 100, 1), (2, 100, 1),
                                                            (1, 3, 1), (2, 100, 4)])
def test_shampoo_equals_its_dense_update(frequency: int, max_dim: int, start: int) -> None:
    """Two-sided (-1/4 roots, refreshed every step or every other step), one-sided (the
    4-wide side over max_precondition_dim keeps the identity: -1/2 root on the 3-wide side),
    and Adam grafting alone for the first 3 steps."""
    w = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    b = torch.zeros(3, dtype=torch.float64)
    grads = fixed_grads([w.shape, b.shape], STEPS)
    expected = dense_shampoo(w, b, grads, 0.1, (0.9, 0.99), 1e-3, frequency, max_dim, start)
    params = [w.clone().requires_grad_(), b.clone().requires_grad_()]
    optimizer = Shampoo(params, lr=0.1, betas=(0.9, 0.99), eps=1e-3,
                        precondition_frequency=frequency, max_precondition_dim=max_dim,
                        start_preconditioning_step=start)
    run(optimizer, params, grads)
    for got, want in zip(params, expected, strict=True):
        torch.testing.assert_close(got.detach(), want, rtol=1e-10, atol=1e-12)


def test_shampoo_conv_kernel_is_preconditioned_as_a_matrix() -> None:
    generator = torch.Generator().manual_seed(2)
    kernel = torch.randn(2, 3, 2, 2, dtype=torch.float64, generator=generator)
    grads = fixed_grads([kernel.shape], 3)
    as_matrix = kernel.reshape(2, -1).clone().requires_grad_()
    param = kernel.clone().requires_grad_()
    run(Shampoo([param], lr=0.1), [param], grads)
    run(Shampoo([as_matrix], lr=0.1), [as_matrix], [[g.reshape(2, -1) for g in s] for s in grads])
    assert torch.equal(param.detach().reshape(2, -1), as_matrix.detach())


# ---------------------------------------------------------------------------- SOAP
def dense_soap(w: Tensor, b: Tensor, grads: list[list[Tensor]], lr: float, betas, eps: float,
               weight_decay: float, frequency: int) -> tuple[Tensor, Tensor]:
    """SOAP (Vyas et al. 2024, Alg. 3 and 4) with the projection onto the eigenbasis written as
    the Kronecker product ``Q_L (x) Q_R`` acting on ``vec``; the bias (1-D) gets Adam."""
    beta1, beta2 = betas
    w, b = w.clone(), b.clone()
    m, n = w.shape
    left, right = torch.zeros(m, m, dtype=w.dtype), torch.zeros(n, n, dtype=w.dtype)
    moments = [torch.zeros_like(w), torch.zeros_like(b)]
    squares = [torch.zeros_like(w), torch.zeros_like(b)]
    bases: list[Tensor] = []
    for t, (gw, gb) in enumerate(grads, start=1):
        s = t - 1  # the first step only builds the factors and the bases
        if s > 0:
            kron = torch.kron(bases[0], bases[1])
            projected = (kron.T @ gw.flatten()).view(m, n)
            moments[0] = beta1 * moments[0] + (1 - beta1) * gw
            moments[1] = beta1 * moments[1] + (1 - beta1) * gb
            squares[0] = beta2 * squares[0] + (1 - beta2) * projected ** 2
            squares[1] = beta2 * squares[1] + (1 - beta2) * gb ** 2
            scaled = (kron.T @ moments[0].flatten()).view(m, n) / (squares[0].sqrt() + eps)
            direction = (kron @ scaled.flatten()).view(m, n)
            step = lr * math.sqrt(1 - beta2 ** s) / (1 - beta1 ** s)
            w = (w - step * direction) * (1 - lr * weight_decay)
            b = (b - step * moments[1] / (squares[1].sqrt() + eps)) * (1 - lr * weight_decay)
        left = beta2 * left + (1 - beta2) * gw @ gw.T
        right = beta2 * right + (1 - beta2) * gw.T @ gw
        if s == 0:
            bases = [torch.linalg.eigh(f)[1].flip(1) for f in (left, right)]
        elif s % frequency == 0:  # one power iteration and a QR, sorted by estimated eigenvalue
            for side, factor in enumerate((left, right)):
                estimate = (bases[side] * (factor @ bases[side])).sum(0)
                order = torch.argsort(estimate, descending=True)
                squares[0] = squares[0].index_select(side, order)
                bases[side] = torch.linalg.qr((factor @ bases[side])[:, order])[0]
    return w, b


@pytest.mark.parametrize("frequency", [2, 100])
def test_soap_equals_its_dense_update(frequency: int) -> None:
    w = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    b = torch.zeros(3, dtype=torch.float64)
    grads = fixed_grads([w.shape, b.shape], STEPS)
    expected = dense_soap(w, b, grads, 0.05, (0.9, 0.95), 1e-8, 0.1, frequency)
    params = [w.clone().requires_grad_(), b.clone().requires_grad_()]
    run(soap(params, lr=0.05, betas=(0.9, 0.95), weight_decay=0.1,
             precondition_frequency=frequency), params, grads)
    tolerance = 1e-11 if frequency > STEPS else 1e-7  # pytorch-optimizer's QR runs in float32
    for got, want in zip(params, expected, strict=True):
        torch.testing.assert_close(got.detach(), want, rtol=100 * tolerance, atol=tolerance)


# ---------------------------------------------------------------------------- Muon
class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(5, 4)
        self.conv = nn.Conv1d(4, 6, 3)
        self.norm = nn.LayerNorm(6)
        self.hidden = nn.Linear(6, 8)
        self.out = nn.Linear(8, 3)

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.conv(self.embed(tokens).transpose(1, 2)).mean(2)
        return self.out(torch.relu(self.hidden(self.norm(x))))


@pytest.mark.parametrize("shape", [(6, 12), (12, 6), (5, 5)])
def test_newton_schulz_in_float32_is_the_float64_iteration_and_close_to_torch(
        shape: tuple[int, int]) -> None:
    """``ns_dtype=float32`` (the CPU's ``auto``) runs the same iteration as torch's bfloat16 one
    at float32 precision: equal to it run in float64 to 1e-5, within bfloat16's rounding of
    torch's result, and it leaves its input (the momentum buffer without Nesterov) alone."""
    from torch.optim._muon import DEFAULT_A, DEFAULT_B, DEFAULT_C, _zeropower_via_newtonschulz

    from ngexp.optim.muon import newton_schulz, newton_schulz_dtype

    torch.manual_seed(0)
    matrix = torch.randn(shape)
    before = matrix.clone()
    abc = (DEFAULT_A, DEFAULT_B, DEFAULT_C)
    ours = newton_schulz(matrix, abc, 5, 1e-7, torch.float32)
    exact = newton_schulz(matrix.double(), abc, 5, 1e-7, torch.float64)
    torch.testing.assert_close(ours.double(), exact, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours, _zeropower_via_newtonschulz(matrix, abc, 5, 1e-7).float(),
                               rtol=0.05, atol=0.05)
    assert torch.equal(newton_schulz(matrix, abc, 5, 1e-7, torch.bfloat16),
                       _zeropower_via_newtonschulz(matrix, abc, 5, 1e-7))
    assert torch.equal(matrix, before)
    assert newton_schulz_dtype("auto", torch.device("cpu")) == torch.float32
    assert newton_schulz_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert newton_schulz_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16


def test_muon_splits_the_parameters_by_the_usual_rule() -> None:
    muon, adam = split_parameters(Net())
    assert muon == ["conv.weight", "hidden.weight"]
    assert adam == ["embed.weight", "conv.bias", "norm.weight", "norm.bias", "hidden.bias",
                    "out.weight", "out.bias"]


def test_muon_steps_equal_torch_muon_and_adamw() -> None:
    """Hidden matrices step as ``torch.optim.Muon`` (the conv kernel as its ``(6, 12)``
    matrix), the rest as ``torch.optim.AdamW`` with the auxiliary settings."""
    torch.manual_seed(0)
    model = Net()
    names = [n for n, _ in model.named_parameters()]
    grads = fixed_grads([p.shape for p in model.parameters()], 4)
    grads = [[g.float() for g in step] for step in grads]
    reference = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = Muon(model, lr=0.05, weight_decay=0.1, adam_lr=0.01, adam_weight_decay=0.2,
                     ns_dtype="bfloat16")
    run(optimizer, list(model.parameters()), grads)

    muon_names, adam_names = split_parameters(model)
    matrices = {n: reference[n].reshape(len(reference[n]), -1).clone().requires_grad_()
                for n in muon_names}
    rest = {n: reference[n].clone().requires_grad_() for n in adam_names}
    torch_muon = torch.optim.Muon(list(matrices.values()), lr=0.05, weight_decay=0.1)
    torch_adamw = torch.optim.AdamW(list(rest.values()), lr=0.01, betas=(0.9, 0.95),
                                    weight_decay=0.2)
    for step in grads:
        by_name = dict(zip(names, step, strict=True))
        for n, p in matrices.items():
            p.grad = by_name[n].reshape(p.shape).clone()
        for n, p in rest.items():
            p.grad = by_name[n].clone()
        torch_muon.step()
        torch_adamw.step()
    params = dict(model.named_parameters())
    for n, p in {**matrices, **rest}.items():
        assert torch.equal(params[n].detach().reshape(p.shape), p.detach()), n


# ---------------------------------------------------------------------------- NAdamW
def dense_nadamw(w: Tensor, grads: list[Tensor], lr: float, betas: tuple[float, float],
                 eps: float, weight_decay: float, psi: float) -> Tensor:
    """NAdam with torch's momentum schedule and decoupled weight decay, as in NAdamWConfig's
    docstring: ``mu_t = beta1 (1 - 0.96^(t psi) / 2)``, the gradient term corrected by
    ``1 - mu_1...mu_t``, the momentum term by ``1 - mu_1...mu_{t+1}``."""
    beta1, beta2 = betas
    w, m, v, product = w.clone(), torch.zeros_like(w), torch.zeros_like(w), 1.0
    for t, g in enumerate(grads, start=1):
        w = w * (1 - lr * weight_decay)
        mu, mu_next = (beta1 * (1 - 0.5 * 0.96 ** (s * psi)) for s in (t, t + 1))
        product *= mu
        m, v = beta1 * m + (1 - beta1) * g, beta2 * v + (1 - beta2) * g * g
        direction = (1 - mu) / (1 - product) * g + mu_next / (1 - product * mu_next) * m
        w = w - lr * direction / ((v / (1 - beta2 ** t)).sqrt() + eps)
    return w


def test_nadamw_equals_its_dense_update() -> None:
    """Five steps of ``optimizer=nadamw`` (torch's NAdam, built from the config) on a 3 x 4
    weight in float64, with weight decay 0.1 and a fast momentum schedule (psi 0.5)."""
    cfg = compose("optimizer=nadamw", "optimizer.lr=0.01", "optimizer.weight_decay=0.1",
                  "optimizer.momentum_decay=0.5")
    layer = nn.Linear(4, 3, bias=False).double()
    start = layer.weight.detach().clone()
    optimizer = build_optimizer(cfg.optimizer, layer, None).optimizer
    assert type(optimizer) is torch.optim.NAdam and optimizer.defaults["decoupled_weight_decay"]
    grads = [g for (g,) in fixed_grads([start.shape], 5)]
    run(optimizer, [layer.weight], [[g] for g in grads])
    want = dense_nadamw(start, grads, 0.01, (0.9, 0.999), 1e-8, 0.1, 0.5)
    # the displacement to 1e-6: torch keeps the step count and mu_1...mu_t in float32
    torch.testing.assert_close(layer.weight.detach() - start, want - start, rtol=1e-6, atol=0)


# ---------------------------------------------------------------------------- engine features
def make(name: str, model: nn.Module) -> torch.optim.Optimizer:
    params = list(model.parameters())
    if name == "shampoo":
        return Shampoo(params, lr=0.01, precondition_frequency=3, weight_decay=0.01)
    if name == "soap":
        return soap(params, lr=0.01, precondition_frequency=3, weight_decay=0.01)
    return Muon(model, lr=0.02, adam_lr=0.01)


def lenet_like() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 16, 10),
                         nn.ReLU(), nn.Linear(10, 4))


@pytest.mark.parametrize("name", ["shampoo", "soap", "muon"])
def test_resume_from_a_checkpoint_is_bit_identical(name: str, tmp_path: Path) -> None:
    """8 steps straight equal 4 steps, a checkpoint written and read by ngexp (weights_only),
    then 4 steps on a fresh model and optimizer; with a cosine lr schedule and clipping."""
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 16, 1, 6, 6, generator=generator), torch.randint(0, 4, (8, 16),
                                                                             generator=generator)

    def setup(model: nn.Module) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
        optimizer = make(name, model)
        return optimizer, torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / 8)))

    def train(model: nn.Module, optimizer: torch.optim.Optimizer, schedule, steps: range) -> None:
        for step in steps:
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x[step]), y[step]).backward()
            nn.utils.clip_grad_norm_(model.parameters(), 0.5)
            optimizer.step()
            schedule.step()

    torch.manual_seed(0)
    straight = lenet_like()
    resumed = copy.deepcopy(straight)
    train(straight, *setup(straight), range(8))
    optimizer, schedule = setup(resumed)
    train(resumed, optimizer, schedule, range(4))
    save_checkpoint(tmp_path / "last.pt", {"model": resumed.state_dict(),
                                           "optimizer": TrainingOptimizer(optimizer).state_dict(),
                                           "scheduler": schedule.state_dict()})
    state = read_checkpoint(tmp_path / "last.pt")
    fresh = lenet_like()
    fresh.load_state_dict(state["model"])
    optimizer, schedule = setup(fresh)
    TrainingOptimizer(optimizer).load_state_dict(state["optimizer"])
    schedule.load_state_dict(state["scheduler"])
    train(fresh, optimizer, schedule, range(4, 8))
    for (key, want), got in zip(straight.state_dict().items(), fresh.state_dict().values(),
                                strict=True):
        assert torch.equal(got, want), key


@pytest.mark.parametrize("name", ["shampoo", "soap", "muon", "nadamw"])
def test_option_composes_and_builds(name: str) -> None:
    cfg = compose(f"optimizer={name}", "optimizer.lr=0.5")
    built = build_optimizer(cfg.optimizer, lenet_like(), None)
    assert type(built.optimizer).__name__ == {"shampoo": "Shampoo", "soap": "SOAP",
                                              "muon": "Muon", "nadamw": "NAdam"}[name]
    assert built.preconditioner is None and built.param_groups[0]["lr"] == 0.5
