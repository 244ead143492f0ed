"""What K-FAC and EKFAC precondition a layer with, refreshed for many layers at once.

Each kind of terms computes some fields of :class:`~ngexp.optim.layer_curvature.LayerCurvature`
from the running factors ``A`` and ``G`` (``refresh``, one batched decomposition over all the
layers it is given, :mod:`ngexp.curvature.linalg`), maps a layer's gradient ``M = [dW | db]``
``(groups, d_out, d_in)`` to its direction ``V`` (``direction``) and gives the quadratic form
``vec(D)^T C vec(D)`` of its undamped curvature ``C`` (``quadratic``, for adaptive damping):

- :class:`DampedInverses` (K-FAC, ``damping_mode=factored``): ``V = (G + d_G I)^-1 M (A + d_A
  I)^-1``, ``d_A = pi sqrt(damping)``, ``d_G = sqrt(damping) / pi``, with Cholesky inverses
  and the pi correction (:func:`pi_ratio`);
- :class:`KroneckerEigenbasis` (K-FAC, ``damping_mode=eigen``): ``V = U_G ((U_G^T M U_A) /
  (lambda_G lambda_A^T + damping)) U_A^T``, i.e. ``(G (x) A + damping I)^-1`` exactly;
- :class:`CorrectedEigenbasis` (EKFAC): the same bases with the re-estimated scaling ``s`` in
  place of ``lambda_G lambda_A^T`` (``C = U diag(s) U^T``).

A decomposition that fails keeps the previous result; ``refresh`` returns how many did (a
0-dim tensor, no host sync).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ngexp.curvature.capture import LayerIO
from ngexp.curvature.kronecker import flat_pairs, paired
from ngexp.curvature.linalg import damped_inverses, robust_eigh
from ngexp.optim.layer_curvature import LayerCurvature


def matmul(left: Tensor, right: Tensor) -> Tensor:
    """``left @ right`` for stacks ``(groups, n, k) @ (groups, k, m)``, as one 2-D product when
    there is a single group (faster than a batched product of one)."""
    if left.shape[0] == 1 and right.shape[0] == 1:
        return (left[0] @ right[0])[None]
    return left @ right


@dataclass(frozen=True)
class LayerGradient:
    """A layer's gradient ``[dW | db]`` kept in its two parts (no concatenated copy): ``weight
    (groups, d_out, fan_in)`` and ``bias (groups, d_out)`` or ``None``, float32."""

    weight: Tensor
    bias: Tensor | None

    @classmethod
    def of(cls, layer: LayerIO) -> LayerGradient | None:
        """The ``.grad`` of ``layer`` (``None`` without a weight gradient; a missing bias
        gradient counts as zero)."""
        weight, bias = layer.weight, layer.bias
        if weight.grad is None:
            return None
        weight_grad = layer.weight_matrix(weight.grad).float()
        bias_grad = None
        if bias is not None:
            bias_grad = (layer.bias_vector(bias.grad).float() if bias.grad is not None
                         else weight_grad.new_zeros(layer.groups, layer.out_dim))
        return cls(weight_grad, bias_grad)

    def times(self, matrix: Tensor) -> Tensor:
        """``[dW | db] @ matrix`` for ``matrix (groups, d_in, k)``: ``(groups, d_out, k)``."""
        fan_in = self.weight.shape[-1]
        product = matmul(self.weight, matrix[:, :fan_in])
        if self.bias is None:
            return product
        if product.shape[0] == 1:  # in place, one pass: product += db (x) matrix[fan_in]
            product[0].addr_(self.bias[0], matrix[0, fan_in])
            return product
        return product.baddbmm_(self.bias[:, :, None], matrix[:, fan_in, None, :])

    def dot(self, direction: Tensor) -> Tensor:
        """``<[dW | db], direction>`` for ``direction (groups, d_out, d_in)`` (0-dim)."""
        fan_in = self.weight.shape[-1]
        value = torch.mul(direction[..., :fan_in], self.weight).sum()
        if self.bias is not None:
            value = value + torch.mul(direction[..., fan_in], self.bias).sum()
        return value


def eigenbasis_precondition(grad: LayerGradient, basis_a: Tensor, basis_g: Tensor,
                            denominator: Tensor) -> Tensor:
    """``U_G ((U_G^T M U_A) / D) U_A^T`` for ``M = [dW | db] (groups, d_out, d_in)``,
    eigenbases ``basis_a (groups, d_in, d_in)``, ``basis_g (groups, d_out, d_out)`` and ``D``
    shaped like ``M``: the inverse of ``U diag(D) U^T``, ``U = U_G (x) U_A``, on ``vec(M)``."""
    rotated = matmul(basis_g.mT, grad.times(basis_a)) / denominator
    return matmul(matmul(basis_g, rotated), basis_a.mT)


def pi_ratio(a: Tensor, g: Tensor) -> Tensor:
    """``sqrt((tr(A) / dim A) / (tr(G) / dim G))`` per group of stacked factors ``(groups, d, d)``
    (Martens & Grosse 2015, Sec. 6.3), with both mean traces floored at float32 ``tiny``."""
    tiny = torch.finfo(torch.float32).tiny
    mean_a = a.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(tiny)
    mean_g = g.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(tiny)
    return (mean_a / mean_g).sqrt()


def factor_names(layers: list[LayerIO]) -> list[str]:
    """``name.A, name.G`` of each layer: the labels of failed decompositions in the log."""
    return flat_pairs((f"{layer.name}.A", f"{layer.name}.G") for layer in layers)


class KroneckerTerms:
    """Base of the terms (module docstring). ``fields`` names what :meth:`refresh` computes,
    in the order a state dict lists them."""

    fields: tuple[str, ...] = ()

    def refresh(self, layers: list[LayerIO], states: list[LayerCurvature],
                damping: Tensor) -> Tensor:
        """Recompute the terms of ``layers`` (their ``states``) from their factors; the number
        of kept (failed) decompositions."""
        raise NotImplementedError

    def direction(self, state: LayerCurvature, grad: LayerGradient, damping: Tensor) -> Tensor:
        """The direction ``(groups, d_out, d_in)`` for the gradient ``grad``."""
        raise NotImplementedError

    def quadratic(self, state: LayerCurvature, delta: Tensor) -> Tensor:
        """``vec(D)^T (G (x) A) vec(D) = <D, G D A>`` for ``delta`` shaped like ``[dW | db]``."""
        a, g = state.factors()
        return (g @ delta @ a * delta).sum()


class DampedInverses(KroneckerTerms):
    """K-FAC's factored Tikhonov damping (module docstring); ``pi_correction=False`` keeps
    ``pi = 1``."""

    fields = ("pi", "a_inv", "g_inv")

    def __init__(self, pi_correction: bool) -> None:
        self.pi_correction = pi_correction

    def refresh(self, layers: list[LayerIO], states: list[LayerCurvature],
                damping: Tensor) -> Tensor:
        """New pi (a non-finite pi, from a bad factor, keeps the previous value, or 1), then the
        damped inverses."""
        for layer, state in zip(layers, states, strict=True):
            a, g = state.factors()
            old = state.pi if state.pi is not None else a.new_ones(layer.groups)
            if self.pi_correction:
                new = pi_ratio(a, g)
                state.pi = torch.where(torch.isfinite(new), new, old)
            else:
                state.pi = old
        return self.invert(layers, states, damping)

    def invert(self, layers: list[LayerIO], states: list[LayerCurvature],
               damping: Tensor) -> Tensor:
        """The damped inverses of the factors with the layers' pi (also after a damping
        change)."""
        if not layers:
            return torch.zeros((), dtype=torch.long, device=damping.device)
        factors, dampings, previous = [], [], []
        for state in states:
            factors += state.factors()
            dampings += self.factor_dampings(state, damping)
            previous += [state.a_inv, state.g_inv]
        inverses, kept = damped_inverses(factors, dampings, previous, factor_names(layers))
        for state, (a_inv, g_inv) in zip(states, paired(inverses), strict=True):
            state.a_inv, state.g_inv = a_inv, g_inv
        return kept

    def factor_dampings(self, state: LayerCurvature, damping: Tensor) -> list[Tensor]:
        """``[d_A, d_G]`` of one layer, each ``(groups, 1)``: ``pi sqrt(damping)`` and
        ``sqrt(damping) / pi`` (Martens & Grosse 2015, Sec. 6.3); the one place a damping
        rule of one's own replaces (``docs/extending.md``)."""
        assert state.pi is not None
        root, pi = damping.sqrt(), state.pi[:, None]
        return [root * pi, root / pi]

    def direction(self, state: LayerCurvature, grad: LayerGradient, damping: Tensor) -> Tensor:
        assert state.a_inv is not None and state.g_inv is not None
        return matmul(state.g_inv, grad.times(state.a_inv))


