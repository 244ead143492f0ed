"""The AlgoPerf benchmark score of each group of runs (Dahl et al. 2023, "Benchmarking Neural
Network Training Algorithms", Sec. 4.5; the AlgoPerf rules and mlcommons/algorithmic-efficiency
``scoring/performance_profile.py``), built on :mod:`ngexp.report.target`'s time to target.

How ngexp's runs map onto AlgoPerf's terms:

- a *submission* is a report group (the ``--by`` keys, e.g. ``--by optimizer``);
- a *workload* is a run's data and model choices (:func:`ngexp.report.target.workload`, e.g.
  ``fashion_mnist/mlp``), wherever its folder: the paths given to the report are pooled;
- a *study* is a seed, and its *trials* are the submission's runs on the workload with that seed
  (the configurations of a tuning sweep each run with that seed; with one configuration per
  optimizer, a study of one trial).

With ``t`` the time to target (:func:`ngexp.report.target.first_hit`, ``inf`` when missed) in
one measure (seconds by default, as AlgoPerf; or steps, examples), for submission ``s`` on
workload ``w``::

    t(s, w, k) = min over the trials of study k of t       (the best trial)
    t(s, w)    = median over the studies k of t(s, w, k)   (inf when half or more missed)
    r(s, w)    = t(s, w) / min_s' t(s', w),   counted as inf when r > r_max = 4
    rho_s(tau) = |{w : r(s, w) <= tau}| / |W|
    score_s    = 1/(r_max - 1) * integral_1^r_max rho_s(tau) dtau
               = 1/|W| * sum over w with r <= r_max of (r_max - r(s, w)) / (r_max - 1)

so 1 is fastest on every workload and 0 never within 4x of the fastest (or never reaching the
target). The integral is exact (``rho`` is a step function); AlgoPerf's code applies the
trapezoid rule on a grid of ``tau``. ``|W|`` counts every workload any run covers: one a
submission has no run on counts as missed.

Targets are per workload, as AlgoPerf's: ``--target METRIC=VALUE`` is the same on every one;
``--target-from GROUP`` is, on each workload, the value every run of GROUP there reaches (the
worst of their best values, :func:`ngexp.report.target.target_from`).
"""

from __future__ import annotations

import csv
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ngexp.errors import UserError
from ngexp.metrics import lower_is_better
from ngexp.report.aggregate import Row, label, show
from ngexp.report.tables import number
from ngexp.report.target import (
    UNREACHED,
    TargetReport,
    TargetRow,
    best_times,
    first_hit,
    parse_target,
    ratio,
    show_time,
    target_from,
    workload,
)

#: AlgoPerf's cap on the ratio to the fastest submission: past it, a workload counts as missed.
R_MAX = 4.0
Workload = tuple[Any, Any]


def workload_name(name: Workload) -> str:
    """``fashion_mnist/mlp``."""
    return "/".join(map(show, name))


def workloads(rows: Sequence[Row]) -> list[Workload]:
    return sorted({workload(run) for row in rows for run in row.runs}, key=repr)


def workload_targets(rows: Sequence[Row], keys: Sequence[str], target: str | None,
                     baseline: str | None, metric: str) -> tuple[str, dict[Workload, float], str]:
    """The metric, each workload's target value and how it was set: ``target``
    (``METRIC=VALUE``) on every workload, or with ``baseline`` per workload the value of
    ``metric`` every run of that group on it reaches."""
    if baseline is None:
        assert target is not None
        metric, value = parse_target(target)
        return metric, dict.fromkeys(workloads(rows), value), "given, the same on every workload"
    target_from(rows, keys, baseline, metric)  # one line naming the groups when it is none
    targets = {}
    for name in workloads(rows):
        subset = [Row(row.key, row.status, runs) for row in rows
                  if (runs := [run for run in row.runs if workload(run) == name])]
        if baseline not in {label(keys, row.key) for row in subset if row.completed}:
            raise UserError(f"--target-from {baseline!r} has no completed run on workload "
                            f"{workload_name(name)}: --score needs its target on every workload")
        targets[name] = target_from(subset, keys, baseline, metric)
    return metric, targets, (f"per workload, the value every run of {baseline} on it reaches, "
                             "the worst of their best values")


def workload_times(items: Sequence[TargetRow], keys: Sequence[str],
                   measure: str) -> dict[str, dict[Workload, float]]:
    """Submission -> workload -> ``t(s, w)``: the median over its studies (seeds) of the best
    trial's time to target (``inf`` when half or more missed, or with no run there)."""
    names = workloads([item.row for item in items])
    times = {}
    for submission, studies in best_times(items, keys, measure).items():
        # a problem is (*workload, seed): one study of the submission on that workload
        per = {name: [t for problem, t in studies.items() if problem[:-1] == name]
               for name in names}
        times[submission] = {name: statistics.median(ts) if ts else UNREACHED
                             for name, ts in per.items()}
    return times


