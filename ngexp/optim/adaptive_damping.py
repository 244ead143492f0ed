"""The reduction ratio of K-FAC/EKFAC's ``damping_schedule=adaptive`` (Martens & Grosse 2015,
Sec. 6.5): ``rho = (h(w + delta) - h(w)) / M(delta)`` on the step's own batch, for the
Levenberg-Marquardt update of :class:`~ngexp.optim.damping.Damping`.

``delta`` is the step the optimizer actually took; the quadratic model is the Kronecker
curvature itself, ``M(delta) = <grad, delta> + 1/2 sum_layers delta^T C delta + 1/2 damping
|delta|^2`` (:meth:`~ngexp.optim.kronecker_terms.KroneckerTerms.quadratic`), so no
curvature-vector product is needed; ``h(w + delta)`` costs one forward pass without gradients
(buffers such as BatchNorm running statistics are restored after it). This needs the batch
targets: ``pre.backward(loss, targets=y)``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ngexp.curvature.capture import Capture, LayerIO, autocast_like
from ngexp.curvature.tasks import Task
from ngexp.optim.layer_curvature import LayerCurvature


@dataclass
class AdaptiveStep:
    """What the reduction ratio needs across the optimizer's step: the raw gradients and the
    weights before it, the batch (model arguments, targets), its loss, and the autocast dtype of
    its forward (the loss after the step is evaluated alike)."""

    raw_grads: dict[Tensor, Tensor]
    before: dict[Tensor, Tensor]
    args: tuple[Any, ...]
    targets: Tensor
    loss: Tensor
    autocast: torch.dtype | None

    @classmethod
    def record(cls, owner: str, model: nn.Module, capture: Capture, targets: Tensor | None,
               loss: Tensor | None) -> AdaptiveStep:
        """The step about to be taken (raises, naming ``owner``, when it cannot be measured)."""
        if len(capture.forwards) > 1:
            raise RuntimeError(f"{owner}(damping_schedule='adaptive') measures the "
                               f"reduction ratio on one batch: it does not support gradient "
                               f"accumulation ({len(capture.forwards)} forwards before one "
                               f"step); use damping_schedule=constant or exponential")
        if targets is None or loss is None or not capture.model_args:
            raise RuntimeError(f"{owner}(damping_schedule='adaptive') needs the "
                               f"batch targets: call pre.backward(loss, targets=targets) "
                               f"instead of loss.backward()")
        params = [p for p in model.parameters() if p.grad is not None]
        return cls({p: p.grad.clone() for p in params}, {p: p.detach().clone() for p in params},
                   capture.model_args, targets, loss, capture.model_autocast)

    def deltas(self) -> dict[Tensor, Tensor]:
        """The step ``delta`` of every parameter (float32)."""
        return {p: (p.detach() - before).float() for p, before in self.before.items()}

    def predicted(self, deltas: dict[Tensor, Tensor], damping: Tensor,
                  layers: Iterable[tuple[LayerIO, LayerCurvature]],
                  quadratic: Callable[[LayerCurvature, Tensor], Tensor]) -> Tensor:
        """``M(delta)`` (module docstring) from each covered layer with statistics, its state,
        and the quadratic form of their curvature."""
        predicted = torch.zeros((), device=damping.device)
        for param, delta in deltas.items():
            predicted += (self.raw_grads[param].float() * delta).sum()
            predicted += 0.5 * damping * delta.square().sum()
        for layer, state in layers:
            weight = layer.weight
            if weight not in deltas:
                continue
            bias = layer.bias
            bias_delta = None if bias is None else deltas.get(bias, torch.zeros_like(bias))
            predicted += 0.5 * quadratic(state, layer.matrix(deltas[weight], bias_delta))
        return predicted

    def loss_after(self, model: nn.Module, task: Task, device: torch.device) -> Tensor:
        """``h(w + delta)``: the batch's loss at the new weights (float32; buffers restored)."""
        buffers = [buffer.clone() for buffer in model.buffers()]
        with autocast_like(device.type, self.autocast):
            outputs = model(*self.args)
            loss_after = task.loss(outputs, self.targets).float()
        for buffer, saved in zip(model.buffers(), buffers, strict=True):
            buffer.copy_(saved)
        return loss_after
