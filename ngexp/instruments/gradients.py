"""Per-example gradient statistics of a model: norm quantiles and the gradient noise scale.

The numbers come from :mod:`ngexp.curvature.per_example` on the one layer-I/O capture of the
curvature core, so they cover its layer kinds (Linear, Conv, Embedding, attention projections,
norm scale and shift; Linear/Conv2d only before the capture covered the others, e.g. in
``results/dynamics_gradient_noise.md``); any other parameter is excluded and counted.
:class:`GradientProbe` piggybacks on a training step: arm it before the step's forward, read it
after the backward; the step itself is unchanged.

Cost: about one SGD step per measurement on the CPU for the MLP and LeNet-5 (numbers in
:mod:`ngexp.curvature.per_example`).

Memory: the capture keeps each layer's input and output gradient until :meth:`read` (one
batch's activations, as the backward needed anyway), plus per chunk at most
:data:`~ngexp.curvature.kronecker.CHUNK_ELEMENTS` floats.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ngexp.curvature.capture import Capture
from ngexp.curvature.per_example import ExampleGradients, example_gradients, noise_scale_terms
from ngexp.curvature.tasks import Task

QUANTILES = (0.1, 0.5, 0.9)


def _norm_summary(prefix: str, sq_norms: Tensor, quantiles: Sequence[float]) -> dict[str, Tensor]:
    norms = sq_norms.clamp_min(0).sqrt()
    levels = torch.tensor(list(quantiles), device=norms.device, dtype=norms.dtype)
    summary = {f"{prefix}norm_q{round(100 * q):02d}": value
               for q, value in zip(quantiles, torch.quantile(norms, levels), strict=True)}
    summary[f"{prefix}norm_mean"] = norms.mean()
    return summary


def gradient_metrics(grads: ExampleGradients,
                     quantiles: Sequence[float] = QUANTILES) -> dict[str, float]:
    """``grad/`` scalars of one batch: per-example gradient norm quantiles (``norm_q10``, ...)
    and mean (``norm_mean``), whole model and per layer (``grad/<layer>/...``); the unbiased
    ``trace_sigma`` and ``grad_sq`` and their ratio ``b_simple`` (whole model and per layer);
    ``excluded_params``, the trainable parameters no statistic covers.
    Average ``trace_sigma`` and ``grad_sq`` over steps before dividing for a low-bias B_simple.
    One host transfer."""
    total_sq, mean_sq = grads.total()
    traces, squares = noise_scale_terms(torch.cat([grads.sq_norms, total_sq[None]]),
                                        torch.cat([grads.mean_sq_norms, mean_sq[None]]))
    values = _norm_summary("grad/", total_sq, quantiles)
    for index, name in enumerate([*grads.names, None]):
        prefix = "grad/" if name is None else f"grad/{name}/"
        if name is not None:
            values.update(_norm_summary(prefix, grads.sq_norms[index], quantiles))
        values[f"{prefix}trace_sigma"] = traces[index]
        values[f"{prefix}grad_sq"] = squares[index]
        values[f"{prefix}b_simple"] = traces[index] / squares[index]
    keys = list(values)
    metrics = dict(zip(keys, torch.stack([values[k].float() for k in keys]).tolist(), strict=True))
    metrics["grad/excluded_params"] = float(grads.excluded_params)
    return metrics


class GradientProbe:
    """A capture on ``model``'s Linear/Conv2d layers, idle until :meth:`arm`.

    Every N steps a callback calls :meth:`arm` before the step's forward (``on_step_start``) and
    :meth:`read` after its backward (``before_optimizer_step``); the training step is the
    measurement, so only the norms are extra. Only training-mode forwards with grad are seen.
    """

    def __init__(self, model: nn.Module) -> None:
        self.capture = Capture(model)

    def arm(self) -> None:
        self.capture.active = True

    def read(self, scale: float | None = None) -> ExampleGradients:
        """Statistics of the armed step's last training backward; disarms and frees the capture.
        ``scale`` as in :func:`~ngexp.curvature.per_example.example_gradients`."""
        try:
            return example_gradients(self.capture, scale=scale)
        finally:
            self.capture.active = False
            self.capture.clear()

    def remove(self) -> None:
        self.capture.remove()


def measure_example_gradients(model: nn.Module, task: Task, inputs: Tensor,
                              targets: Tensor) -> ExampleGradients:
    """Per-example gradient norms of the batch ``(inputs, targets)`` by one forward and one
    backward of ``task``'s loss, in the model's current mode; parameter ``.grad`` is untouched."""
    capture = Capture(model, training_only=False)
    capture.active = True
    try:
        with torch.enable_grad():
            outputs = model(inputs)
            torch.autograd.grad(task.loss(outputs, targets), capture.layer_outputs(),
                                allow_unused=True)
        return example_gradients(capture)
    finally:
        capture.remove()
