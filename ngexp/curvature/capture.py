"""Layer inputs and output gradients, captured by hooks: the one mechanism every curvature
estimator of :mod:`ngexp.curvature` reads.

Each supported module is seen as ``groups`` independent affine maps ``s = [W | b] [a; 1]`` from
input rows ``a`` to output rows ``s``: for ``nn.Linear`` a row is the last dimension of a
``(B, *, D)`` input; for ``nn.Conv1d``/``nn.Conv2d`` (stride, padding incl.
``same``/reflect/circular, dilation, groups) it is the input patch of one output position (KFC,
Grosse & Martens 2016), taken from strided views of the input, one block per channel group. A
module applied several times in one forward (the LSTM's ``W_h`` once per time step) has one
input per *call*.

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

import math
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ngexp.curvature.tasks import Task

SUPPORTED_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding)
CONVOLUTIONS = (nn.Conv1d, nn.Conv2d)
#: Kinds of a recorded backward pass.
TRAINING, SAMPLED = "training", "sampled"


@dataclass(eq=False)
class LayerRecord:
    """What one forward left of one layer: ``inputs[c]`` of its ``c``-th call, ``outputs[c]``
    its output, ``grads[k][c]`` that output's gradient in the forward's ``k``-th pass."""

    inputs: list[Tensor] = field(default_factory=list)
    outputs: list[Tensor] = field(default_factory=list)
    grads: list[dict[int, Tensor]] = field(default_factory=list)


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


class LayerIO:
    """One Linear/Conv1d/Conv2d module as ``groups`` affine maps, and what the capture recorded
    of it: one :class:`LayerRecord` per kept forward (:attr:`records`); :attr:`inputs`,
    :attr:`outputs` and :attr:`grads` are the latest record's.
    """

    def __init__(self, name: str, module: nn.Linear | nn.Conv1d | nn.Conv2d) -> None:
        self.name = name
        self.module = module
        if isinstance(module, CONVOLUTIONS):
            self.groups = module.groups
            self.fan_in = module.in_channels // module.groups * math.prod(module.kernel_size)
            self.out_dim = module.out_channels // module.groups
        else:
            self.groups = 1
            self.fan_in = module.in_features
            self.out_dim = module.out_features
        self.has_bias = module.bias is not None
        self.in_dim = self.fan_in + int(self.has_bias)
        self.records: list[LayerRecord] = []

    @property
    def record(self) -> LayerRecord:
        """The latest record (an empty one before any capturing forward)."""
        return self.records[-1] if self.records else LayerRecord()

    @property
    def inputs(self) -> list[Tensor]:
        return self.record.inputs

    @property
    def outputs(self) -> list[Tensor]:
        return self.record.outputs

    @property
    def grads(self) -> list[dict[int, Tensor]]:
        return self.record.grads

    @property
    def weight(self) -> nn.Parameter:
        return self.module.weight

    @property
    def bias(self) -> nn.Parameter | None:
        return self.module.bias if self.has_bias else None

    @property
    def params(self) -> list[nn.Parameter]:
        return [self.weight] + ([self.bias] if self.bias is not None else [])

    @property
    def weight_name(self) -> str:
        return f"{self.name}.weight" if self.name else "weight"

    def clear(self) -> None:
        self.records.clear()

    # ------------------------------------------------------------------ layouts
    def weight_matrix(self, weight: Tensor) -> Tensor:
        """``W (groups, out_dim, fan_in)`` of a weight-shaped tensor (a view where possible)."""
        return weight.reshape(self.groups, self.out_dim, self.fan_in)

    def weight_like(self, matrix: Tensor) -> Tensor:
        """Inverse of :meth:`weight_matrix`: a tensor shaped like the weight."""
        return matrix.reshape(self.module.weight.shape)

    def matrix(self, weight: Tensor, bias: Tensor | None) -> Tensor:
        """``[W | b]`` from weight- and bias-shaped tensors: ``(groups, out_dim, in_dim)``."""
        matrix = self.weight_matrix(weight)
        if self.has_bias:
            assert bias is not None
            matrix = torch.cat([matrix, bias.reshape(self.groups, self.out_dim, 1)], dim=-1)
        return matrix

    def split(self, matrix: Tensor) -> tuple[Tensor, Tensor | None]:
        """Inverse of :meth:`matrix`: weight-shaped and bias-shaped (or ``None``) tensors."""
        weight = self.weight_like(matrix[..., : self.fan_in])
        bias = matrix[..., self.fan_in].reshape(self.bias.shape) if self.bias is not None else None
        return weight, bias

    def gradient_matrix(self) -> Tensor | None:
        """``[dW | db]`` of the parameters' ``.grad`` in float32 (``None`` without a weight
        gradient; a missing bias gradient counts as zero)."""
        weight, bias = self.weight, self.bias
        if weight.grad is None:
            return None
        bias_grad = None
        if bias is not None:
            bias_grad = bias.grad if bias.grad is not None else torch.zeros_like(bias)
        return self.matrix(weight.grad, bias_grad).float()

    def features(self, x: Tensor) -> Tensor:
        """Input rows without the homogeneous coordinate, float32: ``(B, P, groups, fan_in)``,
        ``P`` the weight-sharing positions (conv output positions, extra Linear dims; 1 for
        ``(B, D)`` inputs)."""
        if isinstance(self.module, CONVOLUTIONS):
            return self._patches(x).float()
        return x.reshape(x.shape[0], -1, 1, x.shape[-1]).float()

    def input_rows(self, x: Tensor) -> Tensor:
        """Rows ``[a; 1]`` of one call's input, float32: ``(B, P, groups, in_dim)``."""
        rows = self.features(x)
        if self.has_bias:
            rows = torch.cat([rows, rows.new_ones(*rows.shape[:-1], 1)], dim=-1)
        return rows

    def grad_rows(self, grad: Tensor) -> Tensor:
        """Rows of one call's output gradient, float32: ``(B, P, groups, out_dim)``."""
        batch = grad.shape[0]
        if isinstance(self.module, CONVOLUTIONS):
            return grad.reshape(batch, self.groups, self.out_dim, -1).permute(0, 3, 1, 2).float()
        return grad.reshape(batch, -1, 1, grad.shape[-1]).float()

    def _patches(self, x: Tensor) -> Tensor:
        """Conv input patches ``(B, L, groups, fan_in)``, channel-major like the weight: strided
        views of the (padded) input, then one copy into that layout (cheaper than ``unfold``
        followed by a transpose). ``L`` counts the output positions (``H_out W_out`` for
        Conv2d, ``L_out`` for Conv1d)."""
        conv = self.module
        assert isinstance(conv, CONVOLUTIONS)
        if isinstance(conv.padding, str) or conv.padding_mode != "zeros" or any(conv.padding):
            mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
            x = F.pad(x, conv._reversed_padding_repeated_twice, mode=mode)
        if isinstance(conv, nn.Conv1d):
            (k,), (stride,), (dilation,) = conv.kernel_size, conv.stride, conv.dilation
            windows = x.unfold(2, dilation * (k - 1) + 1, stride)[..., ::dilation]  # (B,C,L,k)
            return windows.permute(0, 2, 1, 3).reshape(x.shape[0], windows.shape[2],
                                                       self.groups, self.fan_in)
        (kh, kw), (sh, sw), (dh, dw) = conv.kernel_size, conv.stride, conv.dilation
        windows = x.unfold(2, dh * (kh - 1) + 1, sh).unfold(3, dw * (kw - 1) + 1, sw)
        windows = windows[..., ::dh, ::dw]  # (B, C, H_out, W_out, kh, kw)
        batch, _, height, width = windows.shape[:4]
        return windows.permute(0, 2, 3, 1, 4, 5).reshape(batch, height * width, self.groups,
                                                           self.fan_in)


