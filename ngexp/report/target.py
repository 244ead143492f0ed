"""Time to target: how long each group of runs takes to first reach a value of a metric, and
the performance profile of the groups (Dolan & Moré 2002, as the AlgoPerf benchmark scores
training algorithms, Dahl et al. 2023).

A run *reaches* the target ``metric = value`` at its first record with ``metric <= value``
(``>=`` for metrics where higher is better, :func:`ngexp.metrics.lower_is_better`); it took
that record's ``step``, ``step x global batch`` examples and ``time`` seconds (the training
wall time the trainer logs with every record, evaluations and checkpoint writes left out,
:mod:`ngexp.train.clock`; evaluations are recorded at ``trainer.eval_every``
steps or each epoch end, which bounds the resolution). A run that never reaches it (or failed
first) took ``inf``: it is counted in the group's ``reached k/n`` and its median (the median of
all the group's runs, ``inf`` when half or more missed), and left out of the spread (min-max
of the runs that reached it).

The target is given (``--target val/loss=0.5``) or taken from a baseline group (``--target-from
adam``): the worst over that group's runs of each run's best value of the metric, the value
every seed of the baseline reaches (so the baseline's own time to target is defined).

Performance profile: a *problem* is a workload (data set and model) with one seed; for group
``s`` on problem ``p`` the ratio ``r = t(p, s) / min_s' t(p, s')`` of its time to target over the
fastest group's, and ``rho_s(tau)``, the fraction of problems with ``r <= tau``: the curve that
rises first and highest is the fastest algorithm; one that stays below 1 missed the target on
some problems.
"""

from __future__ import annotations

import csv
import math
import os
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ngexp.errors import UserError
from ngexp.metrics import lower_is_better
from ngexp.report.aggregate import Row, label, run_value
from ngexp.report.scan import Run
from ngexp.report.tables import number

#: What a time to target is measured in: the record field it is read from (examples: steps x
#: the global batch).
MEASURES = ("steps", "examples", "seconds")
UNREACHED = math.inf


def parse_target(text: str) -> tuple[str, float]:
    """``val/loss=0.5`` -> ``("val/loss", 0.5)``."""
    metric, sep, value = text.partition("=")
    try:
        number_ = float(value)
    except ValueError:
        number_ = math.nan
    if not sep or not metric or not math.isfinite(number_):
        raise UserError(f"--target {text!r}: expected METRIC=VALUE, e.g. --target val/loss=0.5")
    return metric, number_


def reaches(metric: str, value: float, target: float) -> bool:
    return value <= target if lower_is_better(metric) else value >= target


def batch_size(run: Run) -> float | None:
    """Examples per step: summary.json's global batch, else config.yaml's trainer.batch_size."""
    size = run.summary.get("global_batch_size") or run.config.get("trainer.batch_size")
    return float(size) if isinstance(size, (int, float)) and not isinstance(size, bool) else None


def first_hit(run: Run, metric: str, target: float) -> dict[str, float]:
    """Steps, examples and seconds at the run's first record that reaches ``target``
    (:data:`UNREACHED` each when none does; ``nan`` for a quantity the run did not log)."""
    for record in run.records:
        if metric in record and reaches(metric, float(record[metric]), target):
            step = float(record.get("step", math.nan))
            size = batch_size(run)
            return {"steps": step, "examples": step * size if size else math.nan,
                    "seconds": float(record.get("time", math.nan))}
    return dict.fromkeys(MEASURES, UNREACHED)


def target_from(rows: Sequence[Row], keys: Sequence[str], group: str, metric: str) -> float:
    """The value of ``metric`` that every run of the completed group labelled ``group``
    reaches: the worst over its runs of each run's best value."""
    labels = {label(keys, row.key): row for row in rows if row.completed}
    if group not in labels:
        raise UserError(f"--target-from {group!r} is not a group of completed runs; choices: "
                        + ", ".join(labels))
    best = [v for run in labels[group].runs if (v := run_value(run, metric, True)) is not None]
    if not best:
        raise UserError(f"--target-from {group!r}: its runs logged no {metric}")
    return max(best) if lower_is_better(metric) else min(best)


