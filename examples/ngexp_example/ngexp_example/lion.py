"""Lion: EvoLved Sign Momentum (Chen et al. 2023, "Symbolic Discovery of Optimization
Algorithms", Algorithm 2).

Per parameter ``theta`` with gradient ``g`` and momentum ``m`` (zero at the start)::

    c     = beta1 m + (1 - beta1) g                  # interpolation
    theta = theta (1 - lr wd) - lr sign(c)           # decoupled weight decay, sign update
    m     = beta2 m + (1 - beta2) g                  # momentum of the gradient

Every coordinate moves by exactly ``lr`` (``sign(0) = 0``), so Lion takes a 3-10x smaller lr
than AdamW and a correspondingly larger ``weight_decay`` (Sec. 3.2 of the paper).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from ngexp.options import check, check_nonnegative, check_positive, checked, configurable, is_number


def check_lion(lr: float, betas: tuple[float, float], weight_decay: float, **_: Any) -> None:
    check_positive("lr", lr)
    check(len(betas) == 2 and all(is_number(b) and 0 <= b < 1 for b in betas), "betas",
          list(betas), "two numbers in [0, 1)")
    check_nonnegative("weight_decay", weight_decay)


@configurable("optimizer", "lion")
@checked(check_lion)
class Lion(torch.optim.Optimizer):
    """``Lion(params, lr, betas=(beta1, beta2), weight_decay)``; the paper's defaults (lr 1e-4,
    betas (0.9, 0.99)). Its state (``exp_avg``, the momentum ``m``, per parameter) is torch's
    ``state_dict``, so checkpoints and resume need nothing more."""

    def __init__(self, params: Iterable[Tensor] | Iterable[dict[str, Any]], lr: float = 1e-4,
                 betas: tuple[float, float] = (0.9, 0.99), weight_decay: float = 0.0) -> None:
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """One Lion update of every parameter that has a gradient (module docstring)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                grad = param.grad
                state = self.state[param]
                if not state:
                    state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                momentum = state["exp_avg"]
                update = torch.lerp(grad, momentum, beta1).sign_()  # beta1 m + (1 - beta1) g
                param.mul_(1 - group["lr"] * group["weight_decay"])
                param.add_(update, alpha=-group["lr"])
                momentum.lerp_(grad, 1 - beta2)  # beta2 m + (1 - beta2) g
        return loss
