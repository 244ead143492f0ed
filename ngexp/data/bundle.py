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

    def shard(self, rank: int, world_size: int) -> Split:
        """Rank ``rank``'s contiguous share of ``world_size`` (sizes differ by at most one)."""
        begin, end = (len(self) * r // world_size for r in (rank, rank + 1))
        return Split(self.inputs[begin:end], self.targets[begin:end])


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
                  augment: Augment | None = None, generator: torch.Generator | None = None,
                  rank: int = 0, world_size: int = 1) -> Iterator[tuple[Tensor, Tensor]]:
    """Minibatches of ``split`` in the order of ``permutation`` (on the split's device), from
    batch index ``start``; the last, smaller batch is dropped so every step sees ``batch_size``
    examples (steps per epoch = len(split) // batch_size).

    Data-parallel, ``batch_size`` is per rank: the global batch of ``world_size x batch_size``
    examples is the single process's, and rank ``r`` takes its rows ``r B .. (r + 1) B - 1``
    (ranks in order concatenate to it). An augmentation transforms the whole global batch
    (drawing from ``generator`` as one process would, so all ranks' generators stay equal)
    before the rank's rows are taken."""
    size = batch_size * world_size
    rows = slice(rank * batch_size, (rank + 1) * batch_size)
    for begin in range(start * size, len(permutation) - size + 1, size):
        index = permutation[begin:begin + size]
        if augment is None:
            index = index[rows]
            yield split.inputs[index], split.targets[index]
        else:
            inputs = augment(split.inputs[index], generator)
            yield inputs[rows], split.targets[index[rows]]


def eval_batches(split: Split, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
    """Consecutive minibatches covering the whole split."""
    for begin in range(0, len(split), batch_size):
        yield split.inputs[begin:begin + batch_size], split.targets[begin:begin + batch_size]