@dataclass
class TargetRow:
    """The time to target of each run of one report row, per measure."""

    row: Row
    hits: list[dict[str, float]]

    @property
    def reached(self) -> int:
        return sum(hit["steps"] != UNREACHED for hit in self.hits)

    def median(self, measure: str) -> float:
        """Median over all runs, misses as ``inf`` (``nan`` if a reaching run lacks it)."""
        return statistics.median(hit[measure] for hit in self.hits) if self.hits else math.nan

    def spread(self, measure: str) -> tuple[float, float] | None:
        """Min and max over the runs that reached the target."""
        done = [hit[measure] for hit in self.hits if hit[measure] != UNREACHED]
        return (min(done), max(done)) if done else None


def target_rows(rows: Sequence[Row], metric: str, target: float) -> list[TargetRow]:
    return [TargetRow(row, [first_hit(run, metric, target) for run in row.runs]) for row in rows]


def cell(item: TargetRow, measure: str) -> str:
    """``1200 (1100-1400)``, or ``never`` when the median run missed."""
    median, spread = item.median(measure), item.spread(measure)
    if median == UNREACHED:
        return "never"
    if math.isnan(median):
        return "-"
    text = show_time(median, measure)
    if spread is not None and item.reached > 1:
        text += f" ({show_time(spread[0], measure)}-{show_time(spread[1], measure)})"
    return text


def show_time(value: float, measure: str) -> str:
    """Seconds to 4 significant digits, steps and examples whole."""
    return number(value) if measure == "seconds" else f"{value:.0f}"