def capped(value: float) -> float:
    """A ratio past :data:`R_MAX` counts as never reached."""
    return value if value <= R_MAX else UNREACHED


def score(ratios: Sequence[float]) -> float:
    """``1/(R_MAX - 1) * integral_1^R_MAX rho(tau) dtau`` of the capped ratios, exactly: each
    ratio ``r <= R_MAX`` raises ``rho`` by ``1/n`` from ``tau = r`` on."""
    if not ratios:
        return 0.0
    return (sum(R_MAX - max(r, 1.0) for r in map(capped, ratios) if r != UNREACHED)
            / (len(ratios) * (R_MAX - 1)))


@dataclass
class Submission:
    """One group's times and ratios per workload, and its score."""

    name: str
    times: dict[Workload, float]
    ratios: dict[Workload, float]  # uncapped: t / the fastest submission's t

    @property
    def score(self) -> float:
        return score(list(self.ratios.values()))


def submissions(items: Sequence[TargetRow], keys: Sequence[str],
                measure: str) -> list[Submission]:
    """Every group, highest score first (ties in the report's order)."""
    times = workload_times(items, keys, measure)
    names = workloads([item.row for item in items])
    fastest = {name: min(group[name] for group in times.values()) for name in names}
    result = [Submission(submission, group, {name: ratio(group[name], fastest[name])
                                             for name in names})
              for submission, group in times.items()]
    return sorted(result, key=lambda s: -s.score)


def cell(item: Submission, name: Workload, measure: str) -> str:
    """``300 (r=1.50)``, ``900 (r=4.50 > 4)`` past the cap, or ``never``."""
    time, value = item.times[name], item.ratios[name]
    if time == UNREACHED:
        return "never"
    past = f" > {R_MAX:g}" if capped(value) == UNREACHED else ""
    return f"{show_time(time, measure)} (r={value:.2f}{past})"


def table(items: Sequence[Submission], names: Sequence[Workload],
          measure: str) -> tuple[list[str], list[list[str]]]:
    """The header and the rows of the score table."""
    head = ["submission", "score", *(f"{workload_name(n)} ({measure})" for n in names)]
    return head, [[s.name, f"{s.score:.4f}", *(cell(s, n, measure) for n in names)]
                  for s in items]


def write_csv(path: Path, items: Sequence[Submission], names: Sequence[Workload],
              measure: str) -> None:
    """One line per submission: its score and, per workload, ``t(s, w)`` and the uncapped
    ratio at full precision (``inf`` for never)."""
    with path.open("w", newline="", encoding="utf-8") as stream:
        writer = csv.writer(stream)
        writer.writerow(["submission", "score", *(f"{workload_name(n)}:{column}" for n in names
                                                 for column in (measure, "ratio"))])
        for s in items:
            writer.writerow([s.name, repr(s.score), *(repr(value) for n in names
                                                      for value in (s.times[n], s.ratios[n]))])


def algoperf_score(rows: Sequence[Row], keys: Sequence[str], target: str | None,
                   baseline: str | None, metric: str, measure: str, out: Path) -> TargetReport:
    """Write score.csv to ``out``; report.md's "AlgoPerf score" section and the terminal
    table."""
    from rich.table import Table

    metric, targets, source = workload_targets(rows, keys, target, baseline, metric)
    items = [TargetRow(row, [first_hit(run, metric, targets[workload(run)]) for run in row.runs])
             for row in rows]
    names = list(targets)
    ranked = submissions(items, keys, measure)
    write_csv(out / "score.csv", ranked, names, measure)
    head, cells = table(ranked, names, measure)
    sign = "<=" if lower_is_better(metric) else ">="
    goals = ", ".join(f"{workload_name(n)} `{metric} {sign} {number(v)}`"
                      for n, v in targets.items())
    lines = ["## AlgoPerf score", "",
             f"The benchmark score of Dahl et al. (2023), in {measure} to target. Targets "
             f"({source}): {goals}. Per workload (data/model), a submission's time is the "
             "median over its "
             "studies (seeds) of its best trial (the fastest of its runs with that seed), r its "
             f"ratio to the fastest submission's (r > {R_MAX:g} counts as never), and the score "
             f"1/{R_MAX - 1:g} of the integral of rho(tau) from 1 to {R_MAX:g}, rho(tau) the "
             "fraction of workloads with r <= tau: 1 when fastest on every workload, 0 when "
             f"never within {R_MAX:g}x.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head),
             *("| " + " | ".join(row) + " |" for row in cells)]
    console = Table(title=f"AlgoPerf score ({measure} to target)")
    for name in head:
        console.add_column(name, justify="left" if name == "submission" else "right")
    for row in cells:
        console.add_row(*row)
    return TargetReport(lines, [out / "score.csv"], console)