class EmbeddingIO(LayerIO):
    """``nn.Embedding(V, E)`` as the affine map ``s = W^T a`` of one-hot rows ``a`` (length
    ``V``, no bias): ``fan_in = V``, ``out_dim = E``, the weight matrix is ``W^T``. Its input
    factor ``A = (1/R) sum_rows a a^T`` is diagonal, the token frequencies (Martens & Grosse
    2015's K-FAC of a lookup table; a ``padding_idx`` row gets no gradient, so its tokens give
    zero rows)."""

    def __init__(self, name: str, module: nn.Embedding) -> None:  # noqa: D107
        self.name, self.module = name, module
        self.groups, self.fan_in, self.out_dim = 1, module.num_embeddings, module.embedding_dim
        self.has_bias, self.in_dim = False, module.num_embeddings
        self.records = []

    def weight_matrix(self, weight: Tensor) -> Tensor:
        return weight.T[None]

    def weight_like(self, matrix: Tensor) -> Tensor:
        return matrix.reshape(self.out_dim, self.fan_in).T

    def features(self, x: Tensor) -> Tensor:
        rows = F.one_hot(x.reshape(x.shape[0], -1), self.fan_in).float()
        padding = self.module.padding_idx
        if padding is not None:
            rows[..., padding] = 0.0
        return rows[:, :, None]


