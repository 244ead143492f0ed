"""Batched eigendecompositions of symmetric positive semi-definite Kronecker factors.

All factors of one size are stacked and decomposed by a single ``torch.linalg.eigh`` call. A
decomposition that fails is retried in float64; a factor that still fails, or whose result is
not finite, keeps its previous eigenbasis. The finiteness test is a ``torch.where`` per matrix,
so no host/device synchronization is added (``eigh`` itself synchronizes on CUDA only to check
its convergence flag, which is what raises the error handled here).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import Tensor

log = logging.getLogger("ngexp")

#: An eigendecomposition: eigenvalues ``(..., d)`` (ascending, clamped at 0), eigenvectors
#: ``(..., d, d)`` with ``F = U diag(lambda) U^T``.
Eigen = tuple[Tensor, Tensor]


def neutral_eigen(factor: Tensor) -> Eigen:
    """The basis kept when there is no previous one: identity vectors, unit eigenvalues."""
    size = factor.shape[-1]
    eye = torch.eye(size, dtype=torch.float32, device=factor.device)
    return factor.new_ones(factor.shape[:-1], dtype=torch.float32), eye.expand_as(factor).clone()


def robust_eigh(
    factors: Sequence[Tensor], previous: Sequence[Eigen], names: Sequence[str]
) -> tuple[list[Eigen], Tensor]:
    """Eigendecompose every stack of symmetric matrices in ``factors``.

    ``factors[i]`` has shape ``(k_i, d_i, d_i)``; stacks of equal ``d`` are decomposed together.
    ``previous[i]`` (same shapes as the result) replaces any matrix whose decomposition fails or
    is not finite; ``names[i]`` labels failures in the log. Returns the decompositions (float32)
    and the number of kept (failed) matrices as a 0-dim tensor. ``factors`` must not be empty.
    """
    results: list[Eigen | None] = [None] * len(factors)
    kept = torch.zeros((), dtype=torch.long, device=factors[0].device)
    by_size: dict[int, list[int]] = {}
    for index, factor in enumerate(factors):
        by_size.setdefault(factor.shape[-1], []).append(index)
    for indices in by_size.values():
        stack = torch.cat([factors[i] for i in indices])
        labels = [f"{names[i]}[{k}]" for i in indices for k in range(factors[i].shape[0])]
        values, vectors = _eigh_with_retry(stack, labels)
        old_values = torch.cat([previous[i][0] for i in indices])
        old_vectors = torch.cat([previous[i][1] for i in indices])
        ok = torch.isfinite(values).all(-1) & torch.isfinite(vectors).flatten(1).all(-1)
        values = torch.where(ok[:, None], values.clamp_min(0), old_values)
        vectors = torch.where(ok[:, None, None], vectors, old_vectors)
        kept = kept + (~ok).sum()
        sizes = [factors[i].shape[0] for i in indices]
        for i, v, u in zip(indices, values.split(sizes), vectors.split(sizes), strict=True):
            results[i] = (v, u)
    return results, kept  # type: ignore[return-value]


def _eigh_with_retry(stack: Tensor, labels: list[str]) -> Eigen:
    """``eigh`` of ``(k, d, d)`` in float32, else float64, else one matrix at a time; matrices
    that fail every attempt come back as NaN (replaced by the caller)."""
    try:
        return torch.linalg.eigh(stack.float())
    except torch.linalg.LinAlgError:
        pass
    try:
        values, vectors = torch.linalg.eigh(stack.double())
        log.info("eigh failed in float32 for %s; float64 retry succeeded", ", ".join(labels))
        return values.float(), vectors.float()
    except torch.linalg.LinAlgError:
        pass
    values = stack.new_full(stack.shape[:-1], float("nan"), dtype=torch.float32)
    vectors = stack.new_full(stack.shape, float("nan"), dtype=torch.float32)
    for k, matrix in enumerate(stack):
        try:
            value, vector = torch.linalg.eigh(matrix.double())
            values[k], vectors[k] = value.float(), vector.float()
        except torch.linalg.LinAlgError:
            log.warning("eigh failed in float64 for %s; keeping its previous basis", labels[k])
    return values, vectors
