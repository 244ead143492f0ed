"""SOAP (Vyas et al. 2024): Adam in the eigenbasis of Shampoo's factors, from pytorch-optimizer.

For a weight matrix with gradient ``G`` (a kernel ``(out, in, kh, kw)`` gets one factor and
basis per dimension, as in the authors' code without dimension merging), with
``L = EMA(G G^T)``, ``R = EMA(G^T G)`` (rate ``shampoo_beta``, default ``beta2``) and their
eigenbases ``Q_L``, ``Q_R`` (``eigh`` at the first step, then one power
iteration and a QR every ``precondition_frequency`` steps, paper's Alg. 4)::

    G' = Q_L^T G Q_R,   M = EMA_beta1(G),   V = EMA_beta2(G' * G')
    W <- W - lr c_t Q_L ((Q_L^T M Q_R) / (sqrt(V) + eps)) Q_R^T,   then W <- (1 - lr wd) W

with ``c_t = sqrt(1 - beta2^t) / (1 - beta1^t)``; the first step only builds ``L``, ``R`` and
the bases (Alg. 3). Sides longer than ``max_precondition_dim`` and 1-D parameters (unless
``precondition_1d``) keep the identity basis, i.e. Adam. The optimizer is
``pytorch_optimizer.SOAP`` (a port of the authors' nikhilvyas/SOAP; why this one:
docs/second_order.md, "Optimizers"); ``tests/test_frontier_optim.py`` checks it against the
update above written densely.
"""

from __future__ import annotations

from typing import Any

import torch

from ngexp.options import (
    check,
    check_integer,
    check_nonnegative,
    check_positive,
    checked,
    configurable,
    is_number,
)


def check_soap(lr: float, betas: tuple[float, float], shampoo_beta: float | None, eps: float,
               weight_decay: float, precondition_frequency: int, max_precondition_dim: int,
               **_: Any) -> None:
    check_positive("lr", lr)
    check(len(betas) == 2 and all(is_number(b) and 0 <= b < 1 for b in betas), "betas", betas,
          "two numbers in [0, 1)")
    check(shampoo_beta is None or (is_number(shampoo_beta) and 0 <= shampoo_beta < 1),
          "shampoo_beta", shampoo_beta, "null (= betas[1]) or a number in [0, 1)")
    check_positive("eps", eps)
    check_nonnegative("weight_decay", weight_decay)
    check_integer("precondition_frequency", precondition_frequency, 1)
    check_integer("max_precondition_dim", max_precondition_dim, 1)


@configurable("optimizer", "soap")
@checked(check_soap)
def soap(params: Any, lr: float = 3e-3, betas: tuple[float, float] = (0.95, 0.95),
         shampoo_beta: float | None = None, eps: float = 1e-8, weight_decay: float = 0.0,
         precondition_frequency: int = 10, max_precondition_dim: int = 10000,
         precondition_1d: bool = False) -> torch.optim.Optimizer:
    """``pytorch_optimizer.SOAP`` with the paper's defaults (lr 3e-3, betas (0.95, 0.95),
    bases refreshed every 10 steps), without weight decay like ngexp's other optimizers.
    pytorch-optimizer's ``merge_dims`` is not offered: its merging of small dimensions fails
    on common shapes (in 4.1, a 2560-entry gradient is reshaped to [1])."""
    from pytorch_optimizer import SOAP

    return SOAP(params, lr=lr, betas=tuple(betas), shampoo_beta=shampoo_beta,
                weight_decay=weight_decay, precondition_frequency=precondition_frequency,
                max_precondition_dim=max_precondition_dim, precondition_1d=precondition_1d,
                eps=eps)
