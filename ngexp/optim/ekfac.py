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
1/k)`` for the ``k``-th estimate since the basis changed); a new basis restarts it from the
batch, or from ``lambda_G lambda_A^T`` when the step captured no batch. Everything else:
:mod:`ngexp.optim.kronecker` and :mod:`ngexp.optim.preconditioner`.

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

from ngexp.curvature.capture import LayerIO
from ngexp.curvature.kronecker import PASS_KIND, eigenbasis_moments, pass_groups
from ngexp.optim.kronecker import (
    KroneckerPreconditioner,
    LayerGradient,
    eigenbasis_precondition,
    kronecker_eigenvalues,
)
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
    :class:`~ngexp.optim.kronecker.KroneckerPreconditioner`."""

    _terms_everywhere = True

    def __init__(self, model: nn.Module, *, scale_update_freq: int = 1, scale_decay: float = 0.0,
                 **options: Any) -> None:
        self.scale_update_freq, self.scale_decay = scale_update_freq, scale_decay
        super().__init__(model, **options)
        self.counters["scale_updates"] = 0  # estimates of s since the basis last changed

    def _captures(self, step: int) -> bool:
        """Statistics steps, scaling steps and basis refreshes (whose ``s`` is measured anew)."""
        return (super()._captures(step) or step % self.scale_update_freq == 0
                or self._refresh_due(step))

    def _refreshed(self, state: dict[str, Tensor]) -> bool:
        return "U_A" in state

    def _term_keys(self) -> tuple[str, ...]:
        return ("lambda_A", "U_A", "lambda_G", "U_G")

    def _refresh(self, layers: list[LayerIO]) -> None:
        self._refresh_eigenbases(layers)

    def _update_scaling(self, refreshed: bool) -> None:
        captured = self.capture.captured(PASS_KIND[self.fisher_type])
        if refreshed:
            self.counters["scale_updates"] = 0
        elif not (captured and self.steps % self.scale_update_freq == 0):
            return
        self.counters["scale_updates"] += int(captured)
        decay = min(self.scale_decay, 1 - 1 / max(self.counters["scale_updates"], 1))
        groups, num_terms = pass_groups(self.capture, self.fisher_type, self.task)
        layers = [layer for layer in self.layers
                  if layer.name in self.state and "U_A" in self.state[layer.name]]
        if refreshed:
            for layer in layers:
                self.state[layer.name]["s"] = kronecker_eigenvalues(self.state[layer.name])
        measured = [layer for layer in layers if captured and
                    any(layer.records[group.record].inputs for group in groups)]
        moments: Iterable[Tensor] = (
            eigenbasis_moments(layer, groups, self.state[layer.name]["U_A"],
                               self.state[layer.name]["U_G"], num_terms)
            for layer in measured)
        if self._kaisa.distributed:  # the ranks' mean: the global batch's estimate
            moments = self._kaisa.mean(list(moments))
        for layer, moment in zip(measured, moments, strict=True):
            self._average(self.state[layer.name], "s", moment, decay)

    def _precondition(self, layer: LayerIO, state: dict[str, Tensor],
                      grad: LayerGradient) -> Tensor:
        return eigenbasis_precondition(grad, state["U_A"], state["U_G"],
                                       state["s"] + self._damping)

    def _curvature_quadratic(self, state: dict[str, Tensor], delta: Tensor) -> Tensor:
        """``vec(D)^T U diag(s) U^T vec(D) = <s, (U_G^T D U_A)^2>``."""
        return (state["s"] * (state["U_G"].mT @ delta @ state["U_A"]).square()).sum()
