"""Layer inputs and output gradients, captured by hooks: the one mechanism every curvature
estimator of :mod:`ngexp.curvature` reads.

Each covered module is seen as ``groups`` independent affine maps ``s = [W | b] [a; 1]`` from
input rows ``a`` to output rows ``s`` (:mod:`ngexp.curvature.layers`: Linear, Conv1d/2d,
Embedding, norm scale and shift; :mod:`ngexp.curvature.attention`: the projections of
``nn.MultiheadAttention``; :func:`supported_layers` finds them). A module applied several
times in one forward (the LSTM's ``W_h`` once per time step) has one input per *call*.

:class:`Capture` is what consumers hold: its switches and what it has recorded. Its parts, one
job each:

- :mod:`ngexp.curvature.hooks`: the hooks, storing each call's input while :attr:`Capture.active`
  and each backward pass's gradients (divided by :attr:`Capture.grad_scale` for ``training``
  passes);
- :mod:`ngexp.curvature.records`: the records of the kept forwards (:attr:`Capture.forwards`,
  each layer's :attr:`~ngexp.curvature.layers.LayerIO.records`) and the accumulation policy
  (``accumulate=True``: gradient accumulation, k forward/backward pairs before one step).

A backward pass has a *kind*: ``training`` for a backward of the training loss (the plain
``loss.backward()``, the empirical Fisher), ``sampled`` inside :meth:`Capture.sampling` (losses
on targets drawn from the model, the Monte-Carlo Fisher, :func:`backward_sampled`); inside
:meth:`Capture.ignoring` nothing is stored. The single-record accessors
(:attr:`~ngexp.curvature.layers.LayerIO.inputs`, :attr:`Capture.model_output`,
:meth:`Capture.passes`, ...) read the latest record.

With :attr:`Capture.watch_model`, the model's own arguments and output are kept too, and the
output gradient of every recorded pass (the natural gradient's empirical Fisher and its
curvature products need them), and the autocast dtype the forward ran under
(:func:`autocast_like` replays it, so a loss re-evaluated later compares like with like).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from ngexp.curvature.attention import attention_blocks
from ngexp.curvature.hooks import Recorder
from ngexp.curvature.layers import (
    CONVOLUTIONS,
    SUPPORTED_MODULES,
    EmbeddingIO,
    LayerIO,
    LayerRecord,
    covered_by_kronecker,
    layer_io,
)
from ngexp.curvature.records import (
    SAMPLED,
    TRAINING,
    ForwardRecord,
    Records,
    autocast_dtype,
    autocast_like,
)
from ngexp.curvature.tasks import Task

__all__ = ["CONVOLUTIONS", "SAMPLED", "SUPPORTED_MODULES", "TRAINING", "Capture", "EmbeddingIO",
           "ForwardRecord", "LayerIO", "LayerRecord", "autocast_dtype", "autocast_like",
           "backward_sampled", "layer_io", "supported_layers"]


def supported_layers(model: nn.Module) -> list[LayerIO]:
    """Every covered layer of ``model`` whose weight requires grad, by module name:
    Linear/Conv1d/Conv2d/Embedding modules (:func:`covered_by_kronecker`) and the four
    projections of each ``nn.MultiheadAttention`` (:mod:`ngexp.curvature.attention`, which
    also stand for its ``out_proj`` module). A parameter shared by layers of two modules (tied
    weights, e.g. a language model's embedding and output layer) has no block of its own:
    those layers are left out, so it keeps the plain gradient (and the coverage report names
    it)."""
    attention = {name: module for name, module in model.named_modules()
                 if isinstance(module, nn.MultiheadAttention)}
    bypassed = {module.out_proj for module in attention.values()}
    layers: list[LayerIO] = []
    for name, module in model.named_modules():
        if name in attention:
            layers += [block for block in attention_blocks(name, module)
                       if block.weight.requires_grad]
        elif (covered_by_kronecker(module) and module.weight.requires_grad
              and module not in bypassed):
            layers.append(layer_io(name, module))
    owners: dict[int, set[nn.Module]] = {}
    for layer in layers:
        for param in layer.params:
            owners.setdefault(id(param), set()).add(layer.module)
    return [layer for layer in layers
            if all(len(owners[id(param)]) == 1 for param in layer.params)]


class Capture:
    """Hooks on ``model`` and its supported layers, and what they recorded; see the module
    docstring.

    ``layers`` defaults to :func:`supported_layers`. Each call's output tensor is kept too
    (:meth:`layer_outputs`), for backward passes that need gradients only there.
    """

    def __init__(self, model: nn.Module, *, layers: list[LayerIO] | None = None,
                 training_only: bool = True, accumulate: bool = False) -> None:
        self.model = model
        self.layers = supported_layers(model) if layers is None else layers
        self.active = False
        self.watch_model = False
        self.training_only = training_only
        self.accumulate = accumulate
        #: Who holds the capture, for its error messages (a preconditioner sets its name).
        self.owner = "the curvature capture"
        #: The loss scale the ``training`` passes' gradients are divided by (``None``: 1).
        self.grad_scale: Callable[[], Tensor | float] | None = None
        #: Set by every training-mode forward with grad enabled (whether capturing or not).
        self.forwarded = False
        self.records = Records(self.layers)
        #: One record per kept capturing forward (see the module docstring).
        self.forwards: list[ForwardRecord] = self.records.forwards
        self._recorder = Recorder(self)

    # ------------------------------------------------------------------ queries
    @property
    def latest(self) -> ForwardRecord:
        """The latest forward's record (an empty one before any)."""
        return self.records.latest

    @property
    def pass_kinds(self) -> list[str]:
        """Kind of each pass recorded through the latest forward, in order."""
        return self.latest.pass_kinds

    @property
    def model_args(self) -> tuple[Any, ...]:
        return self.latest.model_args

    @property
    def model_output(self) -> Tensor | None:
        return self.latest.model_output

    @property
    def model_autocast(self) -> torch.dtype | None:
        return self.latest.model_autocast

    def passes(self, kind: str) -> list[int]:
        """Indices of the passes of ``kind`` recorded through the latest forward."""
        return self.latest.passes(kind)

    def captured(self, kind: str) -> bool:
        """Whether some kept forward stored inputs and had a pass of ``kind`` recorded."""
        return self.captured_inputs and any(forward.passes(kind) for forward in self.forwards)

    @property
    def captured_inputs(self) -> bool:
        return any(record.inputs for layer in self.layers for record in layer.records)

    def layer_outputs(self) -> list[Tensor]:
        """The output of every call of every layer in the latest captured forward."""
        return [output for layer in self.layers for output in layer.record.outputs]

    # ------------------------------------------------------------------ control
    def clear(self) -> None:
        """Drop every record."""
        self.records.clear()
        self._recorder.reset()

    def remove(self) -> None:
        """Detach every hook."""
        self._recorder.remove()
        self.clear()

    @contextmanager
    def sampling(self) -> Iterator[None]:
        """Record the backward passes run inside this block as ``sampled`` passes."""
        with self._recorder.in_mode(SAMPLED):
            yield

    @contextmanager
    def ignoring(self) -> Iterator[None]:
        """Store nothing of the backward passes run inside this block."""
        with self._recorder.in_mode(None):
            yield


def backward_sampled(capture: Capture, outputs: Tensor, task: Task, samples: int,
                     generator: torch.Generator | None, retain_last: bool) -> None:
    """Record ``samples`` passes of the loss on targets drawn from the model's predictive
    distribution at ``outputs`` (float32 loss); the graph is kept after the last one when
    ``retain_last``. Each pass differentiates with respect to the layer outputs only, so no
    parameter gradient is computed (nor touched)."""
    layer_outputs = [output for output in capture.layer_outputs() if output.requires_grad]
    for sample in range(samples):
        sampled = task.sample_targets(outputs, generator)
        with capture.sampling():
            torch.autograd.grad(task.loss(outputs.float(), sampled), layer_outputs,
                                allow_unused=True,
                                retain_graph=retain_last or sample < samples - 1)
