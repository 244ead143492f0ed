"""K-FAC: Kronecker-factored approximate curvature (Martens & Grosse 2015; Grosse & Martens 2016).

Each covered layer's gradient ``M = [dW | db]`` is preconditioned with the damped Kronecker
factors ``A`` and ``G`` (refreshed every ``inv_update_freq`` steps), per ``damping_mode``:

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

Statistics, damping schedules: :mod:`ngexp.optim.kronecker`; KL clipping and the optimizer:
:mod:`ngexp.optim.preconditioner`.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor, nn

from ngexp.curvature.capture import TRAINING, LayerIO
from ngexp.curvature.linalg import damped_inverses
from ngexp.optim.kronecker import (
    KroneckerPreconditioner,
    LayerGradient,
    eigenbasis_precondition,
    kronecker_eigenvalues,
    matmul,
)
from ngexp.optim.training import base_optimizer
from ngexp.options import checked, configurable


def pi_ratio(a: Tensor, g: Tensor) -> Tensor:
    """``sqrt((tr(A) / dim A) / (tr(G) / dim G))`` per group of stacked factors ``(groups, d, d)``
    (Martens & Grosse 2015, Sec. 6.3), with both mean traces floored at float32 ``tiny``."""
    tiny = torch.finfo(torch.float32).tiny
    mean_a = a.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(tiny)
    mean_g = g.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(tiny)
    return (mean_a / mean_g).sqrt()


@configurable("optimizer", "kfac", extends=base_optimizer, defaults={"lr": 0.03, "momentum": 0.9})
@checked()
class KFAC(KroneckerPreconditioner):
    """K-FAC preconditioner: ``KFAC(model, damping=..., ...)``, then any ``torch.optim``
    optimizer steps the preconditioned gradients (:mod:`ngexp.optim.preconditioner`).
    Options: ``damping_mode`` and ``pi_correction`` (module docstring) and those of
    :class:`~ngexp.optim.kronecker.KroneckerPreconditioner` and
    :class:`~ngexp.optim.preconditioner.Preconditioner`."""

    def __init__(self, model: nn.Module, *,
                 damping_mode: Literal["factored", "eigen"] = "factored",
                 pi_correction: bool = True, **options: Any) -> None:
        self.damping_mode, self.pi_correction = damping_mode, pi_correction
        super().__init__(model, **options)
        #: Whether a layer's factored preconditioning pays off at the batch last seen (saved in
        #: the state dict: it decides whether the next steps capture, see ``_arm``).
        self._cheaper: dict[str, bool] = {}
        #: Fixed random probes ``(d_in, 2)`` per layer for the factored path's check.
        self._probes: dict[str, Tensor] = {}

    @property
    def _captures_every_step(self) -> bool:
        return (self.damping_mode == "factored" and self._damping.device.type == "cpu"
                and any(self._cheaper.values()))

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "cheaper": dict(self._cheaper)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # before the base arms the capture for the next step: recomputed instead (first seen at
        # the next statistics step), the steps up to it would take the direct path and round
        # differently from the uninterrupted run
        self._cheaper = dict(state.get("cheaper", {}))
        super().load_state_dict(state)

    def _refreshed(self, state: dict[str, Tensor]) -> bool:
        return ("A_inv" if self.damping_mode == "factored" else "U_A") in state

    def _term_keys(self) -> tuple[str, ...]:
        if self.damping_mode == "factored":
            return ("pi", "A_inv", "G_inv")
        return ("lambda_A", "U_A", "lambda_G", "U_G")

    def _refresh(self, layers: list[LayerIO]) -> None:
        """Factored: recompute pi (a non-finite pi, from a bad factor, keeps the previous value,
        or 1) and the damped inverses. Eigen: new eigenbases."""
        if self.damping_mode == "eigen":
            self._refresh_eigenbases(layers)
            return
        for layer in layers:
            state = self.state[layer.name]
            old = state.get("pi", state["A"].new_ones(layer.groups))
            if self.pi_correction:
                new = pi_ratio(state["A"], state["G"])
                state["pi"] = torch.where(torch.isfinite(new), new, old)
            else:
                state["pi"] = old
        self._invert(layers)

    def _update_scaling(self, refreshed: bool) -> None:
        """Factored mode: a damping change between refreshes re-inverts the damped factors."""
        if self.damping_mode == "factored" and self._damping_changed and not refreshed:
            self._distribute([layer for layer in self.layers if layer.name in self._fresh],
                             self._invert)

    def _invert(self, layers: list[LayerIO]) -> None:
        root = self._damping.sqrt()
        factors, dampings, previous, names = [], [], [], []
        for layer in layers:
            state = self.state[layer.name]
            pi = state["pi"][:, None]
            for which, damping in (("A", root * pi), ("G", root / pi)):
                factors.append(state[which])
                dampings.append(damping)
                previous.append(state.get(f"{which}_inv"))
                names.append(f"{layer.name}.{which}")
        if not factors:
            return
        inverses, kept = damped_inverses(factors, dampings, previous, names)
        self._kept += kept
        for index, layer in enumerate(layers):
            state = self.state[layer.name]
            state["A_inv"], state["G_inv"] = inverses[2 * index], inverses[2 * index + 1]

    def _precondition(self, layer: LayerIO, state: dict[str, Tensor],
                      grad: LayerGradient) -> Tensor:
        if self.damping_mode == "eigen":
            denominator = kronecker_eigenvalues(state) + self._damping
            return eigenbasis_precondition(grad, state["U_A"], state["U_G"], denominator)
        factored = self._factored_direction(layer, state, grad)
        if factored is not None:
            return factored
        return matmul(state["G_inv"], grad.times(state["A_inv"]))

    def _factored_direction(self, layer: LayerIO, state: dict[str, Tensor],
                            grad: LayerGradient) -> Tensor | None:
        """``(D G_d^-1)^T ([X | 1] A_d^-1)`` when it is cheaper and ``.grad`` is ``D^T [X |
        1]`` (module docstring), else ``None``."""
        if (self._damping.device.type != "cpu" or not isinstance(layer.module, nn.Linear)
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
        a_inv, g_inv = state["A_inv"][0], state["G_inv"][0]
        right = inputs @ a_inv[:fan_in]
        if layer.has_bias:
            right = right + a_inv[fan_in]
        return ((output_grads @ g_inv).T @ right)[None]

    def _curvature_quadratic(self, state: dict[str, Tensor], delta: Tensor) -> Tensor:
        """``vec(D)^T (G (x) A) vec(D) = <D, G D A>``."""
        return (state["G"] @ delta @ state["A"] * delta).sum()
