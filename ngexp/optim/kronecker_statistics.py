"""K-FAC and EKFAC's statistics: when they are taken, and folding them into running averages.

On a statistics step (every ``cov_update_freq`` steps, :class:`FactorSchedule`) the capture
recorded the layer inputs and the output gradients of the Fisher type
(:mod:`ngexp.curvature.capture`); :meth:`FactorStatistics.update` folds the batch factors
(:func:`~ngexp.curvature.kronecker.kronecker_factors`) into running averages ``A <- e A + (1
- e) A_batch`` with ``e = min(stat_decay, 1 - 1/k)`` at the ``k``-th update that entered: the
first estimate replaces -- no identity initialization -- and early ones are averaged with
equal weights. Batch statistics that are not finite, and all of a step the grad scaler skips,
are left out, and a skipped step does not count in ``k`` (no host sync,
:class:`~ngexp.optim.layer_curvature.RunningAverages` and
:class:`~ngexp.optim.layer_curvature.EstimateCount`). Data-parallel, the batch factors are
the ranks' mean first: the global batch's factors.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

from ngexp.curvature.capture import SAMPLED, TRAINING, Capture, LayerIO
from ngexp.curvature.choices import FisherType
from ngexp.curvature.kronecker import (
    PASS_KIND,
    PassGroup,
    flat_pairs,
    kronecker_factors,
    paired,
    pass_groups,
)
from ngexp.curvature.tasks import Task
from ngexp.optim.hyperparams import Hyperparameter, value_at
from ngexp.optim.kaisa import Kaisa
from ngexp.optim.layer_curvature import EstimateCount, LayerCurvature, RunningAverages


@dataclass(frozen=True)
class FactorSchedule:
    """Statistics every ``cov_update_freq`` steps (and at the first step that has none),
    refreshes of the preconditioning terms every ``inv_update_freq`` steps; each a number or
    a schedule of the step."""

    cov_update_freq: Hyperparameter
    inv_update_freq: Hyperparameter

    def statistics_due(self, step: int, updates: int) -> bool:
        """Whether step ``step`` takes statistics, after ``updates`` factor updates so far."""
        return updates == 0 or step % value_at(self.cov_update_freq, step) == 0

    def refresh_due(self, step: int) -> bool:
        return step % value_at(self.inv_update_freq, step) == 0


class FactorStatistics:
    """The running factors of ``layers`` (module docstring) for ``fisher_type`` and
    ``kfac_approx``; :attr:`averages` keeps the skip flag and count, :attr:`estimates` the
    number of updates that entered."""

    def __init__(self, layers: list[LayerIO], kaisa: Kaisa, fisher_type: FisherType,
                 kfac_approx: str, stat_decay: float, device: torch.device) -> None:
        self.layers, self.kaisa = layers, kaisa
        self.fisher_type, self.kfac_approx, self.stat_decay = fisher_type, kfac_approx, stat_decay
        self.averages = RunningAverages(device)
        self.estimates = EstimateCount(device)

    def captured(self, capture: Capture) -> bool:
        """Whether the capture holds passes of the Fisher type."""
        return capture.captured(PASS_KIND[self.fisher_type])

    def groups(self, capture: Capture, task: Task) -> tuple[list[PassGroup], int]:
        """The kept forwards with passes of the Fisher type and their number of terms."""
        return pass_groups(capture, self.fisher_type, task)

    def check(self, owner: str, capture: Capture, due: bool, any_state: bool) -> None:
        """Raise when this step cannot precondition: no statistics ever, or a step that
        captures (``due``: statistics, EKFAC's scaling) whose Monte-Carlo passes are missing
        (``owner`` names the preconditioner)."""
        if (self.fisher_type == FisherType.MC and capture.captured_inputs and due
                and any(f.passes(TRAINING) and not f.passes(SAMPLED) for f in capture.forwards)):
            raise RuntimeError(f"{owner}(fisher_type='mc') needs "
                               f"pre.backward(loss) instead of loss.backward() on the steps it "
                               f"captures (it back-propagates sampled targets); or use "
                               f"fisher_type='empirical'")
        if not any_state and not self.captured(capture):
            raise RuntimeError(f"{owner}.step(): no curvature statistics were "
                               f"ever captured; run the hooked model forward in train mode "
                               f"with grad enabled, then loss.backward() (empirical Fisher) or "
                               f"pre.backward(loss) (MC Fisher), before step()")

    def update(self, capture: Capture, task: Task,
               states: dict[str, LayerCurvature]) -> list[LayerIO]:
        """Update the running factors in ``states`` (a new layer gets its state) unless the grad
        scaler skips this step; returns the layers that have a gradient but neither statistics
        nor a record in this step's forwards (called functionally, or hooks bypassed)."""
        decay = self.estimates.advance(self.averages.ok, self.stat_decay)
        groups, num_terms = self.groups(capture, task)
        layers = [layer for layer in self.layers
                  if any(layer.records[group.record].inputs for group in groups)]
        factors: Iterable[tuple[Tensor, Tensor]] = (
            kronecker_factors(layer, groups, num_terms, self.kfac_approx) for layer in layers)
        if self.kaisa.distributed:  # the ranks' mean: the global batch's factors
            factors = paired(self.kaisa.mean(flat_pairs(factors)))
        for layer, (a, g) in zip(layers, factors, strict=True):
            state = states.setdefault(layer.name, LayerCurvature())
            state.a = self.averages.update(state.a, a, decay)
            state.g = self.averages.update(state.g, g, decay)
        return [layer for layer in self.layers if layer not in layers
                and layer.weight.grad is not None and layer.name not in states]
