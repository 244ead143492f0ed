"""Muon (Jordan et al. 2024) for the hidden weight matrices, AdamW for the rest, in one optimizer.

Muon orthogonalizes the (Nesterov) momentum ``B`` of a weight matrix by five Newton-Schulz
iterations, ``O ~ U V^T`` for ``B = U S V^T``, and steps ``W <- (1 - lr wd) W - lr' O`` with
``lr' = lr sqrt(max(1, rows / cols))`` (``adjust_lr_fn=original``) or ``0.2 lr sqrt(max(rows,
cols))`` (``match_rms_adamw``, Liu et al. 2025): the update of ``torch.optim.Muon``,
written here in torch's operations and constants so that the Newton-Schulz dtype can be
chosen: bfloat16 as torch and Jordan use it where it is fast (``ns_dtype=auto``: on CUDA),
float32 on a CPU, whose bfloat16 matrix products are emulated (the iterations on the
autoencoder's hidden matrices took 26 s in bfloat16 against 1.1 s in float32 on one core of
this project's CPU). Which parameters get Muon follows Keller Jordan's rule (and torch's
documentation): the weights of hidden Linear and Conv layers, a convolution's kernel
``(out, in, kh, kw)`` viewed as the matrix ``(out, in kh kw)`` as in Jordan's implementation;
embeddings (``nn.Embedding``), the output layer (the last Linear/Conv module in registration
order, the forward order of ngexp's models) and every 1-D parameter (biases, normalization
gains) get AdamW (Loshchilov & Hutter 2019) with ``adam_lr``, ``adam_betas``, ``adam_eps`` and
``adam_weight_decay``. The split is logged once (``train.log``).

Both kinds live in this optimizer's ``param_groups`` (``use_muon`` tells them apart), so lr
schedules scale both, and ``state_dict``/``load_state_dict`` are torch's.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ngexp.optim.closure import closure_loss
from ngexp.options import (
    check,
    check_nonnegative,
    check_positive,
    check_range,
    checked,
    configurable,
    is_number,
)

log = logging.getLogger("ngexp")

#: Modules whose weight is a hidden matrix for Muon (when not the output layer).
MATRIX_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def split_parameters(model: nn.Module) -> tuple[list[str], list[str]]:
    """Names of the parameters for Muon (hidden Linear/Conv weights) and for AdamW (the rest:
    embeddings, the output layer, 1-D parameters); see the module docstring."""
    layers = [name for name, module in model.named_modules() if isinstance(module, MATRIX_LAYERS)]
    hidden = {f"{name}.weight" for name in layers[:-1]}
    muon, adam = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (muon if name in hidden and param.ndim >= 2 else adam).append(name)
    return muon, adam


def newton_schulz_dtype(choice: str, device: torch.device) -> torch.dtype:
    """The Newton-Schulz dtype of ``ns_dtype``: ``auto`` is bfloat16 on CUDA, float32 elsewhere."""
    if choice == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, choice)


def newton_schulz(matrix: Tensor, coefficients: tuple[float, float, float], steps: int,
                  eps: float, dtype: torch.dtype) -> Tensor:
    """``U V^T``-like orthogonalization of ``matrix = U S V^T`` (rows, cols) by the quintic
    iteration ``X <- a X + (b A + c A^2) X``, ``A = X X^T``, from ``X = M / ||M||_F`` in
    ``dtype`` on the wide orientation (Jordan et al. 2024; ``torch.optim.Muon``'s operations)."""
    a, b, c = coefficients
    x = matrix.to(dtype)
    tall = matrix.size(0) > matrix.size(1)
    if tall:
        x = x.T
    x = x / x.norm().clamp(min=eps)  # a new tensor: ``matrix`` may be the momentum buffer
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


def check_muon(lr: float, momentum: float, weight_decay: float, ns_steps: int, adam_lr: float,
               adam_betas: tuple[float, float], adam_eps: float, adam_weight_decay: float,
               **_: Any) -> None:
    check_positive("lr", lr)
    check_range("momentum", momentum, 0, 1, closed="[)")
    check_nonnegative("weight_decay", weight_decay)
    check(isinstance(ns_steps, int) and 1 <= ns_steps < 100, "ns_steps", ns_steps,
          "an integer in [1, 99]")
    check_positive("adam_lr", adam_lr)
    check(len(adam_betas) == 2 and all(is_number(b) and 0 <= b < 1 for b in adam_betas),
          "adam_betas", adam_betas, "two numbers in [0, 1)")
    check_positive("adam_eps", adam_eps)
    check_nonnegative("adam_weight_decay", adam_weight_decay)


@configurable("optimizer", "muon")
@checked(check_muon)
class Muon(torch.optim.Optimizer):
    """``Muon(model, ...)``: Muon on the hidden weight matrices of ``model``, AdamW on the other
    parameters (module docstring). Defaults are Keller Jordan's (lr 0.02, momentum 0.95,
    Nesterov; AdamW lr 3e-4, betas (0.9, 0.95)), without weight decay like ngexp's other
    optimizers."""

    def __init__(self, model: nn.Module, lr: float = 0.02, momentum: float = 0.95,
                 nesterov: bool = True, weight_decay: float = 0.0, ns_steps: int = 5,
                 adjust_lr_fn: Literal["original", "match_rms_adamw"] = "original",
                 adam_lr: float = 3e-4, adam_betas: tuple[float, float] = (0.9, 0.95),
                 adam_eps: float = 1e-8, adam_weight_decay: float = 0.0,
                 ns_dtype: Literal["auto", "bfloat16", "float32"] = "auto") -> None:
        if not hasattr(torch.optim, "Muon"):
            raise RuntimeError(f"optimizer=muon needs torch >= 2.9 (torch.optim.Muon); this is "
                               f"torch {torch.__version__}")
        from torch.optim._muon import DEFAULT_A, DEFAULT_B, DEFAULT_C

        muon_names, adam_names = split_parameters(model)
        params = dict(model.named_parameters())
        groups = []
        if muon_names:
            groups.append({"params": [params[n] for n in muon_names], "use_muon": True, "lr": lr,
                           "momentum": momentum, "nesterov": nesterov,
                           "weight_decay": weight_decay, "ns_steps": ns_steps,
                           "ns_coefficients": (DEFAULT_A, DEFAULT_B, DEFAULT_C), "eps": 1e-7,
                           "adjust_lr_fn": adjust_lr_fn, "ns_dtype": ns_dtype})
        if adam_names:
            groups.append({"params": [params[n] for n in adam_names], "use_muon": False,
                           "lr": adam_lr, "betas": tuple(adam_betas), "eps": adam_eps,
                           "weight_decay": adam_weight_decay})
        super().__init__(groups, {})
        self.muon_names, self.adam_names = muon_names, adam_names
        log.info("Muon: %d weight matrices get Muon (%s); %d tensors get AdamW (%s)",
                 len(muon_names), ", ".join(muon_names) or "none", len(adam_names),
                 ", ".join(adam_names) or "none")

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = closure_loss(closure)
        for group in self.param_groups:
            if group["use_muon"]:
                self._muon_step(group)
            else:
                self._adamw_step(group)
        return loss

    def _muon_step(self, group: dict[str, Any]) -> None:
        """``torch.optim.Muon``'s step (its operations in its order); kernels of ndim > 2 as
        ``(out, rest)`` matrices; Newton-Schulz in ``ns_dtype``."""
        from torch.optim._muon import _adjust_lr  # torch's per-matrix step size (torch >= 2.9)

        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(
                    p, memory_format=torch.contiguous_format)
            grad = p.grad.reshape(len(p), -1)
            buf = state["momentum_buffer"].view(len(p), -1)
            buf.lerp_(grad, 1 - group["momentum"])
            update = grad.lerp(buf, group["momentum"]) if group["nesterov"] else buf
            dtype = newton_schulz_dtype(group.get("ns_dtype", "auto"), p.device)
            ortho = newton_schulz(update, group["ns_coefficients"], group["ns_steps"],
                                  group["eps"], dtype)
            p.mul_(1 - group["lr"] * group["weight_decay"])
            p.add_(ortho.view_as(p), alpha=-_adjust_lr(group["lr"], group["adjust_lr_fn"],
                                                        grad.shape))

    def _adamw_step(self, group: dict[str, Any]) -> None:
        """``torch.optim.AdamW``'s step (single-tensor path)."""
        from torch.optim.adam import adam

        params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state["step"] = torch.tensor(0.0, device="cpu")  # on the host, as torch.optim.AdamW
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            params.append(p)
            grads.append(p.grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        beta1, beta2 = group["betas"]
        adam(params, grads, exp_avgs, exp_avg_sqs, [], steps, foreach=False,
             decoupled_weight_decay=True, amsgrad=False, beta1=beta1, beta2=beta2,
             lr=group["lr"], weight_decay=group["weight_decay"], eps=group["eps"],
             maximize=False)
