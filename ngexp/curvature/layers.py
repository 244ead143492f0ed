"""The layer kinds the curvature capture covers, each as ``groups`` affine maps ``s = [W | b]
[a; 1]`` from input rows ``a`` to output rows ``s``, and what one forward recorded of a layer.

One class per kind (kfac-pytorch's per-layer-type helpers), each with one job: reading its
module's layout. :class:`LayerIO` is the base and ``nn.Linear`` itself (a row is the last
dimension of a ``(B, *, D)`` input); :class:`ConvIO` is ``nn.Conv1d``/``nn.Conv2d`` (a row is
the input patch of one output position, KFC, Grosse & Martens 2016; one block per channel
group); :class:`EmbeddingIO` is ``nn.Embedding`` (a linear map of one-hot rows);
:class:`NormIO` the scale and shift of a norm layer; :mod:`ngexp.curvature.attention` holds the
four projections of ``nn.MultiheadAttention``. A kind knows

- its shape (:meth:`LayerIO.read_shape`: ``groups``, ``fan_in``, ``out_dim``, ``in_dim``);
- its weight layout: :meth:`LayerIO.matrix` ``[W | b] (groups, out_dim, in_dim)`` of weight- and
  bias-shaped tensors, and its inverses (:meth:`LayerIO.split`, :meth:`LayerIO.write_weight`);
- its rows: input rows without (:meth:`LayerIO.features`) and with the homogeneous coordinate
  (:meth:`LayerIO.input_rows`), output-gradient rows (:meth:`LayerIO.grad_rows`).

What the capture recorded of the layer is a list of :class:`LayerRecord` (one per kept forward,
:attr:`LayerIO.records`), written by :mod:`ngexp.curvature.records`; how a kind's module is
hooked is :mod:`ngexp.curvature.hooks`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SUPPORTED_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding)
CONVOLUTIONS = (nn.Conv1d, nn.Conv2d)
#: What a hooked call reports: the layer, its input, its output, and a map from the output's
#: gradient to the layer's output-gradient rows (``None``: the gradient itself).
OnCall = Callable[["LayerIO", Tensor, Tensor, "Callable[[Tensor], Tensor] | None"], None]

F_ = TypeVar("F_", bound=Callable[..., object])


def eager(fn: F_) -> F_:
    """``fn``, run eagerly even inside a ``torch.compile``'d forward: dynamo breaks the graph
    around its calls, so it gets real tensors (inputs and outputs of the compiled graphs)
    that it can keep and put gradient hooks on, exactly as in an eager forward. The capture's
    hooks call such functions only once their cheap (traced) checks say they record, so a
    compiled forward that never records is one graph. Outside compilation ``fn`` runs as it
    is: ``torch.compiler.disable`` imports dynamo, seconds that no eager run should pay."""

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        if torch.compiler.is_compiling():
            return compile_disabled(fn)(*args, **kwargs)
        return fn(*args, **kwargs)

    return run  # type: ignore[return-value]


@functools.cache
def compile_disabled(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``torch.compiler.disable(fn)``, made once, on the first compiled call."""
    return torch.compiler.disable(fn)


@dataclass(eq=False)
class LayerRecord:
    """What one forward left of one layer: ``inputs[c]`` of its ``c``-th call, ``outputs[c]``
    its output, ``grads[k][c]`` that output's gradient in the forward's ``k``-th pass."""

    inputs: list[Tensor] = field(default_factory=list)
    outputs: list[Tensor] = field(default_factory=list)
    grads: list[dict[int, Tensor]] = field(default_factory=list)

    def release(self) -> None:
        """Drop the tensors (the gradient hooks on ``outputs`` refer to this record: a cycle
        through autograd's C++ graph that Python's collector cannot break)."""
        self.inputs.clear()
        self.outputs.clear()
        self.grads.clear()


