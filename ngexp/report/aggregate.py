"""Group runs, pick one metric value per run, aggregate seeds (mean ± sample std, ddof=1).

Rows: one per group of *completed* runs, plus one per run in any other state (failed, running,
stale, interrupted, unfinished), so that such runs are visible but never mixed into a mean.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ngexp.config import NON_SEMANTIC_KEYS
from ngexp.metrics import lower_is_better
from ngexp.report.scan import AXES, Run

#: Preference order of the default metric (the first one any run logged).
DEFAULT_METRICS = ("test/acc", "test/loss", "val/acc", "val/loss", "train/acc", "train/loss",
                   "train/mse")
SPARSITY = "prune/sparsity"


class _Missing:
    """Value of a key a run's config does not have (shown as ``-``)."""

    def __repr__(self) -> str:
        return "-"


MISSING: Any = _Missing()


def key_value(run: Run, key: str) -> Any:
    """A bare group name (``optimizer``) gives the chosen option from ``summary.json``'s
    ``choices``; anything else is a dotted key of ``config.yaml`` (``optimizer.lr``)."""
    if key in run.choices:
        return run.choices[key]
    return run.config.get(key, MISSING)


def auto_keys(runs: Sequence[Run]) -> list[str]:
    """Keys that tell the runs' configurations apart (seed and non-semantic keys left out).

    Choice groups that vary come first (``optimizer`` when sgd and adam runs are mixed); a dotted
    key under such a group (``optimizer.lr``) is kept only if it also varies among runs with the
    same option. Nothing varies: the choices.
    """
    groups = list(dict.fromkeys(group for run in runs for group in run.choices))
    varying = [g for g in groups  # runs without summary.json (no choices) do not count
               if len({run.choices[g] for run in runs if g in run.choices}) > 1]
    ignored = ("seed", *NON_SEMANTIC_KEYS)
    keys = sorted({k for run in runs for k in run.config
                   if k not in ignored and not k.startswith("hydra.")})

    def varies(key: str) -> bool:  # runs without a readable config.yaml do not count
        group = key.split(".")[0]
        seen: dict[Any, set[Any]] = {}
        for run in (run for run in runs if run.config):
            bucket = key_value(run, group) if group in varying else None
            seen.setdefault(bucket, set()).add(key_value(run, key))
        return any(len(values) > 1 for values in seen.values())

    chosen = varying + [key for key in keys if varies(key)]
    return chosen or [g for g in groups if any(key_value(run, g) is not None for run in runs)]


def check_keys(runs: Sequence[Run], keys: Sequence[str]) -> str | None:
    """A message naming the first key no run has, else ``None``."""
    for key in keys:
        if all(key_value(run, key) is MISSING for run in runs):
            groups = sorted({g for run in runs for g in run.choices})
            return (f"--by key {key!r} is in no run: use a config group ({', '.join(groups)}) "
                    f"or a dotted config key such as optimizer.lr")
    return None


def metric_names(runs: Iterable[Run]) -> list[str]:
    """Every metric any run logged (sorted)."""
    names: set[str] = set()
    for run in runs:
        names.update(run.summary.get("final") or {})
        for record in run.records:
            names.update(record)
    return sorted(names - set(AXES))


def default_metric(available: Sequence[str]) -> str:
    return next((m for m in DEFAULT_METRICS if m in available), DEFAULT_METRICS[0])


def run_value(run: Run, metric: str, best: bool = False) -> float | None:
    """The run's final value of ``metric`` (``summary.json`` "final", else the last record),
    or with ``best`` its best recorded value: min for loss-like metrics, max otherwise."""
    values = [float(r[metric]) for r in run.records if metric in r]  # numbers (scan.py)
    if best:
        finite = [v for v in values if math.isfinite(v)]
        if finite:
            return min(finite) if lower_is_better(metric) else max(finite)
        stored = (run.summary.get("best") or {}).get(metric)
    else:
        stored = (run.summary.get("final") or {}).get(metric)
        if stored is None and values:
            return values[-1]
    return None if stored is None else float(stored)


def mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (ddof=1; ``None`` for fewer than two values)."""
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


@dataclass
class Row:
    """Runs sharing the values ``key`` of the report's keys, all in one ``status``."""

    key: tuple[Any, ...]
    status: str
    runs: list[Run] = field(default_factory=list)
    values: list[float] = field(default_factory=list)  # metric of the runs that logged it

    @property
    def n(self) -> int:
        return len(self.runs)

    @property
    def completed(self) -> bool:
        return self.status == "completed"

    @property
    def mean(self) -> float | None:
        return mean_std(self.values)[0]

    @property
    def std(self) -> float | None:
        return mean_std(self.values)[1]

    @property
    def seeds(self) -> list[int]:
        return sorted(run.seed for run in self.runs if run.seed is not None)

    @property
    def wall_time(self) -> float | None:
        return mean_std([t for run in self.runs if (t := run.wall_time) is not None])[0]


