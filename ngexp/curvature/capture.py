"""Layer inputs and output gradients, captured by hooks: the one mechanism every curvature
estimator of :mod:`ngexp.curvature` reads.

Each covered module is seen as ``groups`` independent affine maps ``s = [W | b] [a; 1]`` from
input rows ``a`` to output rows ``s`` (:mod:`ngexp.curvature.layers`: Linear, Conv1d/2d,
Embedding, norm scale and shift; :mod:`ngexp.curvature.attention`: the projections of
``nn.MultiheadAttention``). A module applied several times in one forward (the LSTM's ``W_h``
once per time step) has one input per *call*.

While :attr:`Capture.active`, each call of a hooked module (grad enabled, outside ``torch.func``
transforms and, when ``training_only``, in training mode) stores its input and puts a tensor
hook on its output (registered when the model's forward returns, after the model output's own
hook). Every backward pass through the model's output is a *pass*: a tensor hook on the output
opens it (that gradient is the first one a backward pass computes), and the hooks on the layer
outputs store the gradients of each call into it, paired by call index whatever the
order they arrive in. A pass has a *kind*: ``training`` for a backward of the training loss (the
plain ``loss.backward()``, the empirical Fisher), ``sampled`` inside :meth:`Capture.sampling`
(losses on targets drawn from the model, the Monte-Carlo Fisher); inside :meth:`Capture.ignoring`
nothing is stored. Inactive hooks return at once (no copies, no unfold).

What one capturing forward and its backward passes leave is a *record*
(:class:`ForwardRecord`, and each layer's :class:`LayerRecord`). By default a capturing forward
drops the records of earlier ones; with ``accumulate=True`` (the preconditioners: gradient
accumulation, k forward/backward pairs before one step) the records of every forward that was
back-propagated are kept until :meth:`Capture.clear`, while a forward that saw no backward pass
before the next one, or one followed by ``zero_grad`` (every hooked parameter's ``.grad``
``None`` when the next forward starts), is dropped. The single-record accessors
(:attr:`LayerIO.inputs`, :attr:`Capture.model_output`, :meth:`Capture.passes`, ...) read the
latest record.

With :attr:`Capture.grad_scale` (a callable giving the loss scale of a ``GradScaler``), the
gradients of ``training`` passes are stored divided by it, so every estimator reads the
gradients of the unscaled loss (sampled passes are never scaled).

With :attr:`Capture.watch_model`, the model's own arguments and output are kept too, and the
output gradient of every recorded pass (the natural gradient's empirical Fisher and its
curvature products need them), and the autocast dtype the forward ran under
(:func:`autocast_like` replays it, so a loss re-evaluated later compares like with like).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from ngexp.curvature.attention import attention_blocks
from ngexp.curvature.layers import (
    CONVOLUTIONS,
    SUPPORTED_MODULES,
    EmbeddingIO,
    LayerIO,
    LayerRecord,
    covered_by_kronecker,
    layer_io,
)
from ngexp.curvature.tasks import Task

__all__ = ["CONVOLUTIONS", "SAMPLED", "SUPPORTED_MODULES", "TRAINING", "Capture", "EmbeddingIO",
           "ForwardRecord", "LayerIO", "LayerRecord", "autocast_dtype", "autocast_like",
           "backward_sampled", "layer_io", "supported_layers"]

#: Kinds of a recorded backward pass.
TRAINING, SAMPLED = "training", "sampled"

@dataclass(eq=False)
class ForwardRecord:
    """One capturing forward of the model: the kinds of the backward passes through it, and
    (with :attr:`Capture.watch_model`) its positional arguments (detached), output, autocast
    dtype and the output gradient of each pass."""

    pass_kinds: list[str] = field(default_factory=list)
    model_args: tuple[Any, ...] = ()
    model_output: Tensor | None = None
    model_autocast: torch.dtype | None = None
    output_grads: list[Tensor] = field(default_factory=list)

    def passes(self, kind: str) -> list[int]:
        """Indices of the recorded passes of ``kind``."""
        return [index for index, recorded in enumerate(self.pass_kinds) if recorded == kind]

    def release(self) -> None:
        """Drop the tensors: the gradient hook on ``model_output`` refers to this record, a
        cycle through autograd's C++ graph that Python's collector cannot break."""
        self.model_args, self.model_output = (), None
        self.output_grads.clear()


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast casts to on ``device_type`` right now, ``None`` when it is off."""
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def autocast_like(device_type: str, dtype: torch.dtype | None) -> AbstractContextManager[Any]:
    """Autocast to ``dtype`` on ``device_type`` (nothing when ``dtype`` is ``None``)."""
    return nullcontext() if dtype is None else torch.autocast(device_type, dtype=dtype)


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
    """Hooks on ``model`` and its supported layers; see the module docstring.

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
        #: The loss scale the ``training`` passes' gradients are divided by (``None``: 1).
        self.grad_scale: Callable[[], Tensor | float] | None = None
        #: One record per kept capturing forward (see the module docstring).
        self.forwards: list[ForwardRecord] = []
        #: Set by every training-mode forward with grad enabled (whether capturing or not).
        self.forwarded = False
        self._mode: str | None = TRAINING
        self._recording = False
        self._pass_scale: Tensor | float | None = None
        #: Layer outputs of the running forward whose gradient hooks wait for the model output's.
        self._pending: list[tuple[LayerIO, int, Tensor, Callable[[Tensor], Tensor] | None]] = []
        self._handles = [model.register_forward_pre_hook(self._on_model_forward)]
        by_module: dict[nn.Module, list[LayerIO]] = {}
        for layer in self.layers:
            by_module.setdefault(layer.module, []).append(layer)
        for module, layers in by_module.items():
            self._handles += type(layers[0]).attach(module, layers, self._on_call,
                                                    self._recording_calls)
        # last: when the model is itself a hooked layer, its layer hook has run by then
        self._handles.append(model.register_forward_hook(self._on_model_output))

    # ------------------------------------------------------------------ queries
    @property
    def latest(self) -> ForwardRecord:
        """The latest forward's record (an empty one before any)."""
        return self.forwards[-1] if self.forwards else ForwardRecord()

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

    @property
    def output_grads(self) -> list[Tensor]:
        return self.latest.output_grads

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
        return [output for layer in self.layers for output in layer.outputs]

    # ------------------------------------------------------------------ control
    def clear(self) -> None:
        for forward in self.forwards:
            forward.release()
        for layer in self.layers:
            layer.clear()
        self.forwards.clear()
        self._recording = False
        self._pending.clear()

    def remove(self) -> None:
        """Detach every hook."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.clear()

    @contextmanager
    def sampling(self) -> Iterator[None]:
        """Record the backward passes run inside this block as ``sampled`` passes."""
        with self._in_mode(SAMPLED):
            yield

    @contextmanager
    def ignoring(self) -> Iterator[None]:
        """Store nothing of the backward passes run inside this block."""
        with self._in_mode(None):
            yield

    @contextmanager
    def _in_mode(self, mode: str | None) -> Iterator[None]:
        previous, self._mode = self._mode, mode
        try:
            yield
        finally:
            self._mode = previous

    # ------------------------------------------------------------------ hooks
    def _enabled(self, module: nn.Module) -> bool:
        return (torch.is_grad_enabled()
                and not torch._C._are_functorch_transforms_active()  # e.g. torch.func products
                and (module.training or not self.training_only))

    def _on_model_forward(self, model: nn.Module, args: tuple[Any, ...]) -> None:
        if model.training and torch.is_grad_enabled():
            self.forwarded = True
        if not (self.active or self.watch_model) or not self._enabled(model):
            return
        if not self.accumulate or self._grads_discarded():
            self.clear()
        elif self.forwards and not self.forwards[-1].pass_kinds:  # never back-propagated
            self.forwards.pop().release()
            for layer in self.layers:
                layer.records.pop().release()
        self._pending.clear()
        self._recording = False
        self.forwards.append(ForwardRecord())
        for layer in self.layers:
            layer.records.append(LayerRecord())

    def _grads_discarded(self) -> bool:
        """Whether ``zero_grad`` ran since the kept forwards' backward passes: every hooked
        parameter's ``.grad`` is ``None``."""
        return bool(self.forwards) and all(p.grad is None for layer in self.layers
                                           for p in layer.params)

    def _on_model_output(self, model: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if not (self.active or self.watch_model) or not self._enabled(model):
            return
        if not isinstance(output, Tensor):
            raise TypeError(f"curvature capture needs a model whose forward returns one tensor, "
                            f"got {type(output).__name__}")
        forward = self.latest
        if self.watch_model:
            forward.model_args = tuple(a.detach() if isinstance(a, Tensor) else a for a in args)
            forward.model_output = output
            forward.model_autocast = autocast_dtype(output.device.type)
        if output.requires_grad:  # first, so it runs before a layer hook on the same tensor
            output.register_hook(partial(self._on_output_grad, forward))
        for layer, call, layer_output, to_rows in self._pending:
            layer_output.register_hook(partial(self._on_grad, layer.record, call, to_rows))
        self._pending.clear()

    def _on_output_grad(self, forward: ForwardRecord, grad: Tensor) -> None:
        """The first gradient of a backward pass: open a pass of the current kind."""
        self._recording = self._mode is not None
        if not self._recording:
            return
        assert self._mode is not None
        self._pass_scale = None
        if self._mode == TRAINING and self.grad_scale is not None:
            self._pass_scale = self.grad_scale()
        forward.pass_kinds.append(self._mode)
        index = next((i for i, kept in enumerate(self.forwards) if kept is forward), None)
        if index is not None:
            for layer in self.layers:
                layer.records[index].grads.append({})
        if self.watch_model:
            forward.output_grads.append(self._unscaled(grad))

    def _unscaled(self, grad: Tensor) -> Tensor:
        grad = grad.detach()
        return grad if self._pass_scale is None else grad / self._pass_scale

    def _recording_calls(self, module: nn.Module) -> bool:
        """Whether calls of ``module`` are recorded now."""
        return self.active and self._enabled(module) and bool(self.forwards)

    def _on_call(self, layer: LayerIO, x: Tensor, output: Tensor,
                 to_rows: Callable[[Tensor], Tensor] | None) -> None:
        record = layer.record
        call = len(record.inputs)
        record.inputs.append(x.detach())
        record.outputs.append(output)
        if output.requires_grad:
            self._pending.append((layer, call, output, to_rows))

    def _on_grad(self, record: LayerRecord, call: int, to_rows: Callable[[Tensor], Tensor] | None,
                 grad: Tensor) -> None:
        if self._recording and record.grads:
            record.grads[-1][call] = self._unscaled(grad if to_rows is None else to_rows(grad))


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
