"""The choice names of the curvature options: one set, meaning the same thing in every
estimator and preconditioner (as curvlinops' ``FisherType`` and ``KFACType``).

- :class:`FisherType` (``fisher_type``): which Fisher. ``exact``: the expectation over the
  model's predictive distribution taken exactly -- for the losses here (their outputs are natural
  parameters) the generalized Gauss-Newton matrix; ``mc``: that expectation estimated from
  ``mc_samples`` targets sampled from the model; ``empirical``: the gradients of the training
  labels. The Kronecker estimates (K-FAC, EKFAC, their pruning criteria) read ``mc`` or
  ``empirical`` passes (:data:`KRONECKER_FISHER_TYPES`); the natural gradient's curvature-vector
  products are ``exact`` or ``empirical`` (:data:`PRODUCT_FISHER_TYPES`).
- :class:`KFACApprox` (``kfac_approx``): how weight sharing enters the Kronecker factors
  (:mod:`ngexp.curvature.kronecker`): ``expand`` or ``reduce``.
- :class:`KroneckerType` (``kind``): ``kfac`` (``G (x) A``) or ``ekfac`` (its eigenbasis with
  re-estimated eigenvalues).

Members equal their strings (``FisherType.MC == "mc"``), so call sites and configs pass plain
strings. A signature annotates an option with :meth:`Choice.literal`, the ``Literal`` type
from which :mod:`ngexp.options` reads the choices it validates and lists.
"""

from __future__ import annotations

from enum import Enum
from typing import Any, Literal


class Choice(str, Enum):
    """An option value: equal to its string and printed as it."""

    def __str__(self) -> str:
        return str(self.value)

    @classmethod
    def literal(cls, *members: Choice) -> Any:
        """``Literal[...]`` of the strings of ``members`` (all members when none are given)."""
        return Literal[tuple(member.value for member in (members or tuple(cls)))]


class FisherType(Choice):
    """Which Fisher (module docstring)."""

    EXACT = "exact"
    MC = "mc"
    EMPIRICAL = "empirical"


class KFACApprox(Choice):
    """How weight sharing enters the Kronecker factors."""

    EXPAND = "expand"
    REDUCE = "reduce"


class KroneckerType(Choice):
    """K-FAC's Kronecker product or EKFAC's eigenvalue-corrected one."""

    KFAC = "kfac"
    EKFAC = "ekfac"


#: The Fisher types a Kronecker estimate reads passes of (sampled or training targets).
KRONECKER_FISHER_TYPES = (FisherType.MC, FisherType.EMPIRICAL)
#: The Fisher types of the exact curvature-vector products.
PRODUCT_FISHER_TYPES = (FisherType.EXACT, FisherType.EMPIRICAL)

#: Annotations of the options (their choices, as :mod:`ngexp.options` reads them).
KroneckerFisherType = FisherType.literal(*KRONECKER_FISHER_TYPES)
ProductFisherType = FisherType.literal(*PRODUCT_FISHER_TYPES)
KFACApproxName = KFACApprox.literal()
