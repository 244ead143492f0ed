"""Linear algebra of the curvature estimators: batched decompositions of Kronecker factors and
conjugate gradient.

- :func:`robust_eigh`: eigendecompositions, where an eigenbasis is used (K-FAC's
  ``damping_mode=eigen``, EKFAC).
- :func:`damped_inverses`: ``(F + d I)^-1`` by Cholesky (K-FAC's factored damping): about
  ``n^3`` flops for the factorization and its inverse, several times cheaper than ``eigh``.
- :func:`conjugate_gradient`: the natural gradient's solve.

All factors of one size are stacked and decomposed by a single call. A decomposition that fails
is retried in float64; a factor that still fails, or whose result is not finite, keeps its
previous value. The finiteness tests are ``torch.where`` per matrix, so no host/device
synchronization is added beyond the one the decomposition needs to report failure (``eigh``
raises; ``cholesky_ex``'s status is read once per refresh).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Sequence
from typing import NamedTuple

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


def damped_inverses(
    factors: Sequence[Tensor], dampings: Sequence[Tensor], previous: Sequence[Tensor | None],
    names: Sequence[str],
) -> tuple[list[Tensor], Tensor]:
    """``(F_i + d_i I)^-1`` for stacks ``factors[i] (k_i, n_i, n_i)`` of symmetric positive
    semi-definite matrices and dampings ``dampings[i] (k_i, 1)`` (> 0), by Cholesky; stacks of
    equal ``n`` are factorized together. A matrix that is not finite, or whose factorization
    fails in float32 and in float64, keeps ``previous[i]`` (the identity when ``None``).
    Returns the inverses (float32) and the number of kept matrices as a 0-dim tensor."""
    by_size: dict[int, list[int]] = {}
    for index, factor in enumerate(factors):
        by_size.setdefault(factor.shape[-1], []).append(index)
    stacks, inverses, failures, finites = [], [], [], []
    for indices in by_size.values():
        eye = torch.eye(factors[indices[0]].shape[-1], device=factors[indices[0]].device)
        stack = torch.cat([factors[i].float() + dampings[i][..., None] * eye for i in indices])
        lower, info = torch.linalg.cholesky_ex(stack)
        stacks.append(stack)
        inverses.append(torch.cholesky_inverse(lower))
        finites.append(torch.isfinite(stack.sum((-2, -1))))
        failures.append((info != 0) & finites[-1])
    kept = torch.zeros((), dtype=torch.long, device=factors[0].device)
    # the one host sync of a refresh: did any factorization fail or any factor overflow?
    if bool(torch.cat([f | ~ok for f, ok in zip(failures, finites, strict=True)]).any()):
        for group, indices in enumerate(by_size.values()):
            names_in = [names[i] for i in indices]
            bad = _retry_in_float64(stacks[group], inverses[group], failures[group], names_in)
            bad = bad | ~finites[group]
            eye = torch.eye(factors[indices[0]].shape[-1], device=factors[indices[0]].device)
            old = torch.cat([previous[i] if previous[i] is not None
                             else eye.expand_as(factors[i]) for i in indices])
            inverses[group] = torch.where(bad[:, None, None], old, inverses[group])
            kept = kept + bad.sum()
    results: dict[int, Tensor] = {}
    for indices, inverse in zip(by_size.values(), inverses, strict=True):
        sizes = [factors[i].shape[0] for i in indices]
        results.update(zip(indices, inverse.split(sizes), strict=True))
    return [results[i] for i in range(len(factors))], kept


def _retry_in_float64(stack: Tensor, inverse: Tensor, failed: Tensor, names: list[str]) -> Tensor:
    """Redo in float64 the inverses of ``stack (k, n, n)`` whose float32 Cholesky ``failed
    (k,)``, writing them into ``inverse``; returns the mask of those that failed again."""
    failed_again = torch.zeros_like(failed)
    if not bool(failed.any()):
        return failed_again
    lower64, info64 = torch.linalg.cholesky_ex(stack[failed].double())
    inverse[failed] = torch.cholesky_inverse(lower64).float()
    failed_again[failed] = info64 != 0
    log.info("Cholesky failed in float32 for %s; retried in float64", ", ".join(names))
    if bool(failed_again.any()):
        log.warning("Cholesky failed in float64 for %s; keeping the previous inverse",
                    ", ".join(names))
    return failed_again


class CGResult(NamedTuple):
    """Solution ``x`` (P,), iterations that changed it and final ``|r| / |b|`` (0-dim tensors);
    ``iterates``: ``(i, x_i, r_i)`` after the ``i``-th iteration for each ``i`` of ``keep_at``
    that the loop reached, then the last iterate (``r_i = b - A x_i``, the recurrence's
    residual); empty without ``keep_at``."""

    x: Tensor
    iterations: Tensor
    residual: Tensor
    iterates: tuple[tuple[int, Tensor, Tensor], ...] = ()


def conjugate_gradient(matvec: Callable[[Tensor], Tensor], b: Tensor, x0: Tensor | None,
                       iters: int, tol: float, early_exit: bool | None = None,
                       preconditioner: Tensor | None = None,
                       keep_at: Collection[int] = ()) -> CGResult:
    """Solve ``A x = b`` for symmetric positive definite ``A`` by conjugate gradient (Hestenes &
    Stiefel 1952; Nocedal & Wright 2006, Alg. 5.2, or with ``preconditioner`` the diagonal ``M``
    (P,) > 0, preconditioned CG, Alg. 5.3: ``z = M^-1 r``) from ``x0`` (``None``: zero, saving a
    product).

    Stops when ``|b - A x| <= tol |b|`` (or at a direction of non-positive curvature, which only
    rounding produces for a damped Fisher) without host/device syncs: the stop is a tensor mask
    that freezes ``x`` for the rest of the ``iters`` iterations. With ``early_exit`` (default: on
    the CPU, where reading the mask costs nothing) the loop also ends there; the result is the
    same either way. ``keep_at``: iterations whose iterate is returned too (Martens 2010, Sec.
    4.6: CG iterate backtracking).
    """
    if early_exit is None:
        early_exit = b.device.type == "cpu"
    if x0 is None:
        x, r = torch.zeros_like(b), b.clone()
    else:
        x, r = x0.clone(), b - matvec(x0)
    z = r if preconditioner is None else r / preconditioner
    p = z.clone()
    rz = torch.dot(r, z)
    norm_b = torch.linalg.vector_norm(b)
    threshold = (tol * norm_b).square().clamp_min(torch.finfo(b.dtype).tiny)
    rr = rz if preconditioner is None else torch.dot(r, r)
    active = rr > threshold
    iterations = torch.zeros((), dtype=torch.long, device=b.device)
    iterates, done = [], 0
    for step in range(1, iters + 1):
        if early_exit and not active:
            break
        done = step
        ap = matvec(p)
        curvature = torch.dot(p, ap)
        active = active & (curvature > 0)
        alpha = torch.where(active, rz / curvature, 0.0)
        x.add_(alpha * p)
        r.sub_(alpha * ap)
        z = r if preconditioner is None else r / preconditioner
        rz_next = torch.dot(r, z)
        p = z + torch.where(active, rz_next / rz, 0.0) * p
        iterations += active
        rz = rz_next
        rr = rz if preconditioner is None else torch.dot(r, r)
        active = active & (rr > threshold)
        if step in keep_at:
            iterates.append((step, x.clone(), r.clone()))
    if keep_at and (not iterates or iterates[-1][0] != done):
        iterates.append((done, x.clone(), r.clone()))
    residual = rr.sqrt() / norm_b.clamp_min(torch.finfo(b.dtype).tiny)
    return CGResult(x, iterations, residual, tuple(iterates))
