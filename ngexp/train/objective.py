"""The number a run returns to a Hydra sweeper (Optuna, Nevergrad, Ax ...): one metric of its
summary, and whether the sweeper should minimize or maximize it.

``objective`` names the metric (``val/loss``, ``test/acc``, ``train/loss`` ...; default: the
run's selection metric, ``val/acc`` or ``test/acc`` without a validation split, the loss for
tasks without accuracy), ``objective_at`` whether its ``final`` value or its ``best``
evaluation counts, ``objective_mode`` the direction (``auto``: ``min`` for losses and
perplexities, ``max`` otherwise, as :func:`ngexp.metrics.lower_is_better`). A run that failed
(diverged, crashed) or never recorded the metric returns the worst value, ``+inf`` for ``min``
and ``-inf`` for ``max``, so the sweep goes on and the sweeper learns to avoid it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from ngexp.metrics import lower_is_better


def objective_key(objective: str | None, summary: Mapping[str, Any] | None) -> str:
    """``objective``, or the selection metric found in the summary's final metrics."""
    if objective is not None:
        return objective
    final = (summary or {}).get("final") or {}
    split = "val" if any(str(k).startswith("val/") for k in final) else "test"
    return f"{split}/acc" if f"{split}/acc" in final else f"{split}/loss"


def minimizes(key: str, mode: str) -> bool:
    return lower_is_better(key) if mode == "auto" else mode == "min"


def objective_value(summary: Mapping[str, Any] | None, objective: str | None, at: str,
                    mode: str) -> float:
    """The objective of a run from its ``summary`` (``None``: the run wrote none)."""
    key = objective_key(objective, summary)
    worst = math.inf if minimizes(key, mode) else -math.inf
    if summary is None or summary.get("status") != "completed":
        return worst
    value = (summary.get(at) or {}).get(key)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        return worst
    return float(value)