class KroneckerEigenbasis(KroneckerTerms):
    """K-FAC in the eigenbasis of its factors, damped exactly (module docstring)."""

    fields = ("eigenvalues_a", "basis_a", "eigenvalues_g", "basis_g")

    def refresh(self, layers: list[LayerIO], states: list[LayerCurvature],
                damping: Tensor) -> Tensor:
        """Eigendecompose ``A`` and ``G`` of every layer at once."""
        factors = flat_pairs(state.factors() for state in states)
        previous = flat_pairs(state.eigens() for state in states)
        eigens, kept = robust_eigh(factors, previous, factor_names(layers))
        for state, (eigen_a, eigen_g) in zip(states, paired(eigens), strict=True):
            state.set_eigens(eigen_a, eigen_g)
        return kept

    def eigenvalues(self, state: LayerCurvature) -> Tensor:
        """The curvature's eigenvalues in the basis ``U_G (x) U_A``, ``(groups, d_out, d_in)``."""
        return state.kronecker_eigenvalues()

    def direction(self, state: LayerCurvature, grad: LayerGradient, damping: Tensor) -> Tensor:
        basis_a, basis_g = state.bases()
        return eigenbasis_precondition(grad, basis_a, basis_g,
                                       self.eigenvalues(state) + damping)


class CorrectedEigenbasis(KroneckerEigenbasis):
    """EKFAC: the eigenbasis with the scaling ``s`` as its eigenvalues (module docstring)."""

    def eigenvalues(self, state: LayerCurvature) -> Tensor:
        assert state.scale is not None
        return state.scale

    def quadratic(self, state: LayerCurvature, delta: Tensor) -> Tensor:
        """``vec(D)^T U diag(s) U^T vec(D) = <s, (U_G^T D U_A)^2>``."""
        basis_a, basis_g = state.bases()
        return (self.eigenvalues(state) * (basis_g.mT @ delta @ basis_a).square()).sum()
