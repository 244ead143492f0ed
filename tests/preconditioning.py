"""The documented training loops of a preconditioner, shared by the optimizer tests."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ngexp.curvature.tasks import Task
from ngexp.optim.preconditioner import Preconditioner


def documented_step(model: nn.Module, pre: Preconditioner, opt: torch.optim.Optimizer,
                    task: Task, x: Tensor, y: Tensor) -> None:
    """One step of the documented loop: ``pre.backward(loss, targets=y)`` (MC Fisher, adaptive
    damping), ``pre.step()``, ``opt.step()``."""
    opt.zero_grad(set_to_none=True)
    outputs = model(x)
    pre.backward(task.loss(outputs, y), outputs, targets=y)
    pre.step()
    opt.step()


def plain_step(model: nn.Module, pre: Preconditioner, opt: torch.optim.Optimizer, task: Task,
               x: Tensor, y: Tensor) -> None:
    """One step of the plain PyTorch loop: ``loss.backward()``, ``pre.step()``, ``opt.step()``."""
    opt.zero_grad(set_to_none=True)
    task.loss(model(x), y).backward()
    pre.step()
    opt.step()


def sgd(model: nn.Module, lr: float = 1.0, momentum: float = 0.0,
        weight_decay: float = 0.0) -> torch.optim.SGD:
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum,
                           weight_decay=weight_decay)


def snapshot(model: nn.Module) -> list[Tensor]:
    return [p.detach().clone() for p in model.parameters()]
