"""Random images of a chosen shape, for benchmarks and smoke tests: with random labels
(nothing to learn but memorization) or with the labels of a fixed random linear classifier
(learnable, so a loss that goes down shows training works)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch

from ngexp.data.augment import make_augment
from ngexp.data.bundle import DataBundle, Split
from ngexp.data.spec import DataSpec
from ngexp.options import check, check_integer, checked, configurable


def check_synthetic_data(shape: Sequence[int], num_classes: int, num_train: int, num_test: int,
                         **_: object) -> None:
    check(len(shape) >= 1 and all(isinstance(d, int) and d >= 1 for d in shape), "shape",
          list(shape), "a list of positive sizes, e.g. [3, 32, 32]")
    check_integer("num_classes", num_classes, 2)
    check_integer("num_train", num_train, 1)
    check_integer("num_test", num_test, 1)


@configurable("data", "synthetic")
@checked(check_synthetic_data)
def synthetic_data(name: str = "synthetic", shape: Sequence[int] = (3, 32, 32),
                   num_classes: int = 10, num_train: int = 10000, num_test: int = 2000,
                   seed: int = 0, random_crop: int = 0, hflip: bool = False,
                   labels: Literal["random", "linear"] = "random") -> DataBundle:
    """Uniform [0, 1) inputs of ``shape`` (C, H, W); ``labels``: ``random`` (uniform, nothing
    to learn) or ``linear``, ``argmax_c w_c^T (x - 1/2)`` for fixed Gaussian ``w_c`` (a
    learnable rule, the same for both splits)."""
    generator = torch.Generator().manual_seed(seed)
    teacher = torch.randn(math.prod(shape), num_classes,
                          generator=torch.Generator().manual_seed(seed + 1))

    def split(n: int) -> Split:
        inputs = torch.rand(n, *shape, generator=generator)
        if labels == "linear":
            return Split(inputs, ((inputs.flatten(1) - 0.5) @ teacher).argmax(1))
        return Split(inputs, torch.randint(num_classes, (n,), generator=generator))

    channels = shape[0] if len(shape) == 3 else 1  # per channel for images, one for sequences
    spec = DataSpec(name, tuple(shape), num_classes, "classification", (0.5,) * channels,
                    (0.2887,) * channels)  # moments of U(0, 1)
    return DataBundle(spec, split(num_train), split(num_test), None,
                      make_augment(random_crop, hflip))