def layer_io(name: str, module: nn.Module) -> LayerIO:
    """The :class:`LayerIO` of a supported module."""
    return EmbeddingIO(name, module) if isinstance(module, nn.Embedding) else LayerIO(name, module)


def covered_by_kronecker(module: nn.Module) -> bool:
    """Whether ``module`` is an affine map the capture treats exactly: Linear, Conv1d/2d, and
    Embeddings whose gradient is the plain lookup's (dense, not scaled by frequency)."""
    if isinstance(module, nn.Embedding):
        return not (module.sparse or module.scale_grad_by_freq)
    return isinstance(module, SUPPORTED_MODULES)


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast casts to on ``device_type`` right now, ``None`` when it is off."""
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def autocast_like(device_type: str, dtype: torch.dtype | None) -> AbstractContextManager[Any]:
    """Autocast to ``dtype`` on ``device_type`` (nothing when ``dtype`` is ``None``)."""
    return nullcontext() if dtype is None else torch.autocast(device_type, dtype=dtype)


def functional_children(model: nn.Module) -> set[nn.Module]:
    """Modules whose parent calls their parameters functionally, so their hooks never run:
    ``nn.MultiheadAttention``'s ``out_proj`` (torch applies it with ``F.linear``)."""
    return {module.out_proj for module in model.modules()
            if isinstance(module, nn.MultiheadAttention)}


def supported_layers(model: nn.Module) -> list[LayerIO]:
    """Every Linear/Conv1d/Conv2d/Embedding module of ``model`` (:func:`covered_by_kronecker`)
    whose weight requires grad and whose forward hooks run (:func:`functional_children`
    excluded), by module name."""
    bypassed = functional_children(model)
    return [layer_io(name, module) for name, module in model.named_modules()
            if covered_by_kronecker(module) and module.weight.requires_grad
            and module not in bypassed]


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
        self._pending: list[tuple[LayerIO, int, Tensor]] = []
        self._handles = [model.register_forward_pre_hook(self._on_model_forward)]
        self._handles += [layer.module.register_forward_hook(partial(self._on_forward, layer))
                          for layer in self.layers]
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
            self.forwards.pop()
            for layer in self.layers:
                layer.records.pop()
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
        for layer, call, layer_output in self._pending:
            layer_output.register_hook(partial(self._on_grad, layer, layer.record, call))
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

    def _on_forward(self, layer: LayerIO, module: nn.Module, args: tuple[Tensor, ...],
                    output: Tensor) -> None:
        if not self.active or not self._enabled(module) or not layer.records:
            return
        record = layer.record
        call = len(record.inputs)
        record.inputs.append(args[0].detach())
        record.outputs.append(output)
        if output.requires_grad:
            self._pending.append((layer, call, output))

    def _on_grad(self, layer: LayerIO, record: LayerRecord, call: int, grad: Tensor) -> None:
        if self._recording and record.grads:
            record.grads[-1][call] = self._unscaled(grad)


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
