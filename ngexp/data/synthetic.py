"""Random images with random labels of a chosen shape: for benchmarks and smoke tests."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ngexp.config import check, schema
from ngexp.data.augment import make_augment
from ngexp.data.bundle import DataBundle, Split
from ngexp.data.spec import DataSpec


@schema("data", "synthetic")
@dataclass
class SyntheticDataConfig:
    """Uniform [0, 1) inputs of ``shape`` (C, H, W) and uniform labels; nothing to learn."""

    _target_: str = "ngexp.data.synthetic.synthetic_data"
    name: str = "synthetic"
    shape: list[int] = field(default_factory=lambda: [3, 32, 32])
    num_classes: int = 10
    num_train: int = 10000
    num_test: int = 2000
    seed: int = 0
    random_crop: int = 0
    hflip: bool = False

    def __post_init__(self) -> None:
        check(len(self.shape) >= 1 and all(d >= 1 for d in self.shape), "data.shape",
              list(self.shape), "a list of positive sizes, e.g. [3, 32, 32]")
        check(self.num_classes >= 2, "data.num_classes", self.num_classes, "an integer >= 2")
        check(self.num_train >= 1 and self.num_test >= 1, "data.num_train", self.num_train,
              "num_train and num_test >= 1")


def synthetic_data(name: str, shape: list[int], num_classes: int, num_train: int,
                   num_test: int, seed: int, random_crop: int = 0,
                   hflip: bool = False) -> DataBundle:
    generator = torch.Generator().manual_seed(seed)

    def split(n: int) -> Split:
        return Split(torch.rand(n, *shape, generator=generator),
                     torch.randint(num_classes, (n,), generator=generator))

    channels = shape[0]
    spec = DataSpec(name, tuple(shape), num_classes, "classification", (0.5,) * channels,
                    (0.2887,) * channels)  # moments of U(0, 1)
    return DataBundle(spec, split(num_train), split(num_test), None,
                      make_augment(random_crop, hflip))
