"""The training step path, driven step by step: an in-process :class:`Trainer` and the batches
of its own loop, and a counter of the calls that make the host wait for the device.

Shared by the CPU tests of ``tests/test_gpu_path.py`` and the ``gpu``-marked ones of
``tests/test_gpu.py``.
"""

from __future__ import annotations

import collections
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from ngexp.data.bundle import epoch_batches
from ngexp.train.trainer import Trainer
from tests.helpers import REPO, build_trainer, compose

#: Tensor methods that copy a value to the host (a host/device synchronization on a GPU).
SYNCING_METHODS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__",
                   "__index__")
NGEXP = REPO / "ngexp"


def trainer_for(tmp_path: Path, *overrides: str) -> Trainer:
    """An trainer built from ``conf/train.yaml`` and ``overrides`` (no training run yet)."""
    cfg = compose(*overrides, f"output_root={tmp_path}")
    return build_trainer(cfg, {"model": "step_path"}, tmp_path / "run")


def training_batches(trainer: Trainer) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The batches of the trainer's own loop (device permutation, augmentation), endlessly."""
    while True:
        permutation = torch.randperm(len(trainer.data.train), device=trainer.run.device,
                                     generator=trainer.generator)
        yield from epoch_batches(trainer.data.train, trainer.run.settings.batch_size,
                                 permutation, 0, trainer.data.augment, trainer.generator)


class SyncCounter:
    """Counts, while :meth:`counting`, the calls of :data:`SYNCING_METHODS` and of
    ``torch.cuda.synchronize`` made by ngexp's own code, by ``file:function`` of the caller."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: collections.Counter[str] = collections.Counter()
        self._on = False
        for name in SYNCING_METHODS:
            monkeypatch.setattr(torch.Tensor, name, self._wrap(getattr(torch.Tensor, name)))
        monkeypatch.setattr(torch.cuda, "synchronize", self._wrap(torch.cuda.synchronize))

    def _wrap(self, method):  # noqa: ANN001, ANN202 - any callable
        def counted(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            if self._on:
                caller = sys._getframe(1)
                path = Path(caller.f_code.co_filename)
                if path.is_relative_to(NGEXP):
                    self.calls[f"{path.name}:{caller.f_code.co_name}"] += 1
            return method(*args, **kwargs)
        return counted

    @contextmanager
    def counting(self) -> Iterator[collections.Counter[str]]:
        """Count the calls inside the block; yields this block's counts."""
        self.calls.clear()
        self._on = True
        try:
            yield self.calls
        finally:
            self._on = False