class LayerIO:
    """One layer as ``groups`` affine maps (``nn.Linear`` itself; the other kinds subclass it)
    and what the capture recorded of it: one :class:`LayerRecord` per kept forward
    (:attr:`records`); :attr:`record` is the latest, :attr:`inputs` and :attr:`grads` its own.

    The layer reads its module's ``weight`` and ``bias``, or, when ``weight`` is given, the
    ``weight`` and ``bias`` given (a block of another module's parameter, named
    ``weight_name``: the attention projections).
    """

    def __init__(self, name: str, module: nn.Module, *, weight: nn.Parameter | None = None,
                 bias: nn.Parameter | None = None, weight_name: str | None = None) -> None:
        self.name = name
        self.module = module
        own = weight is None
        self.weight: nn.Parameter = module.weight if own else weight
        self.bias: nn.Parameter | None = getattr(module, "bias", None) if own else bias
        self.has_bias = self.bias is not None
        self.params: list[nn.Parameter] = [self.weight] + ([self.bias] if self.has_bias else [])
        self.weight_name = weight_name or (f"{name}.weight" if name else "weight")
        self.records: list[LayerRecord] = []
        self.read_shape()

    def read_shape(self) -> None:
        """Read the layer's dimensions from its module (again after pruning removed units);
        each layer kind reads its own."""
        linear = self.module
        self.groups, self.fan_in, self.out_dim = 1, linear.in_features, linear.out_features
        self.in_dim = self.fan_in + int(self.has_bias)

    @property
    def record(self) -> LayerRecord:
        """The latest record (an empty one before any capturing forward)."""
        return self.records[-1] if self.records else LayerRecord()

    @property
    def inputs(self) -> list[Tensor]:
        return self.record.inputs

    @property
    def grads(self) -> list[dict[int, Tensor]]:
        return self.record.grads

    # ------------------------------------------------------------------ layouts
    def weight_matrix(self, weight: Tensor) -> Tensor:
        """``W (groups, out_dim, fan_in)`` of a weight-shaped tensor (a view where possible)."""
        return weight.reshape(self.groups, self.out_dim, self.fan_in)

    def weight_like(self, matrix: Tensor) -> Tensor:
        """Inverse of :meth:`weight_matrix`: a tensor shaped like the weight."""
        return matrix.reshape(self.module.weight.shape)

    def bias_vector(self, bias: Tensor) -> Tensor:
        """``b (groups, out_dim)`` of a bias-shaped tensor."""
        return bias.reshape(self.groups, self.out_dim)

    def write_weight(self, target: Tensor, matrix: Tensor) -> None:
        """Copy ``matrix (groups, out_dim, fan_in)`` into the weight-shaped ``target`` in place
        (its memory layout, e.g. channels_last, is kept)."""
        if target.is_contiguous():
            target.view(self.groups, self.out_dim, self.fan_in).copy_(matrix)
        else:
            target.copy_(matrix.reshape(target.shape))

    def write_bias(self, target: Tensor, vector: Tensor) -> None:
        """Copy ``vector (groups, out_dim)`` into the bias-shaped ``target`` in place."""
        target.copy_(vector.reshape(target.shape))

    def matrix(self, weight: Tensor, bias: Tensor | None) -> Tensor:
        """``[W | b]`` from weight- and bias-shaped tensors: ``(groups, out_dim, in_dim)``."""
        matrix = self.weight_matrix(weight)
        if self.has_bias:
            assert bias is not None
            matrix = torch.cat([matrix, self.bias_vector(bias)[..., None]], dim=-1)
        return matrix

    def split(self, matrix: Tensor) -> tuple[Tensor, Tensor | None]:
        """Inverse of :meth:`matrix`: weight-shaped and bias-shaped (or ``None``) tensors."""
        weight = self.weight_like(matrix[..., : self.fan_in])
        bias = matrix[..., self.fan_in].reshape(self.bias.shape) if self.bias is not None else None
        return weight, bias

    # ------------------------------------------------------------------ rows
    def features(self, x: Tensor) -> Tensor:
        """Input rows without the homogeneous coordinate, float32: ``(B, P, groups, fan_in)``,
        ``P`` the weight-sharing positions (conv output positions, extra Linear dims; 1 for
        ``(B, D)`` inputs)."""
        return x.reshape(x.shape[0], -1, 1, x.shape[-1]).float()

    def input_rows(self, x: Tensor) -> Tensor:
        """Rows ``[a; 1]`` of one call's input, float32: ``(B, P, groups, in_dim)``."""
        rows = self.features(x)
        if self.has_bias:
            rows = torch.cat([rows, rows.new_ones(*rows.shape[:-1], 1)], dim=-1)
        return rows

    def grad_rows(self, grad: Tensor) -> Tensor:
        """Rows of one call's output gradient, float32: ``(B, P, groups, out_dim)``."""
        return grad.reshape(grad.shape[0], -1, 1, grad.shape[-1]).float()