def aggregate(runs: Iterable[Run], keys: Sequence[str], metric: str,
              best: bool = False) -> list[Row]:
    """Rows sorted by key values, completed before other states, then by seed."""
    groups: dict[tuple[Any, ...], Row] = {}
    rows: list[Row] = []
    for run in sorted(runs, key=lambda r: -1 if r.seed is None else r.seed):
        key = tuple(key_value(run, k) for k in keys)
        if run.completed:
            row = groups.get(key)
            if row is None:
                row = groups[key] = Row(key, "completed")
                rows.append(row)
        else:
            row = Row(key, run.status)
            rows.append(row)
        row.runs.append(run)
        if (value := run_value(run, metric, best)) is not None:
            row.values.append(value)
    return sorted(rows, key=lambda r: (tuple(map(sort_key, r.key)), not r.completed, r.seeds))


def sort_key(value: Any) -> tuple[int, Any]:
    """Numbers numerically, then strings, then null, then missing."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (0, value)
    if value is None or value is MISSING:
        return (2 + (value is MISSING), "")
    return (1, str(value))


def show(value: Any) -> str:
    """A key value as written in the config, floats without an exponent (1e-08 -> 0.00000001)."""
    if value is None:
        return "none"
    if isinstance(value, float):
        return np.format_float_positional(value, trim="-")
    if isinstance(value, tuple):
        return "[" + ", ".join(map(show, value)) + "]"
    return str(value)


def label(keys: Sequence[str], key: Sequence[Any]) -> str:
    """Legend text: the value alone for one key, ``k=v, ...`` for several."""
    if len(keys) == 1:
        return show(key[0])
    return ", ".join(f"{k}={show(v)}" for k, v in zip(keys, key, strict=True))


def series(run: Run, metric: str, axis: str) -> tuple[np.ndarray, np.ndarray]:
    """(x, y): the finite values of ``metric`` against ``axis`` (epoch, step or time), in the
    order logged, one per step: the last one logged at a step (a run resumed after a crash
    re-logs what its instrument callbacks logged after the checkpoint)."""
    points: dict[object, tuple[float, float]] = {}
    for index, r in enumerate(run.records):
        if metric in r and axis in r and math.isfinite(r[metric]):
            points[r.get("step", ("record", index))] = (r[axis], r[metric])
    xy = np.asarray(list(points.values()), dtype=float).reshape(-1, 2)
    return xy[:, 0], xy[:, 1]


def band(curves: Sequence[tuple[np.ndarray, np.ndarray]], points: int = 200,
         steps: Sequence[np.ndarray] | None = None
         ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None] | None:
    """Mean and sample std (ddof=1; ``None`` for one curve) of curves y_i(x) on one grid.

    - Curves logged at the same x are stacked as they are.
    - Curves logged at the same ``steps`` (one step array per curve; e.g. x = wall-clock time of
      the evaluations of several seeds) are stacked step by step, at x = the mean x per step.
    - Otherwise each curve is interpolated linearly onto ``points`` even x in the range all of
      them cover, [max_i min x_i, min_i max x_i] (no extrapolation); ``None`` if it is empty.
    """
    if any(len(x) == 0 for x, _ in curves):
        return None
    if _equal([x for x, _ in curves]):
        grid, ys = curves[0][0], np.stack([y for _, y in curves])
    elif steps is not None and _equal(steps):
        grid, ys = np.mean([x for x, _ in curves], axis=0), np.stack([y for _, y in curves])
    else:
        lo, hi = max(x[0] for x, _ in curves), min(x[-1] for x, _ in curves)
        if not hi > lo:
            return None
        grid = np.linspace(lo, hi, points)
        ys = np.stack([np.interp(grid, x, y) for x, y in curves])
    std = ys.std(axis=0, ddof=1) if len(curves) > 1 else None
    return grid, ys.mean(axis=0), std


def _equal(arrays: Sequence[np.ndarray]) -> bool:
    return all(a.shape == arrays[0].shape and np.array_equal(a, arrays[0]) for a in arrays)


@dataclass
class Point:
    """Mean and sample std of ``metric`` over runs pruned to about the same sparsity."""

    sparsity: float
    mean: float
    std: float | None
    n: int


def pruning_curves(rows: Sequence[Row], keys: Sequence[str], metric: str,
                   best: bool = False) -> dict[str, list[Point]]:
    """Completed pruning runs (a final ``prune/sparsity``): metric vs sparsity, one curve per
    ``prune.criterion`` (and per value of any report key outside ``prune``), runs at the same
    sparsity (to 3 decimals) aggregated."""
    other = [i for i, k in enumerate(keys) if k.split(".")[0] != "prune"]
    buckets: dict[str, dict[float, list[tuple[float, float]]]] = {}
    for row in rows:
        if not row.completed:
            continue
        for run in row.runs:
            sparsity, value = run_value(run, SPARSITY), run_value(run, metric, best)
            if sparsity is None or value is None:
                continue
            criterion = key_value(run, "prune.criterion")
            name = show(key_value(run, "prune") if criterion is MISSING else criterion)
            if other:
                name += f" ({label([keys[i] for i in other], [row.key[i] for i in other])})"
            buckets.setdefault(name, {}).setdefault(round(sparsity, 3), []).append(
                (sparsity, value))
    curves: dict[str, list[Point]] = {}
    for name, by_sparsity in sorted(buckets.items()):
        curves[name] = []
        for pairs in (by_sparsity[s] for s in sorted(by_sparsity)):
            mean, std = mean_std([v for _, v in pairs])
            assert mean is not None
            curves[name].append(Point(statistics.fmean(s for s, _ in pairs), mean, std,
                                      len(pairs)))
    return curves
