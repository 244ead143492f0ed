"""Schemas of the first-order baselines, built straight from ``torch.optim``."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ngexp.options import check, check_nonnegative, check_positive, check_range, is_number, schema


def check_common(lr: float, weight_decay: float, momentum: float = 0.0) -> None:
    check_positive("optimizer.lr", lr)
    check_nonnegative("optimizer.weight_decay", weight_decay)
    check_range("optimizer.momentum", momentum, 0, 1, closed="[)")


@schema("optimizer", "sgd")
@dataclass
class SGDConfig:
    """SGD with (Nesterov) momentum and L2 weight decay (``torch.optim.SGD``)."""

    _target_: str = "torch.optim.SGD"
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        check_common(self.lr, self.weight_decay, self.momentum)
        check(not self.nesterov or self.momentum > 0, "optimizer.nesterov", self.nesterov,
              "false when optimizer.momentum=0 (Nesterov needs momentum)")


@schema("optimizer", "rmsprop")
@dataclass
class RMSPropConfig:
    """RMSProp (Tieleman & Hinton 2012), optionally centered (``torch.optim.RMSprop``)."""

    _target_: str = "torch.optim.RMSprop"
    lr: float = 1e-3
    alpha: float = 0.99
    eps: float = 1e-8
    momentum: float = 0.0
    centered: bool = False
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        check_common(self.lr, self.weight_decay, self.momentum)
        check_range("optimizer.alpha", self.alpha, 0, 1, closed="()")
        check_positive("optimizer.eps", self.eps)


@schema("optimizer", "adam")
@dataclass
class AdamConfig:
    """Adam (Kingma & Ba 2015), L2 weight decay (``torch.optim.Adam``)."""

    _target_: str = "torch.optim.Adam"
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        check_common(self.lr, self.weight_decay)
        check_betas(self.betas)
        check_positive("optimizer.eps", self.eps)


def check_betas(betas: tuple[float, float]) -> None:
    check(len(betas) == 2 and all(is_number(beta) and 0 <= beta < 1 for beta in betas),
          "optimizer.betas", list(betas), "two numbers in [0, 1), e.g. [0.9, 0.999]")


@schema("optimizer", "nadamw")
@dataclass
class NAdamWConfig:
    """NAdamW, the AlgoPerf baseline (Dahl et al. 2023): NAdam (Dozat 2016) with decoupled
    weight decay (Loshchilov & Hutter 2019), ``torch.optim.NAdam(decoupled_weight_decay=True)``.
    Step ``t`` on a parameter ``p`` with gradient ``g``, as torch defines it::

        p <- p (1 - lr wd)
        mu_t = beta1 (1 - 0.5 * 0.96^(t psi))          (the momentum schedule, psi = momentum_decay)
        m <- beta1 m + (1 - beta1) g,   v <- beta2 v + (1 - beta2) g^2
        p <- p - lr [(1 - mu_t) / (1 - prod_{i<=t} mu_i) g
                     + mu_{t+1} / (1 - prod_{i<=t+1} mu_i) m] / (sqrt(v / (1 - beta2^t)) + eps)

    Defaults: AlgoPerf's ``NAdamW`` class (lr 1e-3, betas (0.9, 0.999), eps 1e-8, weight decay
    0.01) and torch's psi 0.004. AlgoPerf's own NAdamW has no momentum schedule (a constant
    beta1, both terms corrected by ``1 - beta1^t``); ``decoupled_weight_decay=false`` is torch's
    NAdam with L2 weight decay."""

    _target_: str = "ngexp.optim.first_order.nadam"
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.01
    momentum_decay: float = 0.004
    decoupled_weight_decay: bool = True

    def __post_init__(self) -> None:
        check_common(self.lr, self.weight_decay)
        check_betas(self.betas)
        check_positive("optimizer.eps", self.eps)
        check_nonnegative("optimizer.momentum_decay", self.momentum_decay)


def nadam(params: Iterable[Any], betas: Sequence[float], **options: Any) -> torch.optim.NAdam:
    """``torch.optim.NAdam`` with ``betas`` as a tuple: NAdam keeps the sequence it is given
    in its parameter groups (a config's list would not load from a ``weights_only``
    checkpoint)."""
    return torch.optim.NAdam(params, betas=(float(betas[0]), float(betas[1])), **options)
