"""VGG-11/13/16/19 (Simonyan & Zisserman 2015) for 32x32 images, with or without batch norm,
at full or reduced width."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from torch import Tensor, nn

from ngexp.data.spec import DataSpec
from ngexp.models.layers import choose, dense_stack, init_weights, input_layers, require_data
from ngexp.options import check, checked, configurable

#: Convolution widths by depth, "M" = 2x2 max pooling (configurations A, B, D, E of Table 1).
VGG_LAYERS: dict[int, tuple[int | str, ...]] = {
    11: (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    13: (64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    16: (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"),
    19: (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
         512, 512, 512, 512, "M", 512, 512, 512, 512, "M"),
}


def check_vgg(head_widths: Sequence[int], width: float = 1.0, **_: object) -> None:
    check(all(isinstance(w, int) and w >= 1 for w in head_widths), "head_widths",
          list(head_widths), "a list of integers >= 1")
    check(isinstance(width, (int, float)) and not isinstance(width, bool) and 0 < width <= 4,
          "width", width, "a number in (0, 4], the factor on every convolution's channels")


@configurable("model", "vgg")
@checked(check_vgg)
class VGG(nn.Module):
    """3x3 convolutions (padding 1) with ReLU and five 2x2 max pools, then a CIFAR-style head.

    Input ``(N, C, H, W)``; 28x28 images are zero-padded to 32x32 so the five pools end at 1x1.
    With ``batch_norm`` every convolution is followed by ``BatchNorm2d`` and has no bias.
    Head: global average pool (the identity on the 1x1 maps of 32x32 inputs) -> flatten 512 ->
    hidden ``Linear -> [BatchNorm1d] -> ReLU`` per ``head_widths`` -> ``Linear(num_classes)``.
    The default ``head_widths=[]`` is the single linear classifier common for CIFAR;
    ``[512, 512]`` gives the 512-512-classes head of chengyangfu/pytorch-vgg-cifar10 (without
    its dropout).
    The ImageNet 4096-4096 head is not provided. Output logits ``(N, num_classes)``.
    ``width`` multiplies every convolution's channel count (rounded, at least 1): ``0.25`` is a
    small VGG (16 ... 128 channels) for CPU-scale studies.
    """

    def __init__(
        self,
        spec: DataSpec,
        depth: Literal[11, 13, 16, 19] = 16,
        batch_norm: bool = False,
        head_widths: Sequence[int] = (),
        width: float = 1.0,
    ) -> None:
        super().__init__()
        require_data(spec, "VGG", ("image",))
        self.input = input_layers(spec, min_size=32)
        layers: list[nn.Module] = []
        in_channels = spec.in_channels
        for item in choose(VGG_LAYERS, "model.depth", depth):
            if item == "M":
                layers.append(nn.MaxPool2d(2))
                continue
            channels = max(1, round(item * width))
            layers.append(nn.Conv2d(in_channels, channels, kernel_size=3, padding=1,
                                    bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm2d(channels))
            layers.append(nn.ReLU())
            in_channels = channels
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = dense_stack(
            in_channels, list(head_widths), spec.num_classes, "relu", batch_norm
        )
        init_weights(self, "relu")

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.pool(self.features(self.input(x))).flatten(1))

