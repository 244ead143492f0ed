"""EKFAC: eigenvalue-corrected Kronecker factorization (George et al. 2018).

K-FAC's eigenbasis ``U_G (x) U_A`` with the diagonal in that basis re-estimated from per-example
gradients instead of taken as the product of factor eigenvalues:

    s = E_n[(U_G^T dW_n U_A)^2]          (George et al. 2018, Eq. 10, per group)
    V = U_G ((U_G^T M U_A) / (s + damping)) U_A^T,

``M = [dW | db]`` the layer gradient, ``dW_n`` the per-example gradients of the Fisher type
(:mod:`ngexp.curvature.kronecker`). The same orientation is used everywhere: ``X -> U_G^T X
U_A`` into the basis and ``Y -> U_G Y U_A^T`` back, so with ``s + damping = 1`` the round trip
returns ``M``.

``s`` is re-estimated every ``scale_update_freq`` steps (default: every step) from the current
batch, cheaply compared with the eigendecompositions (every ``inv_update_freq`` steps),
optionally as a running average ``s <- e s + (1 - e) s_batch`` (``e = min(scale_decay, 1 -
1/k)`` for the ``k``-th estimate that entered since the basis changed: a step the grad scaler
skips leaves ``s`` as it was and does not count); a new basis restarts it from the batch, or
from ``lambda_G lambda_A^T`` when the step captured no batch. The terms (bases and
``s``): :class:`~ngexp.optim.kronecker_terms.CorrectedEigenbasis`; everything else:
:mod:`ngexp.optim.kronecker_preconditioner` and :mod:`ngexp.optim.preconditioner`.

Data-parallel (:mod:`ngexp.optim.kaisa`): the eigendecompositions are spread over the ranks
and their bases broadcast to every rank, since each rank rotates its own per-example gradients
into them; the batch estimates of ``s`` are all-reduced like the factors. So
``grad_worker_fraction`` chooses only which ranks compute each layer's direction (and
broadcast it), not where the bases are kept.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import Tensor, nn

from ngexp.curvature.kronecker import eigenbasis_moments
from ngexp.optim.kronecker_preconditioner import KroneckerPreconditioner
from ngexp.optim.kronecker_terms import CorrectedEigenbasis
from ngexp.optim.layer_curvature import EstimateCount
from ngexp.optim.training import base_optimizer
from ngexp.options import check_integer, check_range, checked, configurable


def check_ekfac(scale_update_freq: int, scale_decay: float, **_: Any) -> None:
    check_integer("scale_update_freq", scale_update_freq, 1)
    check_range("scale_decay", scale_decay, 0, 1, closed="[)")


@configurable("optimizer", "ekfac", extends=base_optimizer,
              defaults={"lr": 0.03, "momentum": 0.9})
@checked(check_ekfac)
class EKFAC(KroneckerPreconditioner):
    """EKFAC preconditioner: ``EKFAC(model, damping=..., ...)``; options ``scale_update_freq``,
    ``scale_decay`` (module docstring) and those of
    :class:`~ngexp.optim.kronecker_preconditioner.KroneckerPreconditioner`."""

    _terms_everywhere = True

    def __init__(self, model: nn.Module, *, scale_update_freq: int = 1, scale_decay: float = 0.0,
                 **options: Any) -> None:
        self.scale_update_freq, self.scale_decay = scale_update_freq, scale_decay
        self.terms = CorrectedEigenbasis()
        super().__init__(model, **options)
        #: Estimates of s that entered since the basis last changed.
        self._scale_estimates = EstimateCount(self._kept.device)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "scale_estimates": self._scale_estimates.value.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        # checkpoints from before the device count kept it in counters
        legacy = self.counters.pop("scale_updates", 0)
        self._scale_estimates.load(state.get("scale_estimates", legacy))

    def _captures(self, step: int) -> bool:
        """Statistics steps, scaling steps and basis refreshes (whose ``s`` is measured anew)."""
        return (super()._captures(step) or step % self.scale_update_freq == 0
                or self._schedule.refresh_due(step))

    def _update_scaling(self, refreshed: bool) -> None:
        statistics = self._statistics
        captured = statistics.captured(self.capture)
        if refreshed:
            self._scale_estimates.reset()
        elif not (captured and self.steps % self.scale_update_freq == 0):
            return
        decay = self._scale_estimates.advance(statistics.averages.ok & captured,
                                              self.scale_decay)
        groups, num_terms = statistics.groups(self.capture, self.task)
        layers = [layer for layer in self.layers
                  if layer.name in self.state and self.state[layer.name].basis_a is not None]
        if refreshed:
            for layer in layers:
                self.state[layer.name].scale = self.state[layer.name].kronecker_eigenvalues()
        measured = [layer for layer in layers if captured and
                    any(layer.records[group.record].inputs for group in groups)]
        moments: Iterable[Tensor] = (
            eigenbasis_moments(layer, groups, *self.state[layer.name].bases(), num_terms)
            for layer in measured)
        if self._kaisa.distributed:  # the ranks' mean: the global batch's estimate
            moments = self._kaisa.mean(list(moments))
        for layer, moment in zip(measured, moments, strict=True):
            state = self.state[layer.name]
            state.scale = statistics.averages.update(state.scale, moment, decay)
