"""Shampoo (Gupta, Koren & Singer 2018) with the choices of Meta's Distributed Shampoo (Shi et al.
2023, the AlgoPerf 2024 external-tuning winner): moving-average factors, a filtered gradient
and Adam grafting.

For a parameter with gradient ``G`` viewed as a matrix ``(m, n)`` (a kernel ``(out, in, kh,
kw)`` as ``(out, in kh kw)``), at step ``t``::

    L_t = beta2 L_{t-1} + (1 - beta2) G G^T         R_t = beta2 R_{t-1} + (1 - beta2) G^T G
    M_t = beta1 M_{t-1} + (1 - beta1) G             (filtered gradient, bias-corrected: M^)
    P_t = (L^_t + eps I)^(-1/2k) M^_t (R^_t + eps I)^(-1/2k)         (Gupta et al., Alg. 2)
    V_t = beta2_graft V_{t-1} + (1 - beta2_graft) G*G,   A_t = M^_t / (sqrt(V^_t) + graft_eps)
    W  <- (1 - lr wd) W - lr (||A_t|| / ||P_t||) P_t                     (Adam grafting)

``L^ = L / (1 - beta2^t)`` (bias correction), ``k`` the number of preconditioned sides (2; 1 when
a side is longer than ``max_precondition_dim``, which keeps the identity there). The inverse
roots are recomputed every ``precondition_frequency`` steps from an eigendecomposition (float32,
float64 retry). 1-D parameters, and every parameter before ``start_preconditioning_step``, take
the grafted Adam direction ``A_t`` itself. ``(L (x) R)^(-1/4) vec(M) = vec(L^(-1/4) M R^(-1/4))``
is the full-matrix preconditioner the Kronecker product approximates.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ngexp.optim.closure import closure_loss
from ngexp.options import (
    check,
    check_integer,
    check_nonnegative,
    check_positive,
    checked,
    configurable,
    is_number,
)


def inverse_root(factor: Tensor, eps: float, exponent: float) -> Tensor:
    """``(factor + eps I)^-exponent`` of a symmetric PSD ``(d, d)`` matrix by eigendecomposition
    (eigenvalues below 0 from rounding clamped to 0), float64 on failure."""
    try:
        values, vectors = torch.linalg.eigh(factor)
    except RuntimeError:
        values, vectors = torch.linalg.eigh(factor.double())
    scale = (values.clamp_min(0) + eps).pow(-exponent)
    return ((vectors * scale) @ vectors.T).to(factor.dtype)


def check_shampoo(lr: float, betas: tuple[float, float], eps: float, weight_decay: float,
                  graft_beta2: float, graft_eps: float, precondition_frequency: int,
                  start_preconditioning_step: int, max_precondition_dim: int, **_: Any) -> None:
    check_positive("lr", lr)
    check(len(betas) == 2 and all(is_number(b) and 0 <= b < 1 for b in betas), "betas", betas,
          "two numbers in [0, 1)")
    check_positive("eps", eps)
    check_nonnegative("weight_decay", weight_decay)
    check(is_number(graft_beta2) and 0 <= graft_beta2 < 1, "graft_beta2", graft_beta2,
          "a number in [0, 1)")
    check_positive("graft_eps", graft_eps)
    check_integer("precondition_frequency", precondition_frequency, 1)
    check_integer("start_preconditioning_step", start_preconditioning_step, 1)
    check_integer("max_precondition_dim", max_precondition_dim, 1)


@configurable("optimizer", "shampoo")
@checked(check_shampoo)
class Shampoo(torch.optim.Optimizer):
    """Shampoo with Adam grafting (module docstring). Defaults follow Meta's Distributed
    Shampoo (betas (0.9, 0.999), eps 1e-12, Adam grafting with beta2 0.999 and eps 1e-8,
    roots refreshed every 10 steps from step 1 on)."""

    def __init__(self, params: Any, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-12, weight_decay: float = 0.0,
                 precondition_frequency: int = 10, start_preconditioning_step: int = 1,
                 max_precondition_dim: int = 8192, graft_beta2: float = 0.999,
                 graft_eps: float = 1e-8) -> None:
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay,
                    "precondition_frequency": precondition_frequency,
                    "start_preconditioning_step": start_preconditioning_step,
                    "max_precondition_dim": max_precondition_dim, "graft_beta2": graft_beta2,
                    "graft_eps": graft_eps}
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = closure_loss(closure)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, group)
        return loss

    def _update(self, p: Tensor, group: dict[str, Any]) -> None:
        beta1, beta2 = group["betas"]
        grad = p.grad
        state = self.state[p]
        if not state:
            state["step"] = torch.tensor(0.0, device="cpu")  # on the host: read every step
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
            state["graft_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
            if p.ndim >= 2:
                for side, size in enumerate((len(p), p[0].numel())):
                    if size <= group["max_precondition_dim"]:
                        state[f"factor_{side}"] = p.new_zeros(size, size)
                        state[f"root_{side}"] = torch.eye(size, dtype=p.dtype, device=p.device)
        state["step"] += 1
        t = int(state["step"].item())
        state["exp_avg"].lerp_(grad, 1 - beta1)
        state["graft_exp_avg_sq"].mul_(group["graft_beta2"]).addcmul_(
            grad, grad, value=1 - group["graft_beta2"])
        filtered = state["exp_avg"] / (1 - beta1 ** t)
        second = state["graft_exp_avg_sq"] / (1 - group["graft_beta2"] ** t)
        direction = filtered / (second.sqrt() + group["graft_eps"])
        sides = [side for side in (0, 1) if f"factor_{side}" in state]
        if sides:
            matrix = grad.reshape(len(p), -1)
            for side in sides:
                gram = matrix @ matrix.T if side == 0 else matrix.T @ matrix
                state[f"factor_{side}"].lerp_(gram, 1 - beta2)
            if (t - 1) % group["precondition_frequency"] == 0:
                for side in sides:
                    state[f"root_{side}"] = inverse_root(
                        state[f"factor_{side}"] / (1 - beta2 ** t), group["eps"],
                        1 / (2 * len(sides)))
            if t >= group["start_preconditioning_step"]:
                shampoo = state["root_0"] @ filtered.reshape(len(p), -1) @ state["root_1"] \
                    if len(sides) == 2 else (
                        state["root_0"] @ filtered.reshape(len(p), -1) if sides == [0]
                        else filtered.reshape(len(p), -1) @ state["root_1"])
                scale = direction.norm() / shampoo.norm().clamp_min(torch.finfo(p.dtype).tiny)
                direction = (shampoo * scale).view_as(p)
        p.mul_(1 - group["lr"] * group["weight_decay"])
        p.add_(direction, alpha=-group["lr"])
