"""Damping: one schedule mechanism for K-FAC/EKFAC, and the Levenberg-Marquardt rule they share
with Hessian-free.

**The schedule.** The damping is a hyperparameter of the step (:mod:`ngexp.optim.hyperparams`:
a number or a schedule such as :class:`~ngexp.optim.hyperparams.Exponential`).
``damping_schedule=exponential`` is a spelling of that schedule, ``Exponential(damping,
damping_decay, damping_decay_steps, minimum=damping_min)`` (:func:`scheduled_damping`), so
``damping * damping_decay^(t / damping_decay_steps)`` floored at ``damping_min`` (1e-6 by
default; a config's own ``Exponential`` node keeps its ``minimum``, 0 by default).
:class:`Damping` writes the schedule's value to the device when it changes.

**The Levenberg-Marquardt rule** (Moré 1978; Martens 2010, Sec. 4.1; Martens & Grosse 2015,
Sec. 6.5). With ``rho = (h(w + delta) - h(w)) / M(delta)``, the actual over the predicted
change of the objective for the step ``delta`` (``M`` the quadratic model, ``M(0) = 0``): the
model is trusted more, the damping multiplied by ``shrink < 1``, when ``rho > 3/4``; less, the
damping divided by ``shrink``, when ``rho < 1/4``; a model that predicts no decrease
(``M(delta) >= 0``) also divides it; the result is clamped to ``[minimum, maximum]``. K-FAC's
``damping_schedule=adaptive`` uses ``shrink = (19/20)^T1`` every ``T1 = adapt_interval``
steps (:mod:`ngexp.optim.adaptive_damping` measures ``rho``), Hessian-free ``2/3`` (so ``*
3/2``) every step.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from ngexp.optim.hyperparams import Exponential, Hyperparameter, value_at

DampingScheduleName = Literal["constant", "exponential", "adaptive"]


def levenberg_marquardt(damping: Tensor, rho: Tensor, predicted: Tensor, shrink: float,
                        minimum: float, maximum: float) -> Tensor:
    """The next damping (a 0-dim tensor, no host sync) from ``rho`` and ``predicted = M(delta)``
    (0-dim tensors; module docstring), clamped to ``[minimum, maximum]``."""
    down, up = damping.new_tensor(shrink), damping.new_tensor(1 / shrink)  # damping's dtype
    factor = torch.where(rho > 0.75, down, torch.where(rho < 0.25, up, torch.ones_like(up)))
    return (damping * torch.where(predicted < 0, factor, up)).clamp(minimum, maximum)


def scheduled_damping(damping: Hyperparameter, schedule: DampingScheduleName, decay: float,
                     decay_steps: int, minimum: float) -> Hyperparameter:
    """The damping as a function of the step (module docstring); ``adaptive`` starts from
    ``damping``."""
    if schedule == "exponential":
        assert not callable(damping)
        return Exponential(damping, decay, decay_steps, minimum)
    return damping


class Damping:
    """A preconditioner's damping, a 0-dim float32 tensor on ``device`` (:attr:`value`): the
    ``schedule``'s value at each step, or, with ``adapt_interval``, adapted every that many
    steps by the Levenberg-Marquardt rule within ``[minimum, maximum]``. :attr:`changed` is set
    whenever it is written, for terms that fold it in (K-FAC's damped inverses)."""

    def __init__(self, schedule: Hyperparameter, device: torch.device, *,
                 adapt_interval: int | None, minimum: float, maximum: float) -> None:
        self.schedule, self.adapt_interval = schedule, adapt_interval
        self.minimum, self.maximum = minimum, maximum
        #: What the schedule last wrote (the float32 copy on the device may differ from it).
        self._written = self.scheduled(0)
        self.value = torch.tensor(self._written, device=device)
        self.changed = True
        #: The last reduction ratio of an adaptive update (NaN before the first).
        self.rho = torch.full((), math.nan, device=device)

    def scheduled(self, step: int) -> float:
        return float(value_at(self.schedule, step))

    def follow(self, step: int) -> None:
        """Write the schedule's value at ``step`` if it changed (nothing when adaptive)."""
        if self.adapt_interval is not None:
            return
        value = self.scheduled(step)
        if value != self._written:
            self._written = value
            self.value.fill_(value)
            self.changed = True

    def adapting(self, step: int) -> bool:
        """Whether the step after ``step``'s preconditioning adapts the damping."""
        return self.adapt_interval is not None and step % self.adapt_interval == 0

    def adapt(self, rho: Tensor, predicted: Tensor) -> None:
        """The Levenberg-Marquardt update from the step's reduction ratio ``rho``."""
        assert self.adapt_interval is not None
        self.rho = rho
        damping = levenberg_marquardt(self.value, rho, predicted,
                                      (19 / 20) ** self.adapt_interval, self.minimum,
                                      self.maximum)
        self.value.copy_(damping)
        self.changed = True

    def restore(self, value: Tensor, changed: bool, steps: int) -> None:
        """The damping of a checkpoint taken after ``steps`` steps."""
        self.value.copy_(value)
        self._written = self.scheduled(max(steps - 1, 0))
        self.changed = changed