def markdown_section(items: Sequence[TargetRow], keys: Sequence[str], metric: str,
                     target: float, source: str, figures: Sequence[Path]) -> list[str]:
    """The lines of report.md's "Time to target" section."""
    sign = "<=" if lower_is_better(metric) else ">="
    head = [*keys, "status", "reached", *MEASURES]
    lines = ["## Time to target", "",
             f"First record with `{metric} {sign} {number(target)}` ({source}): median over "
             "the runs (misses count as never; `never` when half or more missed), min-max of "
             "the runs that reached it in parentheses. Seconds are training wall time "
             "(evaluations and checkpoint writes left out).", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for item in items:
        row = item.row
        values = [label([k], [v]) for k, v in zip(keys, row.key, strict=True)]
        lines.append("| " + " | ".join([*values, row.status, f"{item.reached}/{row.n}",
                                         *(cell(item, m) for m in MEASURES)]) + " |")
    return [*lines, "", *(f"![{p.stem}]({p.name})" for p in figures)]


def write_csv(path: Path, items: Sequence[TargetRow], keys: Sequence[str]) -> None:
    """One line per run: its group, seed, status, time to target per measure (``inf`` for
    never) and run directory, relative to the CSV's folder as in report.csv."""
    folder = path.parent.resolve()
    with path.open("w", newline="", encoding="utf-8") as stream:
        writer = csv.writer(stream)
        writer.writerow([*keys, "seed", "status", *MEASURES, "run_dir_relative_to_csv"])
        for item in items:
            for run, hit in zip(item.row.runs, item.hits, strict=True):
                writer.writerow([*map(str, item.row.key), run.seed, run.status,
                                 *(repr(hit[m]) for m in MEASURES),
                                 os.path.relpath(run.path, folder)])


def workload(run: Run) -> tuple[Any, Any]:
    """A run's workload: its ``data`` and ``model`` choices."""
    return run.choices.get("data"), run.choices.get("model")


def problem(run: Run) -> tuple[Any, ...]:
    """A performance-profile problem: the workload (data, model) and the seed."""
    return (*workload(run), run.seed)


def ratio(time: float, best: float) -> float:
    """``time / best``; ``inf`` when either is unreached (or not logged)."""
    if math.isnan(time) or time == UNREACHED or best == UNREACHED:
        return UNREACHED
    return time / best if best > 0 else (1.0 if time <= best else UNREACHED)


def best_times(items: Sequence[TargetRow], keys: Sequence[str],
               measure: str) -> dict[str, dict[tuple[Any, ...], float]]:
    """Group label -> :func:`problem` -> the least time to target of the group's runs on it
    (``inf`` when none reached it; a time not logged counts as never)."""
    times: dict[str, dict[tuple[Any, ...], float]] = {}
    for item in items:
        group = times.setdefault(label(keys, item.row.key), {})
        for run, hit in zip(item.row.runs, item.hits, strict=True):
            time = UNREACHED if math.isnan(hit[measure]) else hit[measure]
            group[problem(run)] = min(group.get(problem(run), UNREACHED), time)
    return times


def profiles(items: Sequence[TargetRow], keys: Sequence[str],
             measure: str) -> dict[str, list[float]]:
    """Group label -> its sorted ratios ``r = t / t_best`` on each problem (``inf``: missed or
    not run; problems nobody solved count as missed by all). ``rho(tau)`` is the fraction of a
    list's entries ``<= tau``."""
    times = best_times(items, keys, measure)
    problems = sorted({p for group in times.values() for p in group}, key=repr)
    best = {p: min(group.get(p, UNREACHED) for group in times.values()) for p in problems}
    return {name: sorted(ratio(group.get(p, UNREACHED), best[p]) for p in problems)
            for name, group in times.items()}


def rho(ratios: Sequence[float], tau: float) -> float:
    """The performance profile at ``tau``: the fraction of ``ratios`` that are ``<= tau``."""
    return sum(r <= tau for r in ratios) / len(ratios) if ratios else 0.0


def plot_profiles(items: Sequence[TargetRow], keys: Sequence[str], metric: str, target: float,
                  out_dir: Path) -> list[Path]:
    """``performance_profile_<measure>.png`` for each measure with a finite ratio."""
    from ngexp.report.plots import _legend, _pyplot, _save

    plt = _pyplot()
    paths = []
    for measure in MEASURES:
        curves = profiles(items, keys, measure)
        finite = [r for ratios in curves.values() for r in ratios if math.isfinite(r)]
        if not finite:
            continue
        top = max(max(finite) * 1.2, 1.5)
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for name, ratios in curves.items():
            taus = [1.0, *sorted(r for r in ratios if math.isfinite(r)), top]
            ax.step(taus, [rho(ratios, t) for t in taus], where="post", label=name)
        ax.set_xscale("log")
        ax.set_xlim(1.0, top)
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel(f"tau: {measure} to target / the fastest group's")
        ax.set_ylabel("fraction of problems solved within tau")
        ax.set_title(f"Performance profile: {metric} to {number(target)}, in {measure}",
                     fontsize="medium")
        _legend(ax)
        paths.append(_save(fig, out_dir / f"performance_profile_{measure}.png"))
    return paths


def console_table(items: Sequence[TargetRow], keys: Sequence[str], title: str) -> Any:
    """The section's table for the terminal (a ``rich`` table)."""
    from rich.table import Table

    table = Table(title=title)
    for name in [*keys, "status", "reached", *MEASURES]:
        table.add_column(name, justify="left" if name in (*keys, "status") else "right")
    for item in items:
        table.add_row(*(label([k], [v]) for k, v in zip(keys, item.row.key, strict=True)),
                      item.row.status, f"{item.reached}/{item.row.n}",
                      *(cell(item, m) for m in MEASURES))
    return table


@dataclass
class TargetReport:
    """What :func:`time_to_target` made: report.md's lines, the files written, the terminal
    table."""

    lines: list[str]
    paths: list[Path]
    table: Any


def time_to_target(rows: Sequence[Row], keys: Sequence[str], target: str | None,
                   baseline: str | None, metric: str, out: Path, plots: bool) -> TargetReport:
    """Write target.csv (and the profiles) to ``out``: the report.md section and the files.
    The target is ``target`` (``METRIC=VALUE``) or, with ``baseline``, the value of ``metric``
    every run of that group reaches (:func:`target_from`)."""
    if baseline is not None:
        value = target_from(rows, keys, baseline, metric)
        source = f"the value every run of {baseline} reaches: the worst of their best values"
    else:
        assert target is not None
        metric, value = parse_target(target)
        source = "given"
    items = target_rows(rows, metric, value)
    write_csv(out / "target.csv", items, keys)
    figures = plot_profiles(items, keys, metric, value, out) if plots else []
    sign = "<=" if lower_is_better(metric) else ">="
    return TargetReport(markdown_section(items, keys, metric, value, source, figures),
                        [out / "target.csv", *figures],
                        console_table(items, keys, f"time to {metric} {sign} {number(value)} "
                                                   "(median, min-max)"))
