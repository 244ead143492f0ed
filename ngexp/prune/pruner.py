"""The pruning callback: when to prune, what to remove, and keeping it removed.

At each pruning event (see :mod:`ngexp.prune.schedules`) the pruner goes from the current
sparsity to the event's target in ``steps`` locality steps; each step scores the remaining
units of the masked network (:mod:`ngexp.prune.criteria`, in eval mode, on the first
``num_examples`` training examples) and removes the lowest-scored ones
(:mod:`ngexp.prune.selection`). Then it resets the optimizer state and logs the test metrics
right after pruning (``prune/test_<metric>_after_prune``).

Between events, gradients are masked before the optimizer step (so before any
preconditioning) and weights are re-masked after it, so neither momentum, weight decay nor a
preconditioner that mixes coordinates (K-FAC) can revive a pruned weight. The masks are part of
the callback's ``state_dict`` and so of every checkpoint.

Data-parallel, every rank runs the pruner: each scores on its share of the scoring batches
(round-robin) and the criteria sum their statistics over the ranks
(:mod:`ngexp.prune.criteria`), so the masks agree on every rank and equal one process's for
every criterion but the Monte-Carlo Fisher ones (``kfac``/``ekfac`` with ``fisher_type=mc``):
there each rank draws its targets from its own generator, seeded from the shared one (which all
ranks must keep advancing alike).

Sparsities are fractions of the units in scope: the weights of the prunable Linear/Conv2d
layers (:func:`ngexp.prune.masks.prunable_layers`), or with ``structure="filter"`` their output
channels (Conv2d filters, Linear neurons, with their biases).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ngexp.callbacks import Callback, Trainer
from ngexp.curvature.choices import KRONECKER_FISHER_TYPES
from ngexp.distributed import comm
from ngexp.distributed.world import current
from ngexp.errors import UserError
from ngexp.options import (
    check,
    check_choices,
    check_integer,
    check_nonnegative,
    check_range,
    choice_field,
    schema,
)
from ngexp.prune.criteria import CRITERIA, needs_data, saliencies
from ngexp.prune.masks import Masks, prunable_layers, unwrap
from ngexp.prune.report import output_positions, sparsity_report
from ngexp.prune.schedules import locality_ladder, pruning_events
from ngexp.prune.selection import layerwise_counts, select_global, select_layerwise, target_count


@schema("prune", "pruner")
@dataclass
class PruneConfig:
    """Settings of :class:`Pruner`; ``conf/prune/*.yaml`` are presets of this schema.

    What: ``criterion``, ``structure`` (unstructured | filter), ``scope`` (global |
    layerwise), ``keep_first_dense``/``keep_last_dense``/``exclude`` (layer-name patterns).
    How: ``target_sparsity``, ``steps`` locality steps on a ``step_schedule`` (linear |
    exponential), ``locality_penalty`` (lambda), ``num_examples``/``batch_size`` for g and d,
    ``fisher_type`` of the kfac/ekfac curvature (empirical | mc).
    When: ``schedule`` = oneshot (uses ``finetune_epochs``), iterative (``rate_per_round``,
    ``round_epochs``, ``start_epoch``) or gradual (``initial_sparsity``, ``start_step``,
    ``end_step`` (default: where the last ``finetune_epochs`` start), ``frequency``).
    """

    _target_: str = "ngexp.prune.pruner.Pruner"
    criterion: str = choice_field("magnitude", CRITERIA.keys())  # plugins' too: a live view
    structure: str = choice_field("unstructured", ("unstructured", "filter"))
    scope: str = choice_field("global", ("global", "layerwise"))
    target_sparsity: float = 0.9
    steps: int = 1
    step_schedule: str = choice_field("linear", ("linear", "exponential"))
    locality_penalty: float = 0.0
    num_examples: int = 1000
    batch_size: int = 250
    fisher_type: str = choice_field(
        "mc", tuple(fisher_type.value for fisher_type in KRONECKER_FISHER_TYPES))
    schedule: str = choice_field("oneshot", ("oneshot", "iterative", "gradual"))
    finetune_epochs: int = 1
    rate_per_round: float = 0.2
    round_epochs: int = 1
    start_epoch: int = 0
    initial_sparsity: float = 0.0
    start_step: int = 0
    end_step: int | None = None
    frequency: int = 100
    keep_first_dense: bool = False
    keep_last_dense: bool = False
    exclude: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        check_choices(self, "prune")
        check_range("prune.target_sparsity", self.target_sparsity, 0, 1, closed="[)")
        check_integer("prune.steps", self.steps, 1)
        check_nonnegative("prune.locality_penalty", self.locality_penalty)
        check_integer("prune.num_examples", self.num_examples, 1)
        check_integer("prune.batch_size", self.batch_size, 1)
        check_integer("prune.finetune_epochs", self.finetune_epochs, 0)
        check_range("prune.rate_per_round", self.rate_per_round, 0, 1, closed="()")
        check_integer("prune.round_epochs", self.round_epochs, 1)
        check_integer("prune.start_epoch", self.start_epoch, 0)
        check_range("prune.initial_sparsity", self.initial_sparsity, 0, self.target_sparsity)
        check_integer("prune.start_step", self.start_step, 0)
        check(self.end_step is None or self.end_step > self.start_step, "prune.end_step",
              self.end_step, f"null or an integer > prune.start_step={self.start_step}")
        check_integer("prune.frequency", self.frequency, 1)


class Pruner(Callback):
    """Trainer callback pruning ``trainer.model`` as configured by :class:`PruneConfig`."""

    name = "pruner"

    def __init__(self, **settings: Any) -> None:
        self.settings = PruneConfig(**settings)
        self.masks: Masks | None = None
        self.events: dict[int, float] = {}
        self.positions: dict[str, int] = {}
        self._saved_masks: dict[str, torch.Tensor] = {}

    # ------------------------------------------------------------------ trainer hooks
    def on_train_start(self, trainer: Trainer) -> None:
        self._bind(trainer)

    def on_step_start(self, trainer: Trainer) -> None:
        self._bind(trainer)
        target = self.events.get(trainer.step)
        if target is not None:
            self.prune(trainer, target)

    def before_optimizer_step(self, trainer: Trainer) -> None:
        self._bind(trainer).mask_gradients()

    def after_optimizer_step(self, trainer: Trainer) -> None:
        self._bind(trainer).mask_weights()

    def on_epoch_end(self, trainer: Trainer) -> None:
        """Events scheduled at the very end (``finetune_epochs=0``) happen before the final
        evaluation and checkpoint."""
        self._bind(trainer)
        late = [t for step, t in self.events.items() if step >= trainer.total_steps]
        if late and trainer.step >= trainer.total_steps:
            self.prune(trainer, max(late))

    def metrics(self, trainer: Trainer) -> dict[str, float]:
        masks = self._bind(trainer)
        return sparsity_report(unwrap(trainer.model), masks, self.positions)

    def state_dict(self) -> dict[str, Any]:
        return {"masks": self.masks.state_dict() if self.masks is not None else self._saved_masks}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._saved_masks = state.get("masks", {})
        if self.masks is not None:
            self.masks.load_state_dict(self._saved_masks)

    # ------------------------------------------------------------------ pruning
    def _bind(self, trainer: Trainer) -> Masks:
        """Find the layers, restore saved masks and plan the events (once, at first use: a
        resumed run does not call ``on_train_start``)."""
        if self.masks is not None:
            return self.masks
        s = self.settings
        model = unwrap(trainer.model)
        layers = prunable_layers(model, s.keep_first_dense, s.keep_last_dense, s.exclude)
        if not layers:
            raise UserError("prune: the model has no Linear/Conv2d layer left to prune "
                            "(check prune.keep_first_dense, keep_last_dense and exclude)")
        masks = Masks(layers, s.structure)
        masks.load_state_dict(self._saved_masks)
        self.events = pruning_events(
            s.schedule, target=s.target_sparsity, steps_per_epoch=trainer.steps_per_epoch,
            total_steps=trainer.total_steps, finetune_epochs=s.finetune_epochs,
            rate_per_round=s.rate_per_round, round_epochs=s.round_epochs,
            start_epoch=s.start_epoch, initial_sparsity=s.initial_sparsity,
            start_step=s.start_step, end_step=s.end_step, frequency=s.frequency)
        last = max(self.events)
        if last > trainer.total_steps:
            raise UserError(f"prune.schedule={s.schedule}: the last pruning event is at step "
                            f"{last} but training has {trainer.total_steps} steps; train longer "
                            f"or prune faster (prune.rate_per_round, round_epochs, end_step)")
        self.positions = output_positions(model, trainer.data.train.inputs[:1])
        # e.g. the natural gradient solves on the unpruned weights
        trainer.optimizer.restrict_to(dict(zip(masks.params, masks.tensors, strict=True)))
        self.masks = masks
        return masks

    def sparsity(self) -> float:
        """Pruned fraction of the units in scope."""
        assert self.masks is not None
        alive = [self.masks.alive(name) for name in self.masks.layers]
        return 1 - sum(int(a.sum()) for a in alive) / sum(a.numel() for a in alive)

    def prune(self, trainer: Trainer, target: float) -> None:
        """One pruning event: reach ``target`` sparsity in locality steps, reset the optimizer
        state and log the test metrics of the pruned network."""
        masks = self._bind(trainer)
        s = self.settings
        names = list(masks.layers)
        sizes = [masks.num_units(name) for name in names]
        current = self.sparsity()
        if target_count(target, sum(sizes)) <= round(current * sum(sizes)):
            return
        model = unwrap(trainer.model)
        was_training = model.training
        model.eval()
        try:
            for step_target in locality_ladder(current, target, s.steps, s.step_schedule):
                self._prune_step(trainer, step_target, names, sizes)
        finally:
            model.train(was_training)
        trainer.optimizer.reset_state()
        after = {f"prune/test_{key}_after_prune": value
                 for key, value in trainer.evaluate("test").items()}
        after["prune/sparsity"] = self.sparsity()
        trainer.log(after)
        trainer.console.print(
            f"pruned to sparsity {after['prune/sparsity']:.4f} at step {trainer.step} "
            f"({s.criterion}, {s.steps} step(s)): "
            + ", ".join(f"{k.split('/')[-1]}={v:.4g}" for k, v in after.items()
                        if k != "prune/sparsity"))

    def _prune_step(self, trainer: Trainer, sparsity: float, names: list[str],
                    sizes: list[int]) -> None:
        """Score the units of the masked network and prune to ``sparsity``."""
        masks = self.masks
        assert masks is not None
        s = self.settings
        batches = (list(trainer.train_batches(s.num_examples, s.batch_size))
                   if needs_data(s.criterion) else [])
        world, generator, reduce = current(), trainer.generator, None
        if world.distributed and needs_data(s.criterion):
            batches, reduce = batches[world.rank::world.size], comm.all_reduce_sum
            if s.fisher_type == "mc" and getattr(CRITERIA[s.criterion], "curvature", None) \
                    in ("kfac", "ekfac"):
                seed = torch.randint(2**62, (), device=generator.device, generator=generator)
                generator = torch.Generator(generator.device).manual_seed(int(seed) + world.rank)
        scores = saliencies(s.criterion, unwrap(trainer.model), trainer.task, batches,
                            masks.layers, {n: masks.num_units(n) for n in names},
                            penalty=s.locality_penalty, fisher_type=s.fisher_type,
                            generator=generator, reduce=reduce)
        alive = [masks.alive(name) for name in names]
        ordered = [scores[name] for name in names]
        if s.scope == "global":
            keep = select_global(ordered, alive, target_count(sparsity, sum(sizes)))
        else:
            pruned = [int(size - a.sum()) for size, a in zip(sizes, alive, strict=True)]
            keep = select_layerwise(ordered, alive, layerwise_counts(sparsity, sizes, pruned))
        for name, k in zip(names, keep, strict=True):
            masks.set_alive(name, k)
        masks.mask_weights()
