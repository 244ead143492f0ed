"""The contract between the engine and optimizers that need more than gradients.

A :class:`ModelOptimizer` is built from the model itself (not a parameter list) so it can hook
its layers, and it runs the backward pass of each training step itself: it may need a second
backward pass with targets sampled from the model (Monte-Carlo Fisher) or the batch inputs for
curvature-vector products. The engine calls, once per training step::

    outputs = model(inputs)
    loss = task.loss(outputs, targets)
    optimizer.backward(loss, outputs=outputs, inputs=inputs, task=task)
    ... callbacks mask gradients, gradients are clipped ...
    optimizer.step()

Plain ``torch.optim`` optimizers get ``loss.backward()`` instead.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ngexp.train.tasks import Task


class ModelOptimizer(torch.optim.Optimizer):
    """A ``torch.optim.Optimizer`` that owns the backward pass; see the module docstring."""

    def __init__(self, model: nn.Module, defaults: dict[str, Any]) -> None:
        super().__init__([p for p in model.parameters() if p.requires_grad], defaults)
        self.model = model
        self.keep_masks: dict[Tensor, Tensor] = {}

    def restrict_to(self, keep_masks: Mapping[Tensor, Tensor]) -> None:
        """Hold the coordinates of a parameter where its mask (same shape, read at every step:
        it may change in place) is 0 at zero, e.g. pruned weights. Optimizers whose step couples
        coordinates (the natural gradient's CG solve) solve in the subspace of the others; for
        the rest, masked gradients and re-masked weights (the pruning callback) suffice."""
        self.keep_masks = dict(keep_masks)

    def backward(self, loss: Tensor, *, outputs: Tensor, inputs: Tensor, task: Task) -> None:
        """Populate ``.grad`` of every parameter from ``loss``; may also update curvature."""
        loss.backward()

    def reset_state(self) -> None:
        """Forget all state (moments, curvature), e.g. after pruning changed the network."""
        self.state.clear()

    def log_metrics(self) -> dict[str, float]:
        """Scalars for TensorBoard's ``optim/`` group (e.g. damping, timings); may sync."""
        return {}

    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # noqa: D102
        raise NotImplementedError


def reset_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Clear moments / curvature of any optimizer (torch's or a :class:`ModelOptimizer`)."""
    if isinstance(optimizer, ModelOptimizer):
        optimizer.reset_state()
    else:
        optimizer.state.clear()
