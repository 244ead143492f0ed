"""Extension points of the training loop, and what a callback may use of the trainer.

A :class:`Callback` sees the trainer at fixed points of every step. The order within one
training step is::

    on_step_start        (e.g. a gradual pruning schedule prunes here)
    forward, loss (+ every callback's loss_term), backward (preconditioners capture
                          curvature during this)
    before_optimizer_step (e.g. mask gradients, before any preconditioning)
    gradient clipping, preconditioner and optimizer step, lr schedule step
    after_optimizer_step  (e.g. re-apply masks to the weights)

``on_model_built`` runs once, when the model is built and before the optimizer is: a callback
may add modules with parameters to the model there (variational pruning's gates), which the
optimizer then trains and checkpoints hold. It gets the run being built
(:class:`ngexp.train.build.Run`: ``model``, ``data``, ``task``, ``console``, ``generator``);
its ``optimizer`` does not exist yet and is set on the same object once built.
``loss_term`` returns a differentiable scalar added to the step's loss before the backward (a
KL term) or ``None``; it must not synchronize with the host. ``on_evaluation`` sees the
metrics of every evaluation (e.g. early stopping). ``on_train_start`` runs at the start of
every training session, after a resumed run's state (including the callback's own
``load_state_dict``) is restored. Callbacks with state implement
``state_dict``/``load_state_dict``; the trainer saves it in every checkpoint under the
callback's ``name`` and, resuming, loads it before the model's state (a callback that changed
the model's structure, e.g. removed pruned units, restores that structure there).
``metrics`` returns scalars (keys with a TensorBoard prefix such as ``prune/``) that the
trainer logs at each evaluation and puts in ``summary.json``.

Callbacks are written against :class:`Trainer`, the part of the trainer
(:class:`ngexp.train.trainer.Trainer`, configured by ``trainer.*``) they may use, so they
depend on nothing in :mod:`ngexp.train`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, Protocol

import torch
from rich.console import Console
from torch import Tensor, nn

from ngexp.curvature.tasks import Task
from ngexp.data.bundle import DataBundle
from ngexp.optim.training import TrainingOptimizer


class Trainer(Protocol):
    """What a callback may read and call on the trainer."""

    model: nn.Module
    optimizer: TrainingOptimizer
    task: Task
    data: DataBundle
    console: Console
    generator: torch.Generator
    step: int
    total_steps: int
    steps_per_epoch: int

    def selection_key(self) -> str:
        """The metric ``best.pt`` follows (``val/acc``, ``test/acc`` or a loss)."""
        ...

    def request_stop(self, reason: str) -> None:
        """End training after the current step, as completed with ``reason``."""
        ...

    def evaluate(self, split: str = "test") -> dict[str, float]:
        """Loss and metrics over a whole split (``test``, ``val`` or ``train``)."""
        ...

    def log(self, metrics: Mapping[str, float]) -> None:
        """Record ``metrics`` at the current step."""
        ...

    def train_batches(self, num_examples: int, batch_size: int) -> Iterator[tuple[Tensor,
                                                                             Tensor]]:
        """The first ``num_examples`` training examples in order, unaugmented."""
        ...


class Callback:
    """Base class: every hook does nothing."""

    name: str = "callback"

    def on_model_built(self, trainer: Trainer) -> None: ...

    def on_train_start(self, trainer: Trainer) -> None: ...

    def loss_term(self, trainer: Trainer) -> Tensor | None:
        return None

    def on_step_start(self, trainer: Trainer) -> None: ...

    def before_optimizer_step(self, trainer: Trainer) -> None: ...

    def after_optimizer_step(self, trainer: Trainer) -> None: ...

    def on_epoch_end(self, trainer: Trainer) -> None: ...

    def on_evaluation(self, trainer: Trainer, metrics: dict[str, float]) -> None: ...

    def on_train_end(self, trainer: Trainer) -> None: ...

    def metrics(self, trainer: Trainer) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None: ...
