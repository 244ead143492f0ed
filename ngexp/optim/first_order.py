"""Schemas of the first-order baselines, built straight from ``torch.optim``."""

from __future__ import annotations

from dataclasses import dataclass

from ngexp.config import check, schema


def check_common(lr: float, weight_decay: float, momentum: float = 0.0) -> None:
    check(lr > 0, "optimizer.lr", lr, "a number > 0")
    check(weight_decay >= 0, "optimizer.weight_decay", weight_decay, "a number >= 0")
    check(0 <= momentum < 1, "optimizer.momentum", momentum, "a number in [0, 1)")


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
        check(0 < self.alpha < 1, "optimizer.alpha", self.alpha, "a number in (0, 1)")
        check(self.eps > 0, "optimizer.eps", self.eps, "a number > 0")


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
        check(all(0 <= beta < 1 for beta in self.betas), "optimizer.betas", self.betas,
              "two numbers in [0, 1)")
        check(self.eps > 0, "optimizer.eps", self.eps, "a number > 0")
