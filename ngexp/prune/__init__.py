"""Pruning: criteria, schedules and masks, run as an engine callback (``prune=<preset>``).

Importing this package registers the ``schema/prune/pruner`` config schema.
"""

from __future__ import annotations

from ngexp.prune import pruner as pruner
from ngexp.prune.pruner import PruneConfig, Pruner

__all__ = ["PruneConfig", "Pruner"]
