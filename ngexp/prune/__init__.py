"""Pruning: criteria, schedules and masks, run as a trainer callback (``prune=<preset>``).

Importing this package registers the ``schema/prune/pruner`` config schema and the variational
pruners' (``variational_bernoulli``, ``spike_and_slab``).
"""

from __future__ import annotations

from ngexp.prune import pruner as pruner
from ngexp.prune import variational as variational
from ngexp.prune.pruner import PruneConfig, Pruner
from ngexp.prune.variational import SpikeAndSlab, VariationalBernoulli

__all__ = ["PruneConfig", "Pruner", "SpikeAndSlab", "VariationalBernoulli"]
