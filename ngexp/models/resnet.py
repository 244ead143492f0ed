"""Residual networks for small images: CIFAR ResNet-20/32/56/... and pre-activation ResNet-18/34.

One :class:`ResNet` assembles a 3x3 stem, stages of basic blocks (two 3x3 convolutions and a
shortcut) and a global-average-pool classifier; the two families differ in the block
(post- or pre-activation), the stage widths and the shortcut kind:

- ``resnet``: He et al. (2016a, Sec. 4.2), depth ``6n + 2``, three stages of ``n`` blocks with
  16/32/64 channels; ResNet-20 has 0.27M parameters.
- ``preact_resnet``: He et al. (2016b), four stages of 64..512 channels (2-2-2-2 blocks for 18,
  3-4-6-3 for 34), CIFAR stem (3x3 convolution, stride 1, no max pool), final BN-ReLU.

Shortcuts where the shape changes (stride 2 and more channels): option ``A`` subsamples and
appends zero channels (parameter-free, as in the CIFAR experiments of 2016a); option ``B`` is a
1x1 strided convolution (+ BN in the post-activation block; in the pre-activation block it reads
the block's BN-ReLU output, as in the authors' code). Global average pooling makes 28x28 inputs
work unpadded (28 -> 14 -> 7 (-> 4) spatially).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch.nn.functional as F
from torch import Tensor, nn

from ngexp.data.spec import DataSpec
from ngexp.models.layers import init_weights, input_layers, require_data
from ngexp.options import check, checked, configurable

Shortcut = Literal["A", "B"]

#: Blocks per stage of the pre-activation ResNets by depth.
PREACT_BLOCKS: dict[int, tuple[int, ...]] = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}


def conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


class ZeroPadShortcut(nn.Module):
    """Option A: ``x[:, :, ::stride, ::stride]`` with ``out - in`` zero channels appended."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.stride, self.extra = stride, out_channels - in_channels

    def forward(self, x: Tensor) -> Tensor:
        return F.pad(x[:, :, :: self.stride, :: self.stride], (0, 0, 0, 0, 0, self.extra))


def make_shortcut(
    kind: str, in_channels: int, out_channels: int, stride: int, batch_norm: bool
) -> nn.Module | None:
    """``None`` for the identity, else the option-``kind`` (A or B) map from ``in`` to ``out``
    channels."""
    if stride == 1 and in_channels == out_channels:
        return None
    if kind == "A":
        return ZeroPadShortcut(in_channels, out_channels, stride)
    conv = nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)
    return nn.Sequential(conv, nn.BatchNorm2d(out_channels)) if batch_norm else conv


class BasicBlock(nn.Module):
    """Post-activation block (2016a, Fig. 2): ``relu(bn2(conv2(relu(bn1(conv1 x)))) + s(x))``."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, shortcut: str) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_channels, out_channels, stride)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = conv3x3(out_channels, out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = make_shortcut(shortcut, in_channels, out_channels, stride, batch_norm=True)

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(out + (x if self.shortcut is None else self.shortcut(x)))


class PreActBlock(nn.Module):
    """Pre-activation block (2016b, Fig. 4e): with ``a = relu(bn1(x))``,
    ``conv2(relu(bn2(conv1 a))) + (x if identity else s(a))``."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, shortcut: str) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = conv3x3(in_channels, out_channels, stride)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.conv2 = conv3x3(out_channels, out_channels)
        self.shortcut = make_shortcut(shortcut, in_channels, out_channels, stride, batch_norm=False)

    def forward(self, x: Tensor) -> Tensor:
        a = F.relu(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(self.conv1(a))))
        return out + (x if self.shortcut is None else self.shortcut(a))


class ResNet(nn.Module):
    """Stem, stages of residual blocks, classifier; see the module docstring.

    Input ``(N, C, H, W)``, output logits ``(N, num_classes)``. Stage ``i`` has ``blocks[i]``
    blocks of ``widths[i]`` channels; the first block of every stage but the first has stride 2.
    """

    def __init__(
        self,
        spec: DataSpec,
        blocks: Sequence[int],
        widths: Sequence[int],
        preact: bool,
        shortcut: str,
    ) -> None:
        super().__init__()
        require_data(spec, "the ResNet", ("image",))
        block = PreActBlock if preact else BasicBlock
        self.input = input_layers(spec)
        stem: list[nn.Module] = [conv3x3(spec.in_channels, widths[0])]
        if not preact:  # a pre-activation network starts each block with BN-ReLU instead
            stem += [nn.BatchNorm2d(widths[0]), nn.ReLU()]
        self.stem = nn.Sequential(*stem)
        layers: list[nn.Module] = []
        in_channels = widths[0]
        for stage, (num_blocks, width) in enumerate(zip(blocks, widths, strict=True)):
            for index in range(num_blocks):
                stride = 2 if stage > 0 and index == 0 else 1
                layers.append(block(in_channels, width, stride, shortcut))
                in_channels = width
        self.stages = nn.Sequential(*layers)
        head: list[nn.Module] = [nn.BatchNorm2d(in_channels), nn.ReLU()] if preact else []
        head += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(in_channels, spec.num_classes)]
        self.head = nn.Sequential(*head)
        init_weights(self, "relu")

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.stages(self.stem(self.input(x))))


def check_cifar_resnet(depth: int, **_: object) -> None:
    check(isinstance(depth, int) and depth >= 8 and (depth - 2) % 6 == 0, "depth", depth,
          "6n + 2 for an integer n >= 1 (20, 32, 44, 56, 110, ...)")


@configurable("model", "resnet")
@checked(check_cifar_resnet)
def cifar_resnet(spec: DataSpec, depth: int = 20, shortcut: Shortcut = "A") -> ResNet:
    """ResNet-``depth`` of He et al. (2016a, Sec. 4.2), ``depth = 6n + 2``."""
    n = (depth - 2) // 6
    return ResNet(spec, (n, n, n), (16, 32, 64), preact=False, shortcut=shortcut)


@configurable("model", "preact_resnet")
@checked()
def preact_resnet(spec: DataSpec, depth: Literal[18, 34] = 18, shortcut: Shortcut = "B") -> ResNet:
    """Pre-activation ResNet-18/34 of He et al. (2016b) with a CIFAR stem."""
    return ResNet(spec, PREACT_BLOCKS[depth], (64, 128, 256, 512), preact=True, shortcut=shortcut)

