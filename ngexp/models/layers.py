"""Pieces shared by the model families: input layers, activations, dense stacks, initialization.

Every weight-bearing layer is a standard ``nn.Linear`` / ``nn.Conv2d`` / ``nn.BatchNorm*d`` module
(the curvature hooks of :mod:`ngexp.optim` attach to Linear and Conv2d modules), and the
parameter-free input layers here run before them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ngexp.data.spec import DataSpec
from ngexp.errors import IncompatibleData
from ngexp.options import check_choice

K = TypeVar("K")
V = TypeVar("V")

#: Activation modules by config name (``model.activation``).
ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "leaky_relu": nn.LeakyReLU,
    "elu": nn.ELU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
}

#: The names of :data:`ACTIVATIONS`, for annotations (``activation: Activation``).
Activation = Literal[tuple(ACTIVATIONS)]  # type: ignore[valid-type]

#: Activations initialized with Kaiming's rule (He et al. 2015); the others with Xavier's.
RELU_LIKE = ("relu", "leaky_relu", "elu", "gelu", "silu")


def choose(table: Mapping[K, V], key: str, value: K) -> V:
    """``table[value]``, or a one-line ``ValueError`` naming ``key``, ``value`` and the choices."""
    check_choice(key, value, tuple(table))
    return table[value]


def make_activation(name: str) -> nn.Module:
    """A fresh activation module for config value ``model.activation``."""
    return choose(ACTIVATIONS, "model.activation", name)()


class Standardize(nn.Module):
    """Per-channel ``(x - mean) / std`` with the training-set statistics of ``spec``.

    Accepts images ``(N, C, H, W)`` (any memory format) and flattened images ``(N, C*H*W)``
    (channel-major, as ``x.flatten(1)`` of an image). ``spec.mean``/``spec.std`` hold one value
    per channel, or a single value for all channels. The statistics are non-persistent buffers:
    they come from the data spec at construction, not from checkpoints.
    """

    def __init__(self, spec: DataSpec) -> None:
        super().__init__()
        mean = torch.tensor(spec.mean, dtype=torch.float32)
        std = torch.tensor(spec.std, dtype=torch.float32)
        if mean.shape != std.shape or mean.numel() not in (1, spec.in_channels):
            raise ValueError(
                f"data spec {spec.name!r}: mean {spec.mean} and std {spec.std} need 1 or "
                f"{spec.in_channels} values each"
            )
        self.register_buffer("mean", mean.view(-1, 1, 1), persistent=False)
        self.register_buffer("std", std.view(-1, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 2:
            channels = x.unflatten(1, (self.mean.shape[0], -1))  # (N, C, H*W)
            return ((channels - self.mean[..., 0]) / self.std[..., 0]).flatten(1)
        return (x - self.mean) / self.std


class PadTo(nn.Module):
    """Zero-pad images ``(N, C, H, W)`` symmetrically to at least ``size x size``.

    Used before :class:`Standardize`, so the border is black in pixel space: a 28x28 MNIST digit
    becomes the 32x32 input with a blank margin that LeNet-5 was designed for (LeCun et al. 1998).
    """

    def __init__(self, height: int, width: int, size: int) -> None:
        super().__init__()
        pad_h, pad_w = max(size - height, 0), max(size - width, 0)
        self.padding = (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2)

    def forward(self, x: Tensor) -> Tensor:
        return F.pad(x, self.padding)

    def extra_repr(self) -> str:
        return f"padding={self.padding}"


def require_data(spec: DataSpec, model: str, kinds: tuple[str, ...]) -> None:
    """Raise :class:`IncompatibleData` unless examples of ``spec`` are of one of ``kinds``
    (:attr:`DataSpec.kind`); ``model`` names the model in the message."""
    if spec.kind not in kinds:
        raise IncompatibleData(model, spec.name, spec.describe(), kinds)


def input_layers(spec: DataSpec, min_size: int | None = None) -> nn.Sequential:
    """The parameter-free first layers of an image model: optional :class:`PadTo` (when the
    images of ``spec`` are smaller than ``min_size``) followed by :class:`Standardize`."""
    layers: list[nn.Module] = []
    height, width = spec.input_shape[-2:]
    if min_size is not None and min(height, width) < min_size:
        layers.append(PadTo(height, width, min_size))
    layers.append(Standardize(spec))
    return nn.Sequential(*layers)


def dense_stack(
    in_features: int,
    widths: Sequence[int],
    out_features: int,
    activation: str,
    batch_norm: bool = False,
) -> nn.Sequential:
    """``Linear -> [BatchNorm1d] -> activation`` for each hidden width, then a linear output layer.

    Input ``(N, in_features)``, output ``(N, out_features)``. Hidden Linear layers have no bias
    when followed by batch norm (its shift replaces the bias).
    """
    layers: list[nn.Module] = []
    for width in widths:
        layers.append(nn.Linear(in_features, width, bias=not batch_norm))
        if batch_norm:
            layers.append(nn.BatchNorm1d(width))
        layers.append(make_activation(activation))
        in_features = width
    layers.append(nn.Linear(in_features, out_features))
    return nn.Sequential(*layers)


def init_weights(model: nn.Module, activation: str) -> None:
    """Initialize every Linear/Conv2d of ``model`` for hidden units of type ``activation``.

    ReLU-like units: Kaiming normal, ``std = sqrt(2 / fan_in)`` (He et al. 2015, Eq. 10);
    tanh/sigmoid units: Xavier uniform with the gain of the nonlinearity (Glorot & Bengio 2010,
    Eq. 16; gain 5/3 for tanh, 1 for sigmoid). Biases are zero; batch norms keep PyTorch's
    identity start (scale 1, shift 0).
    """
    check_choice("model.activation", activation, tuple(ACTIVATIONS))
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            if activation in RELU_LIKE:
                nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
            else:
                nn.init.xavier_uniform_(module.weight, gain=nn.init.calculate_gain(activation))
            if module.bias is not None:
                nn.init.zeros_(module.bias)


@torch.no_grad()
def sparse_init_(weight: Tensor, num_nonzero: int = 15, std: float = 1.0) -> Tensor:
    """Sparse initialization of Martens (2010, Sec. 5): each unit (row of ``weight``, shape
    ``(out, in)``) gets ``num_nonzero`` incoming weights drawn from ``N(0, std^2)`` at randomly
    chosen inputs, all others zero (all inputs when ``in < num_nonzero``)."""
    rows, cols = weight.shape
    keep = min(num_nonzero, cols)
    chosen = torch.rand(rows, cols, device=weight.device).argsort(dim=1)[:, :keep]
    values = torch.randn(rows, keep, device=weight.device, dtype=weight.dtype) * std
    weight.zero_().scatter_(1, chosen, values)
    return weight
