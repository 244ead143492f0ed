"""Watching ``torch.optim`` optimizer steps: a preconditioner acts just before and after every
step of an optimizer that updates its model's parameters (torch's global step hooks), and
nothing else is hooked."""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)

StepHook = Callable[[torch.optim.Optimizer], None]


class OptimizerWatch:
    """Calls ``before(optimizer)`` and ``after(optimizer)`` around each step of an optimizer
    that updates a parameter of ``model``. The hooks hold the callbacks' owner weakly (``owner``
    is what ``before``/``after`` are bound to), so a preconditioner that goes away stops being
    called and its hooks are removed."""

    def __init__(self, model: nn.Module, owner: object, before: StepHook,
                 after: StepHook) -> None:
        self.model = model
        self._covers: weakref.WeakKeyDictionary[torch.optim.Optimizer, bool] = \
            weakref.WeakKeyDictionary()
        live = weakref.WeakMethod(before), weakref.WeakMethod(after)  # type: ignore[arg-type]

        def hook(which: int) -> Callable[..., None]:
            def call(optimizer: torch.optim.Optimizer, *_: Any) -> None:
                method = live[which]()
                if method is not None and self.covers(optimizer):
                    method(optimizer)
            return call

        self._handles = [register_optimizer_step_pre_hook(hook(0)),
                         register_optimizer_step_post_hook(hook(1))]
        weakref.finalize(owner, _remove_handles, list(self._handles))

    def covers(self, optimizer: torch.optim.Optimizer) -> bool:
        """Whether ``optimizer`` updates any parameter of the model."""
        if optimizer not in self._covers:
            mine = {id(p) for p in self.model.parameters()}
            self._covers[optimizer] = any(id(p) in mine for group in optimizer.param_groups
                                          for p in group["params"])
        return self._covers[optimizer]

    def remove(self) -> None:
        """Detach the hooks."""
        _remove_handles(self._handles)


def _remove_handles(handles: list[Any]) -> None:
    for handle in handles:
        handle.remove()
    handles.clear()