class ConvIO(LayerIO):
    """``nn.Conv1d``/``nn.Conv2d`` as ``groups`` affine maps (one per channel group) of the input
    patches of its output positions: ``fan_in = C_in / groups * prod(kernel)``, ``out_dim =
    C_out / groups``, ``P`` = the output positions."""

    def read_shape(self) -> None:
        conv = self.module
        self.groups = conv.groups
        self.fan_in = conv.in_channels // conv.groups * math.prod(conv.kernel_size)
        self.out_dim = conv.out_channels // conv.groups
        self.in_dim = self.fan_in + int(self.has_bias)

    def features(self, x: Tensor) -> Tensor:
        return self._patches(x).float()

    def grad_rows(self, grad: Tensor) -> Tensor:
        batch = grad.shape[0]
        return grad.reshape(batch, self.groups, self.out_dim, -1).permute(0, 3, 1, 2).float()

    def padded(self, x: Tensor) -> Tensor:
        """The input ``(B, C, *spatial)`` with the convolution's padding applied."""
        conv = self.module
        if isinstance(conv.padding, str) or conv.padding_mode != "zeros" or any(conv.padding):
            mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
            x = F.pad(x, conv._reversed_padding_repeated_twice, mode=mode)
        return x

    def _patches(self, x: Tensor) -> Tensor:
        """Input patches ``(B, L, groups, fan_in)``, channel-major like the weight: strided
        views of the (padded) input, then one copy into that layout (cheaper than ``unfold``
        followed by a transpose). ``L`` counts the output positions (``H_out W_out`` for
        Conv2d, ``L_out`` for Conv1d)."""
        conv = self.module
        x = self.padded(x)
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

    def read_shape(self) -> None:
        module = self.module
        self.groups, self.fan_in, self.out_dim = 1, module.num_embeddings, module.embedding_dim
        self.in_dim = module.num_embeddings

    def weight_matrix(self, weight: Tensor) -> Tensor:
        return weight.T[None]

    def weight_like(self, matrix: Tensor) -> Tensor:
        return matrix.reshape(self.out_dim, self.fan_in).T

    def write_weight(self, target: Tensor, matrix: Tensor) -> None:
        target.copy_(matrix[0].T)

    def features(self, x: Tensor) -> Tensor:
        rows = F.one_hot(x.reshape(x.shape[0], -1), self.fan_in).float()
        padding = self.module.padding_idx
        if padding is not None:
            rows[..., padding] = 0.0
        return rows[:, :, None]


class NormIO(LayerIO):
    """The affine part ``s_c = gamma_c xhat_c + beta_c`` of a LayerNorm, GroupNorm or
    BatchNorm as ``C`` groups (one per channel, ``C = gamma.numel()``) of an affine map from
    the scalar normalized input ``xhat_c`` to the scalar output ``s_c``: ``fan_in = 1``,
    ``out_dim = 1``, ``W_c = [gamma_c | beta_c]``. K-FAC's factors per channel are then ``A_c =
    E[[xhat; 1][xhat; 1]^T]`` (2 x 2) and ``G_c = E[g_c^2]`` (1 x 1): the same structure as a
    depthwise 1 x 1 convolution, so the channel blocks of the scale-and-shift parameters
    (kfac-jax's ``ScaleAndShift`` blocks, here block-diagonal over channels and
    Kronecker-factored like every other layer; EKFAC re-estimates their diagonal). The capture
    records ``xhat``, recomputed without affine from the module's input in its forward hook
    (:func:`ngexp.curvature.hooks.normalized`). The channel axis is the last
    ``len(normalized_shape)`` axes for LayerNorm and axis 1 otherwise."""

    def read_shape(self) -> None:
        self.groups, self.fan_in, self.out_dim = self.module.weight.numel(), 1, 1
        self.in_dim = 1 + int(self.has_bias)

    def weight_matrix(self, weight: Tensor) -> Tensor:
        return weight.reshape(self.groups, 1, 1)

    def features(self, x: Tensor) -> Tensor:
        return self._channel_rows(x).float()

    def grad_rows(self, grad: Tensor) -> Tensor:
        return self._channel_rows(grad).float()

    def _channel_rows(self, x: Tensor) -> Tensor:
        """``(B, ...)`` with ``C`` channels -> ``(B, P, C, 1)``."""
        if isinstance(self.module, nn.LayerNorm):
            return x.reshape(x.shape[0], -1, self.groups, 1)
        return x.reshape(x.shape[0], self.groups, -1).transpose(1, 2)[..., None]


#: Normalization layers whose affine parameters :class:`NormIO` covers (SyncBatchNorm is left
#: out: its batch statistics span the ranks, which a local recomputation would not).
NORMS = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def layer_io(name: str, module: nn.Module) -> LayerIO:
    """The :class:`LayerIO` of a supported module."""
    if isinstance(module, nn.Embedding):
        return EmbeddingIO(name, module)
    if isinstance(module, NORMS):
        return NormIO(name, module)
    if isinstance(module, CONVOLUTIONS):
        return ConvIO(name, module)
    return LayerIO(name, module)


def covered_by_kronecker(module: nn.Module) -> bool:
    """Whether ``module`` is a layer the capture treats exactly: Linear, Conv1d/2d,
    Embeddings whose gradient is the plain lookup's (dense, not scaled by frequency), and the
    affine parameters of LayerNorm, GroupNorm and BatchNorm (:class:`NormIO`)."""
    if isinstance(module, nn.Embedding):
        return not (module.sparse or module.scale_grad_by_freq)
    if isinstance(module, NORMS):
        return getattr(module, "weight", None) is not None and type(module) in NORMS
    return isinstance(module, SUPPORTED_MODULES)


