"""A data set held as tensors on the training device, and its minibatch iterator."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from ngexp.data.spec import DataSpec

#: A batch transform run on the device, e.g. random crop + flip: (inputs, generator) -> inputs.
Augment = Callable[[Tensor, torch.Generator], Tensor]


@dataclass
class Split:
    """Inputs and targets of one split; the first dimension indexes examples."""

    inputs: Tensor
    targets: Tensor

    def __len__(self) -> int:
        return self.inputs.shape[0]

    def to(self, device: torch.device) -> Split:
        return Split(self.inputs.to(device), self.targets.to(device))


@dataclass
class DataBundle:
    """Splits of a data set (``val`` may be ``None``) with an optional training augmentation."""

    spec: DataSpec
    train: Split
    test: Split
    val: Split | None = None
    augment: Augment | None = None

    def to(self, device: torch.device) -> DataBundle:
        return DataBundle(self.spec, self.train.to(device), self.test.to(device),
                          self.val.to(device) if self.val is not None else None, self.augment)


def epoch_batches(split: Split, batch_size: int, permutation: Tensor, start: int = 0,
                  augment: Augment | None = None,
                  generator: torch.Generator | None = None) -> Iterator[tuple[Tensor, Tensor]]:
    """Minibatches of ``split`` in the order of ``permutation`` (on the split's device), from
    batch index ``start``; the last, smaller batch is dropped so every step sees ``batch_size``
    examples (steps per epoch = len(split) // batch_size)."""
    for begin in range(start * batch_size, len(permutation) - batch_size + 1, batch_size):
        index = permutation[begin:begin + batch_size]
        inputs = split.inputs[index]
        if augment is not None:
            inputs = augment(inputs, generator)
        yield inputs, split.targets[index]


def eval_batches(split: Split, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
    """Consecutive minibatches covering the whole split."""
    for begin in range(0, len(split), batch_size):
        yield split.inputs[begin:begin + batch_size], split.targets[begin:begin + batch_size]
