"""Schemas of the first-order baselines, built straight from ``torch.optim``."""

from __future__ import annotations

from dataclasses import dataclass

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
        check(len(self.betas) == 2 and all(is_number(beta) and 0 <= beta < 1
                                           for beta in self.betas),
              "optimizer.betas", list(self.betas), "two numbers in [0, 1), e.g. [0.9, 0.999]")
        check_positive("optimizer.eps", self.eps)
