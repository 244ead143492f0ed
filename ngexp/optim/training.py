"""What the training engine steps: a ``torch.optim`` optimizer, optionally preceded by a
preconditioner (:mod:`ngexp.optim.preconditioner`).

One training step is the same whichever optimizer was chosen::

    optimizer.backward(loss, outputs, targets)   # pre.backward(...) or loss.backward()
    ... gradient masks, clipping ...
    optimizer.step()                             # pre.step(), then the torch optimizer's step

With a ``torch.amp.GradScaler`` (``trainer.precision=fp16``) the backward pass runs on the
scaled loss ``scaler.scale(loss)`` (through the preconditioner's backward, which was given the
scaler at construction as ``grad_scaler=``) and ends with ``scaler.unscale_(optimizer)``, so
masks, clipping and the preconditioner's step see the true gradients; the step is
``scaler.step(optimizer)`` (skipped when the gradients overflowed) and ``scaler.update()``.

A preconditioned optimizer from the command line
(``optimizer=kfac|ekfac|natural_gradient|hessian_free|tonga``)
gets its torch optimizer from :func:`base_optimizer` (``optimizer.base=sgd|adam|rmsprop`` with
``lr``, ``momentum``, ``nesterov``, ``weight_decay``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Literal

import torch
from torch import Tensor

from ngexp.optim.preconditioner import Preconditioner
from ngexp.options import (
    check,
    check_nonnegative,
    check_positive,
    check_range,
    checked,
)


def check_base(base: str, lr: float, momentum: float, nesterov: bool, weight_decay: float,
               **_: Any) -> None:
    check_positive("lr", lr)
    check_range("momentum", momentum, 0, 1, closed="[)")
    check(not nesterov or (base == "sgd" and momentum > 0), "nesterov", nesterov,
          "false unless base=sgd with momentum > 0")
    check_nonnegative("weight_decay", weight_decay)


@checked(check_base)
def base_optimizer(params: Iterable[Tensor], base: Literal["sgd", "adam", "rmsprop"] = "sgd",
                   lr: float = 0.03, momentum: float = 0.9, nesterov: bool = False,
                   weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """The torch optimizer that steps a preconditioner's directions: ``sgd`` (heavy-ball or
    Nesterov momentum), ``adam`` (``momentum`` is beta1, beta2 = 0.999) or ``rmsprop``
    (``momentum`` its momentum); weight decay is L2, added to the preconditioned gradient."""
    params = list(params)
    if base == "adam":
        return torch.optim.Adam(params, lr=lr, betas=(momentum, 0.999),
                                weight_decay=weight_decay)
    if base == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=nesterov,
                           weight_decay=weight_decay)


class TrainingOptimizer:
    """A torch optimizer and an optional preconditioner, stepped together (module docstring)."""

    def __init__(self, optimizer: torch.optim.Optimizer,
                 preconditioner: Preconditioner | None = None,
                 grad_scaler: torch.amp.GradScaler | None = None) -> None:
        self.optimizer = optimizer
        self.preconditioner = preconditioner
        self.grad_scaler = grad_scaler

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    @property
    def captures_next_forward(self) -> bool:
        """Whether the next training forward must run eagerly: its preconditioner's hooks record
        it (a compiled forward is fine on the other steps)."""
        capture = None if self.preconditioner is None else self.preconditioner.capture
        return capture is not None and (capture.active or capture.watch_model)

    def backward(self, loss: Tensor, outputs: Tensor, targets: Tensor) -> None:
        """Fill ``.grad`` with the gradient of ``loss`` (unscaled, with a grad scaler)."""
        scaler = self.grad_scaler
        if scaler is not None:
            loss = scaler.scale(loss)
        if self.preconditioner is None:
            loss.backward()
        else:
            self.preconditioner.backward(loss, outputs, targets)
        if scaler is not None:
            scaler.unscale_(self.optimizer)

    def step(self) -> None:
        if self.preconditioner is not None:
            self.preconditioner.step()
        if self.grad_scaler is None:
            self.optimizer.step()
        else:
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def reset_state(self) -> None:
        """Forget moments and curvature (e.g. after pruning changed the network); a step
        count kept per group (SOAP's) restarts too."""
        self.optimizer.state.clear()
        for group in self.optimizer.param_groups:
            group.pop("step", None)
        if self.preconditioner is not None:
            self.preconditioner.reset()

    def restrict_to(self, keep_masks: Mapping[Tensor, Tensor]) -> None:
        """See :meth:`Preconditioner.restrict_to`; plain optimizers need nothing."""
        if self.preconditioner is not None:
            self.preconditioner.restrict_to(keep_masks)

    def log_metrics(self) -> dict[str, float]:
        """``optim/`` scalars of the preconditioner and the grad scaler's current scale (may
        synchronize the device)."""
        metrics = {} if self.preconditioner is None else self.preconditioner.log_metrics()
        if self.grad_scaler is not None:
            metrics["grad_scale"] = self.grad_scaler.get_scale()
        return metrics

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(),
                "preconditioner": (None if self.preconditioner is None
                                   else self.preconditioner.state_dict()),
                "grad_scaler": (None if self.grad_scaler is None
                                else self.grad_scaler.state_dict())}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        if self.preconditioner is not None:
            self.preconditioner.load_state_dict(state["preconditioner"])
        if self.grad_scaler is not None:
            self.grad_scaler.load_state_dict(state["grad_scaler"])
