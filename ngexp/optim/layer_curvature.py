"""The curvature state of one layer of K-FAC or EKFAC, typed (as kfac-pytorch's per-layer
objects), and the running averages its statistics are kept in.

A layer's ``[W | b]`` is ``(groups, d_out, d_in)`` (bias as the last input coordinate). Its
state, every field a float32 tensor or ``None`` until computed (field: state key, shape):

- ``a``, ``g``: ``A``, ``G``, ``(groups, d, d)``: the running Kronecker factors;
- ``pi``: ``pi``, ``(groups,)``: K-FAC's pi correction;
- ``a_inv``, ``g_inv``: ``A_inv``, ``G_inv``, ``(groups, d, d)``: K-FAC's damped inverses;
- ``eigenvalues_a``, ``eigenvalues_g``: ``lambda_A``, ``lambda_G``, ``(groups, d)``, and
  ``basis_a``, ``basis_g``: ``U_A``, ``U_G``, ``(groups, d, d)``: the factors' eigenbases;
- ``scale``: ``s``, ``(groups, d_out, d_in)``: EKFAC's eigenbasis scaling.

``d`` is ``d_in`` on the A side and ``d_out`` on the G side. The state keys are the layout of a
checkpoint (``layers[name][key]``) and of :meth:`KroneckerPreconditioner.curvature`. The
decompositions stay batched over layers (:mod:`ngexp.optim.kronecker_terms`): a layer object
holds the results, it does not compute them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from ngexp.curvature.linalg import Eigen, neutral_eigen

#: The state key of each field (module docstring), in the order a state dict lists them.
STATE_KEYS = {"a": "A", "g": "G", "pi": "pi", "a_inv": "A_inv", "g_inv": "G_inv",
              "eigenvalues_a": "lambda_A", "basis_a": "U_A", "eigenvalues_g": "lambda_G",
              "basis_g": "U_G", "scale": "s"}
FIELDS = {key: name for name, key in STATE_KEYS.items()}


@dataclass
class LayerCurvature:
    """One layer's curvature state (module docstring)."""

    a: Tensor | None = None
    g: Tensor | None = None
    pi: Tensor | None = None
    a_inv: Tensor | None = None
    g_inv: Tensor | None = None
    eigenvalues_a: Tensor | None = None
    basis_a: Tensor | None = None
    eigenvalues_g: Tensor | None = None
    basis_g: Tensor | None = None
    scale: Tensor | None = None

    @classmethod
    def from_state(cls, values: Mapping[str, Tensor], device: torch.device) -> LayerCurvature:
        """The layer of a state dict's ``layers[name]`` (keys: module docstring), on ``device``."""
        return cls(**{FIELDS[key]: value.to(device) for key, value in values.items()})

    def as_state(self) -> dict[str, Tensor]:
        """The computed fields by state key (live tensors, not copies)."""
        return {key: value for name, key in STATE_KEYS.items()
                if (value := getattr(self, name)) is not None}

    def copy(self) -> LayerCurvature:
        """A shallow copy (the same tensors)."""
        return dataclasses.replace(self)

    def has(self, fields: Iterable[str]) -> bool:
        """Whether every one of ``fields`` is computed."""
        return all(getattr(self, name) is not None for name in fields)

    def drop(self, fields: Iterable[str]) -> None:
        """Forget ``fields`` (terms this rank does not hold)."""
        for name in fields:
            setattr(self, name, None)

    def factors(self) -> tuple[Tensor, Tensor]:
        """The running factors ``(A, G)``."""
        assert self.a is not None and self.g is not None, "no statistics yet"
        return self.a, self.g

    def eigens(self) -> tuple[Eigen, Eigen]:
        """``((lambda_A, U_A), (lambda_G, U_G))``, or the neutral basis where none exists yet
        (what a failed decomposition keeps)."""
        a, g = self.factors()
        eigen_a = (neutral_eigen(a) if self.basis_a is None or self.eigenvalues_a is None
                   else (self.eigenvalues_a, self.basis_a))
        eigen_g = (neutral_eigen(g) if self.basis_g is None or self.eigenvalues_g is None
                   else (self.eigenvalues_g, self.basis_g))
        return eigen_a, eigen_g

    def set_eigens(self, eigen_a: Eigen, eigen_g: Eigen) -> None:
        (self.eigenvalues_a, self.basis_a), (self.eigenvalues_g, self.basis_g) = eigen_a, eigen_g

    def bases(self) -> tuple[Tensor, Tensor]:
        """The eigenbases ``(U_A, U_G)``."""
        assert self.basis_a is not None and self.basis_g is not None, "no eigenbases yet"
        return self.basis_a, self.basis_g

    def kronecker_eigenvalues(self) -> Tensor:
        """Eigenvalues ``lambda_G lambda_A^T`` of ``G (x) A`` in its eigenbasis, ``(groups,
        d_out, d_in)``."""
        assert self.eigenvalues_a is not None and self.eigenvalues_g is not None
        return self.eigenvalues_g[:, :, None] * self.eigenvalues_a[:, None, :]


class RunningAverages:
    """Exponential running averages of batch statistics that skip bad batches without host
    syncs: ``ok`` (a 0-dim bool on the device) is false while the grad scaler skips the step;
    ``skipped`` counts the batch estimates left out."""

    def __init__(self, device: torch.device) -> None:
        #: Whether this step's statistics may enter the averages.
        self.ok = torch.ones((), dtype=torch.bool, device=device)
        self.skipped = torch.zeros((), dtype=torch.long, device=device)

    def update(self, old: Tensor | None, batch: Tensor, decay: Tensor | float) -> Tensor:
        """``decay * old + (1 - decay) * batch``; a first (or non-finite) old value is replaced,
        a non-finite batch estimate is skipped. Finiteness is read off the sums (a NaN or inf
        entry makes the sum non-finite; so does, conservatively, an overflowing one)."""
        good = torch.isfinite(batch.sum()) & self.ok
        self.skipped += ~good
        if old is None:  # a skipped first estimate is replaced by the next good one
            return torch.where(good, batch, float("nan"))
        if isinstance(decay, Tensor):
            decay = decay.to(batch.dtype)
        old_good = torch.isfinite(old.sum())
        return torch.lerp(torch.where(good, batch, old), torch.where(old_good, old, batch),
                          decay)


class EstimateCount:
    """How many rounds of batch estimates entered a set of running averages, a 0-dim long on
    the device (no host sync). A round the grad scaler skips (``ok`` false) does not count, so
    the ``k``-th round that entered gets the weight ``1/k`` of an equal-weight average however
    many were skipped before it."""

    def __init__(self, device: torch.device) -> None:
        self.value = torch.zeros((), dtype=torch.long, device=device)

    def advance(self, ok: Tensor, cap: float) -> Tensor:
        """Count this round if ``ok``; returns its decay ``min(cap, 1 - 1/k)`` (float32, ``k``
        the count with this round; 0 while it is 0, so a first estimate replaces)."""
        self.value += ok
        count = self.value.float()
        return ((count - 1) / count.clamp(min=1)).clamp(min=0, max=cap)

    def reset(self) -> None:
        self.value.zero_()

    def load(self, value: Tensor | int) -> None:
        """Set the count (a checkpoint's tensor, or a number)."""
        if isinstance(value, Tensor):
            self.value.copy_(value)
        else:
            self.value.fill_(value)
