"""K-FAC: Kronecker-factored approximate curvature (Martens & Grosse 2015; Grosse & Martens 2016).

Each covered layer's gradient ``M = [dW | db]`` is preconditioned with the damped Kronecker
factors ``A`` and ``G`` (refreshed every ``inv_update_freq`` steps), per ``damping_mode``
(the terms: :mod:`ngexp.optim.kronecker_terms`):

- ``factored`` (Sec. 6.3, factored Tikhonov damping): ``V = (G + d_G I)^-1 M (A + d_A I)^-1``
  with ``d_A = pi sqrt(damping)``, ``d_G = sqrt(damping) / pi`` and the pi correction ``pi =
  sqrt((tr(A) / dim A) / (tr(G) / dim G))`` (``pi = 1`` with ``pi_correction=false``). The
  damped inverses come from Cholesky factorizations (no eigendecomposition), recomputed at
  each refresh and whenever the damping changes; a step costs two matrix products per layer.
  On the CPU, a Linear layer whose batch has fewer rows than pays off is preconditioned in
  factored form: the gradient of one training pass is ``M = D^T [X | 1]`` (output gradients
  ``D (B, d_out)``, inputs ``X (B, d_in - 1)``), so ``V = (D G_d^-1)^T ([X | 1] A_d^-1)`` costs
  ``B (d_out^2 + d_in^2 + d_out d_in)`` instead of ``d_out d_in (d_out + d_in)`` (3x less for
  the MLP's 512 x 785 layer at batch 128). It is used only when ``.grad`` is verifiably that
  product (two random probes agree to 1e-4 relative): masked, clipped or otherwise changed
  gradients take the direct path.
- ``eigen`` (damping in the Kronecker eigenbasis): ``V = U_G ((U_G^T M U_A) / (lambda_G
  lambda_A^T + damping)) U_A^T`` from ``A = U_A diag(lambda_A) U_A^T``, ``G = U_G diag(lambda_G)
  U_G^T``, i.e. ``(G (x) A + damping I)^-1`` exactly.

Statistics, damping schedules: :mod:`ngexp.optim.kronecker_preconditioner`; KL clipping and the
optimizer: :mod:`ngexp.optim.preconditioner`.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from ngexp.curvature.capture import TRAINING, LayerIO
from ngexp.optim.kronecker_preconditioner import KroneckerPreconditioner
from ngexp.optim.kronecker_terms import DampedInverses, KroneckerEigenbasis, LayerGradient
from ngexp.optim.training import base_optimizer
from ngexp.options import checked, configurable


@configurable("optimizer", "kfac", extends=base_optimizer, defaults={"lr": 0.03, "momentum": 0.9})
@checked()
class KFAC(KroneckerPreconditioner):
    """K-FAC preconditioner: ``KFAC(model, damping=..., ...)``, then any ``torch.optim``
    optimizer steps the preconditioned gradients (:mod:`ngexp.optim.preconditioner`).
    Options: ``damping_mode`` and ``pi_correction`` (module docstring) and those of
    :class:`~ngexp.optim.kronecker_preconditioner.KroneckerPreconditioner` and
    :class:`~ngexp.optim.preconditioner.Preconditioner`."""

    #: The terms of ``damping_mode="factored"``: a subclass with its own damping rule names its
    #: :class:`~ngexp.optim.kronecker_terms.DampedInverses` here.
    factored_terms: ClassVar[type[DampedInverses]] = DampedInverses

    def __init__(self, model: nn.Module, *,
                 damping_mode: Literal["factored", "eigen"] = "factored",
                 pi_correction: bool = True, **options: Any) -> None:
        self.damping_mode, self.pi_correction = damping_mode, pi_correction
        self.terms = (self.factored_terms(pi_correction) if damping_mode == "factored"
                      else KroneckerEigenbasis())
        super().__init__(model, **options)
        #: Whether a layer's factored preconditioning pays off at the batch last seen (saved in
        #: the state dict: it decides whether the next steps capture, see ``_arm``).
        self._cheaper: dict[str, bool] = {}
        #: Fixed random probes ``(d_in, 2)`` per layer for the factored path's check.
        self._probes: dict[str, Tensor] = {}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "cheaper": dict(self._cheaper)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # before the base arms the capture for the next step: recomputed instead (first seen at
        # the next statistics step), the steps up to it would take the direct path and round
        # differently from the uninterrupted run
        self._cheaper = dict(state.get("cheaper", {}))
        super().load_state_dict(state)

    def _arm(self, step: int) -> None:
        """The factored products on the CPU need the layer inputs and output gradients on
        every step, not only for statistics."""
        super()._arm(step)
        if (not self.capture.active and self.damping_mode == "factored"
                and self._damping.value.device.type == "cpu" and any(self._cheaper.values())):
            self.capture.active = True

    def _update_scaling(self, refreshed: bool) -> None:
        """Factored mode: a damping change between refreshes re-inverts the damped factors."""
        if (isinstance(self.terms, DampedInverses) and self._damping.changed
                and not refreshed):
            fresh = [layer for layer in self.layers if layer.name in self._fresh]
            self._kept += self._kaisa.refresh(fresh, self.terms.invert, self.state,
                                              self.terms.fields, self._damping.value)

    def _direction(self, layer: LayerIO, grad: LayerGradient) -> Tensor:
        if self.damping_mode == "factored":
            factored = self._factored_direction(layer, grad)
            if factored is not None:
                return factored
        return super()._direction(layer, grad)

    def _factored_direction(self, layer: LayerIO, grad: LayerGradient) -> Tensor | None:
        """``(D G_d^-1)^T ([X | 1] A_d^-1)`` when it is cheaper and ``.grad`` is ``D^T [X |
        1]`` (module docstring), else ``None``."""
        if (self._damping.value.device.type != "cpu" or not isinstance(layer.module, nn.Linear)
                or len(self.capture.forwards) != 1
                or len(layer.inputs) != 1 or layer.inputs[0].dim() != 2
                or self._kaisa.distributed):
            return None
        rows, out, size = layer.inputs[0].shape[0], layer.out_dim, layer.in_dim
        cheaper = rows * (out * out + size * size + out * size) < 0.7 * out * size * (out + size)
        self._cheaper[layer.name] = cheaper
        passes = self.capture.passes(TRAINING)
        if not cheaper or len(passes) != 1 or 0 not in layer.grads[passes[0]]:
            return None
        inputs, output_grads = layer.inputs[0].float(), layer.grads[passes[0]][0].float()
        probes = self._probes.get(layer.name)
        if probes is None:  # seeded by the layer's place: the same whenever first needed
            generator = torch.Generator().manual_seed(self.layers.index(layer))
            probes = self._probes[layer.name] = torch.randn(size, 2, generator=generator)
        fan_in = layer.fan_in
        expected = grad.weight[0] @ probes[:fan_in]
        projected = inputs @ probes[:fan_in]
        if grad.bias is not None:
            expected = expected + grad.bias[0][:, None] * probes[fan_in]
            projected = projected + probes[fan_in]
        error = (expected - output_grads.T @ projected).norm()
        if not bool(error <= 1e-4 * expected.norm()):  # the CPU: no device to wait for
            return None
        state = self.state[layer.name]
        assert state.a_inv is not None and state.g_inv is not None
        a_inv, g_inv = state.a_inv[0], state.g_inv[0]
        right = inputs @ a_inv[:fan_in]
        if layer.has_bias:
            right = right + a_inv[fan_in]
        return ((output_grads @ g_inv).T @ right)[None]
