"""K-FAC: Kronecker-factored approximate curvature (Martens & Grosse 2015; Grosse & Martens 2016).

Each covered layer's gradient ``M = [dW | db]`` is preconditioned with the damped Kronecker
factors, ``V = (G + d_G I)^-1 M (A + d_A I)^-1``, computed from their eigendecompositions
``A = U_A diag(lambda_A) U_A^T``, ``G = U_G diag(lambda_G) U_G^T`` (refreshed every
``inv_update_freq`` steps) as ``U_G ((U_G^T M U_A) / D) U_A^T`` with, per ``damping_mode``:

- ``factored`` (Sec. 6.3, factored Tikhonov damping): ``D = (lambda_G + d_G)(lambda_A + d_A)^T``,
  ``d_A = pi sqrt(damping)``, ``d_G = sqrt(damping) / pi`` and the pi correction
  ``pi = sqrt((tr(A) / dim A) / (tr(G) / dim G))`` (``pi = 1`` with ``pi_correction=false``),
  computed with each new eigenbasis. The damped inverses ``U diag(1 / (lambda + d)) U^T`` are
  formed when the bases or the damping change, so a step costs two matrix products per layer;
- ``eigen`` (damping in the Kronecker eigenbasis): ``D = lambda_G lambda_A^T + damping``, i.e.
  ``(G (x) A + damping I)^-1`` exactly.

Statistics, KL clipping, momentum, weight decay and damping schedules: :mod:`ngexp.optim.kronecker`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ngexp.config import check_choice, schema
from ngexp.optim.curvature import KroneckerLayer
from ngexp.optim.kronecker import KroneckerConfig, KroneckerOptimizer, kronecker_eigenvalues

DAMPING_MODES = ("factored", "eigen")


@schema("optimizer", "kfac")
@dataclass
class KFACConfig(KroneckerConfig):
    """K-FAC options: the shared ones plus how damping enters (:mod:`ngexp.optim.kfac`)."""

    _target_: str = "ngexp.optim.kfac.KFAC"
    damping_mode: str = "factored"  # factored | eigen
    pi_correction: bool = True  # factored mode: split the damping by the pi ratio

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("optimizer.damping_mode", self.damping_mode, DAMPING_MODES)


class KFAC(KroneckerOptimizer):
    """K-FAC as a ``torch.optim`` optimizer built from the model: ``KFAC(model, lr=..., ...)``
    with the options of :class:`KFACConfig`."""

    config_class = KFACConfig
    options: KFACConfig

    def _eigenvalues(self, state: dict[str, Tensor]) -> Tensor:
        return kronecker_eigenvalues(state)

    def __init__(self, model: nn.Module, **options: Any) -> None:
        super().__init__(model, **options)
        #: Factored mode: damped inverses ``((A + d_A I)^-1, (G + d_G I)^-1)`` by layer name,
        #: rebuilt from the eigendecompositions when the bases or the damping change.
        self._inverses: dict[str, tuple[Tensor, Tensor]] = {}

    def _precondition(self, layer: KroneckerLayer, state: dict[str, Tensor],
                      grad: Tensor) -> Tensor:
        if self.options.damping_mode == "eigen":
            return super()._precondition(layer, state, grad)
        inverse_a, inverse_g = self._inverses[layer.name]
        return inverse_g @ grad @ inverse_a

    def _update_scaling(self, refreshed: bool, captured: bool) -> None:
        """With new eigenbases: recompute pi (a non-finite pi, from a bad factor, keeps the
        previous value, or 1). Factored mode: rebuild the damped inverses."""
        if refreshed:
            for layer, state in self._layers_with("U_A"):
                old = state.get("pi", state["A"].new_ones(layer.groups))
                if self.options.pi_correction:
                    new = pi_ratio(state["A"], state["G"])
                    state["pi"] = torch.where(torch.isfinite(new), new, old)
                else:
                    state["pi"] = old
        if self.options.damping_mode == "factored" and (refreshed or self._damping_changed):
            root = self._damping.sqrt()
            for layer, state in self._layers_with("U_A"):
                pi = state["pi"][:, None]
                self._inverses[layer.name] = (
                    damped_inverse(state["U_A"], state["lambda_A"], root * pi),
                    damped_inverse(state["U_G"], state["lambda_G"], root / pi),
                )

    def reset_state(self) -> None:
        super().reset_state()
        self._inverses.clear()


def damped_inverse(basis: Tensor, eigenvalues: Tensor, damping: Tensor) -> Tensor:
    """``(F + d I)^-1 = U diag(1 / (lambda + d)) U^T`` per group: ``basis (groups, n, n)``,
    ``eigenvalues (groups, n)``, ``damping (groups, 1)``."""
    return (basis / (eigenvalues + damping)[:, None, :]) @ basis.mT


def pi_ratio(a: Tensor, g: Tensor) -> Tensor:
    """``sqrt((tr(A) / dim A) / (tr(G) / dim G))`` per group of stacked factors ``(groups, d, d)``
    (Martens & Grosse 2015, Sec. 6.3), with both mean traces floored at float32 ``tiny``."""
    tiny = torch.finfo(torch.float32).tiny
    mean_a = a.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(tiny)
    mean_g = g.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(tiny)
    return (mean_a / mean_g).sqrt()
