"""EKFAC: eigenvalue-corrected Kronecker factorization (George et al. 2018).

K-FAC's eigenbasis ``U_G (x) U_A`` with the diagonal in that basis re-estimated from per-example
gradients instead of taken as the product of factor eigenvalues:

    s = E_n[(U_G^T dW_n U_A)^2]          (George et al. 2018, Eq. 10, per group)
    V = U_G ((U_G^T M U_A) / (s + damping)) U_A^T,

``M = [dW | db]`` the layer gradient, ``dW_n`` the per-example gradients of the Fisher type (see
:mod:`ngexp.optim.curvature`). The same orientation is used everywhere: ``X -> U_G^T X U_A`` into
the basis and ``Y -> U_G Y U_A^T`` back, so with ``s + damping = 1`` the round trip returns ``M``.

``s`` is re-estimated every ``scale_update_freq`` steps (default: every step) from the current
batch, cheaply compared with the eigendecompositions (every ``inv_update_freq`` steps), optionally
as a running average ``s <- e s + (1 - e) s_batch`` (``e = min(scale_decay, 1 - 1/k)`` for the
``k``-th estimate since the basis changed); a new basis restarts it from the batch, or from
``lambda_G lambda_A^T`` when the step captured no batch. Everything else (statistics, KL clipping,
momentum, weight decay, damping schedules): :mod:`ngexp.optim.kronecker`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from ngexp.config import check, schema
from ngexp.optim.kronecker import KroneckerConfig, KroneckerOptimizer, kronecker_eigenvalues


@schema("optimizer", "ekfac")
@dataclass
class EKFACConfig(KroneckerConfig):
    """EKFAC options: the shared ones plus the refresh and averaging of the scaling ``s``."""

    _target_: str = "ngexp.optim.ekfac.EKFAC"
    scale_update_freq: int = 1
    scale_decay: float = 0.0  # running average of s between basis refreshes; 0 = latest batch

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.scale_update_freq >= 1, "optimizer.scale_update_freq", self.scale_update_freq,
              "an integer >= 1")
        check(0 <= self.scale_decay < 1, "optimizer.scale_decay", self.scale_decay,
              "a number in [0, 1)")


class EKFAC(KroneckerOptimizer):
    """EKFAC as a ``torch.optim`` optimizer built from the model: ``EKFAC(model, lr=..., ...)``
    with the options of :class:`EKFACConfig`."""

    config_class = EKFACConfig
    options: EKFACConfig

    def __init__(self, model: nn.Module, **options: Any) -> None:
        super().__init__(model, **options)
        self.counters["scale_updates"] = 0  # estimates of s since the basis last changed

    def _captures(self, step: int) -> bool:
        """Statistics steps, scaling steps and basis refreshes (whose ``s`` is measured anew)."""
        opts = self.options
        return (super()._captures(step) or step % opts.scale_update_freq == 0
                or step % opts.inv_update_freq == 0)

    def _eigenvalues(self, state: dict[str, Tensor]) -> Tensor:
        return state["s"]

    def _update_scaling(self, refreshed: bool, captured: bool) -> None:
        opts = self.options
        if refreshed:
            self.counters["scale_updates"] = 0
        elif not (captured and self.counters["step"] % opts.scale_update_freq == 0):
            return
        self.counters["scale_updates"] += int(captured)
        decay = min(opts.scale_decay, 1 - 1 / max(self.counters["scale_updates"], 1))
        for layer, state in self._layers_with("U_A"):
            if refreshed:
                state["s"] = kronecker_eigenvalues(state)
            if captured and layer.inputs:
                moments = layer.eigenbasis_moments(state["U_A"], state["U_G"], self._num_terms)
                self._average(state, "s", moments, decay)
