"""The capture's hooks: what they store, and when.

:class:`Recorder` puts a forward pre-hook and a forward hook on the model and a hook on every
covered module (:func:`attach`: per layer kind; a norm layer's input is recorded normalized,
:func:`normalized`; the attention projections' calls come from
:func:`ngexp.curvature.attention.attach_projections`). While the capture is active, each call
of a hooked module (grad enabled, outside ``torch.func`` transforms and, when
``training_only``, in training mode) stores its input and puts a tensor hook on its output
(registered when the model's forward returns, after the model output's own hook). Every
backward pass through the model's output is a *pass*: a tensor hook on the output opens it
(that gradient is the first one a backward pass computes), and the hooks on the layer outputs
store the gradients of each call into it, paired by call index whatever the order they arrive
in. A pass has the recorder's current *kind* (:attr:`Recorder.mode`; ``None``: nothing is
stored). Inactive hooks return at once (no copies, no unfold).

Under ``torch.compile`` the checks stay in the graph and what records runs eagerly
(:func:`~ngexp.curvature.layers.eager`: dynamo breaks the graph around it), on the real
tensors between the compiled graphs, so the records are those of the eager forward. A forward
the hooks would record (whether the capture is active or not) with covered parameters replaced
(``torch.func.functional_call`` with other tensors) raises: the gradients would not reach
their ``.grad``.

With the capture's ``grad_scale`` (a callable giving the loss scale of a ``GradScaler``), the
gradients of ``training`` passes are stored divided by it, so every estimator reads the
gradients of the unscaled loss (sampled passes are never scaled).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ngexp.curvature.attention import ProjectionIO, attach_projections
from ngexp.curvature.layers import LayerIO, LayerRecord, NormIO, OnCall, eager
from ngexp.curvature.records import TRAINING, ForwardRecord, Records, autocast_dtype


def normalized(module: nn.Module, x: Tensor) -> Tensor:
    """``xhat``: ``module``'s normalization of ``x`` without its affine parameters (batch
    statistics in training mode, or without running statistics; the running ones otherwise)."""
    if isinstance(module, nn.LayerNorm):
        return F.layer_norm(x, module.normalized_shape, None, None, module.eps)
    if isinstance(module, nn.GroupNorm):
        return F.group_norm(x, module.num_groups, None, None, module.eps)
    batch = module.training or module.running_mean is None
    return F.batch_norm(x, None if batch else module.running_mean,
                        None if batch else module.running_var, None, None, batch, 0.0,
                        module.eps)


def attach(module: nn.Module, layers: list[LayerIO], on_call: OnCall,
           enabled: Callable[[nn.Module], bool]) -> list[RemovableHandle]:
    """Hook ``module`` so that each of its calls reports to ``on_call`` while
    ``enabled(module)``; ``layers`` are the blocks that read ``module`` (one, or the
    projections of an attention module)."""
    if isinstance(layers[0], ProjectionIO):
        return attach_projections(module, layers, on_call, enabled)
    (layer,) = layers
    normalize = isinstance(layer, NormIO)

    @eager
    def record(module: nn.Module, x: Tensor, output: Tensor) -> None:
        if normalize:
            with torch.no_grad():
                x = normalized(module, x)
        on_call(layer, x, output, None)

    def hook(module: nn.Module, args: tuple[Any, ...], output: Tensor) -> None:
        if enabled(module):
            record(module, args[0], output)

    return [module.register_forward_hook(hook)]


class Switches(Protocol):
    """What a :class:`Recorder` reads of its capture (:class:`ngexp.curvature.capture.Capture`):
    the model and its covered layers, where to store, the switches; it sets ``forwarded``."""

    model: nn.Module
    layers: list[LayerIO]
    records: Records
    owner: str
    active: bool
    watch_model: bool
    training_only: bool
    accumulate: bool
    grad_scale: Callable[[], Tensor | float] | None
    forwarded: bool


class Recorder:
    """The hooks of ``capture`` on its model and covered layers (module docstring), storing
    into ``capture.records`` as the capture's switches (``active``, ``watch_model``,
    ``training_only``, ``accumulate``, ``grad_scale``) say."""

    def __init__(self, capture: Switches) -> None:
        self.capture = capture
        #: The kind of the passes recorded now (``None``: none are).
        self.mode: str | None = TRAINING
        self._recording = False
        self._pass_scale: Tensor | float | None = None
        #: Layer outputs of the running forward whose gradient hooks wait for the model output's.
        self._pending: list[tuple[LayerIO, int, Tensor, Callable[[Tensor], Tensor] | None]] = []
        model = capture.model
        covered = {id(param) for layer in capture.layers for param in layer.params}
        #: Where each covered parameter sits: ``(module, name, parameter, full name)``.
        self._slots = [(module, name, param, f"{prefix}.{name}" if prefix else name)
                       for prefix, module in model.named_modules()
                       for name, param in module._parameters.items() if id(param) in covered]
        self._handles = [model.register_forward_pre_hook(self._on_model_forward)]
        by_module: dict[nn.Module, list[LayerIO]] = {}
        for layer in capture.layers:
            by_module.setdefault(layer.module, []).append(layer)
        for module, layers in by_module.items():
            self._handles += attach(module, layers, self._on_call, self._recording_calls)
        # last: when the model is itself a hooked layer, its layer hook has run by then
        self._handles.append(model.register_forward_hook(self._on_model_output))

    def remove(self) -> None:
        """Detach every hook."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def reset(self) -> None:
        """Forget the running forward's layer outputs and pass (the records were dropped)."""
        self._recording = False
        self._pending.clear()

    @contextmanager
    def in_mode(self, mode: str | None) -> Iterator[None]:
        """Record the backward passes run inside this block as passes of ``mode``."""
        previous, self.mode = self.mode, mode
        try:
            yield
        finally:
            self.mode = previous

    def _enabled(self, module: nn.Module) -> bool:
        return (torch.is_grad_enabled()
                and not torch._C._are_functorch_transforms_active()  # e.g. torch.func products
                and (module.training or not self.capture.training_only))

    def _on_model_forward(self, model: nn.Module, args: tuple[Any, ...]) -> None:
        capture = self.capture
        if model.training and torch.is_grad_enabled():
            capture.forwarded = True
        if not self._enabled(model):
            return
        for owner, name, param, full_name in self._slots:
            if owner._parameters.get(name) is not param:
                raise RuntimeError(
                    f"{capture.owner} hooks the model's own parameters, but this forward ran "
                    f"with {full_name} replaced (torch.func.functional_call with other "
                    f"tensors?): its curvature and .grad would not be those of the model; call "
                    f"the model itself, or functional_call with dict(model.named_parameters())")
        if capture.active or capture.watch_model:
            self._open_forward()

    @eager
    def _open_forward(self) -> None:
        self.capture.records.open_forward(self.capture.accumulate)
        self.reset()

    def _on_model_output(self, model: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        capture = self.capture
        if (capture.active or capture.watch_model) and self._enabled(model):
            self._watch_output(args, output)

    @eager
    def _watch_output(self, args: tuple[Any, ...], output: Any) -> None:
        """Keep what ``watch_model`` asks of the model's forward and hook the gradients of its
        output and of the layer outputs it recorded."""
        capture = self.capture
        if not isinstance(output, Tensor):
            raise TypeError(f"curvature capture needs a model whose forward returns one tensor, "
                            f"got {type(output).__name__}")
        forward = capture.records.latest
        if capture.watch_model:
            forward.model_args = tuple(a.detach() if isinstance(a, Tensor) else a for a in args)
            forward.model_output = output
            forward.model_autocast = autocast_dtype(output.device.type)
        if output.requires_grad:  # first, so it runs before a layer hook on the same tensor
            output.register_hook(partial(self._on_output_grad, forward))
        for layer, call, layer_output, to_rows in self._pending:
            layer_output.register_hook(partial(self._on_grad, layer.record, call, to_rows))
        self._pending.clear()

    @eager  # a compiled autograd traces tensor hooks
    def _on_output_grad(self, forward: ForwardRecord, grad: Tensor) -> None:
        """The first gradient of a backward pass: open a pass of the current kind."""
        self._recording = self.mode is not None
        if not self._recording:
            return
        assert self.mode is not None
        capture = self.capture
        self._pass_scale = None
        if self.mode == TRAINING and capture.grad_scale is not None:
            self._pass_scale = capture.grad_scale()
        capture.records.open_pass(forward, self.mode)
        if capture.watch_model:
            forward.output_grads.append(self._unscaled(grad))

    def _unscaled(self, grad: Tensor) -> Tensor:
        grad = grad.detach()
        return grad if self._pass_scale is None else grad / self._pass_scale

    def _recording_calls(self, module: nn.Module) -> bool:
        """Whether calls of ``module`` are recorded now (:meth:`_on_call` then checks that a
        forward of the model is open)."""
        return self.capture.active and self._enabled(module)

    def _on_call(self, layer: LayerIO, x: Tensor, output: Tensor,
                 to_rows: Callable[[Tensor], Tensor] | None) -> None:
        if not self.capture.records.forwards:  # a layer called outside the model's forward
            return
        record = layer.record
        call = len(record.inputs)
        record.inputs.append(x.detach())
        record.outputs.append(output)
        if output.requires_grad:
            self._pending.append((layer, call, output, to_rows))

    @eager
    def _on_grad(self, record: LayerRecord, call: int, to_rows: Callable[[Tensor], Tensor] | None,
                 grad: Tensor) -> None:
        if self._recording and record.grads:
            record.grads[-1][call] = self._unscaled(grad if to_rows is None else to_rows(grad))
