"""Training dynamics: the ``dynamics/...`` metrics of the instrument callbacks
(:mod:`ngexp.instruments.callbacks`) against the optimizer step.

For every selected quantity the report draws one figure against step (one line or band per
group, :func:`ngexp.report.plots.plot_dynamics`) and tabulates, per group of completed runs, its
value at the first and at the last step it was logged: mean ± sample std (ddof=1) over the runs.
A quantity logged twice at one step in a run (a run resumed after a crash re-logs the steps
after its checkpoint) counts with its last value (:func:`~ngexp.report.aggregate.series`).

Selection (``--dynamics``): ``all`` quantities, only the whole-model ones (``model``: names
``dynamics/<instrument>/<quantity>``, no per-layer ``dynamics/<instrument>/<layer>/...``), or
``none``.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from ngexp.report.aggregate import Row, mean_std, series, show
from ngexp.report.tables import mean_std_cell

PREFIX = "dynamics/"
SELECTIONS = ("all", "model", "none")
#: Folder of the dynamics figures inside the report folder.
FOLDER = "dynamics"


def select(metrics: Sequence[str], selection: str) -> list[str]:
    """The ``dynamics/`` metrics of ``metrics`` that ``selection`` (:data:`SELECTIONS`) keeps."""
    found = [m for m in metrics if m.startswith(PREFIX)]
    if selection == "none":
        return []
    return found if selection == "all" else [m for m in found if whole_model(m)]


def whole_model(metric: str) -> bool:
    """``dynamics/<instrument>/<quantity>``, not a per-layer quantity."""
    return metric.count("/") == 2


@dataclass
class Endpoint:
    """Mean and sample std over runs of a quantity at its first or last logged step (``steps``:
    the distinct steps those were, one for runs measured alike)."""

    steps: list[int]
    mean: float
    std: float | None

    def cell(self) -> str:
        """``0.4321 ± 0.0012 (step 936)``; ``steps 930-936`` when the runs differ."""
        where = (f"step {self.steps[0]}" if len(self.steps) == 1
                 else f"steps {self.steps[0]}-{self.steps[-1]}")
        return f"{mean_std_cell(self.mean, self.std)} ({where})"


@dataclass
class Summary:
    """One quantity in one group of completed runs: first and last logged value, ``n`` runs."""

    metric: str
    key: tuple[object, ...]
    first: Endpoint
    last: Endpoint
    n: int


def summarize(rows: Sequence[Row], metrics: Sequence[str]) -> list[Summary]:
    """A :class:`Summary` per quantity and completed row whose runs logged it."""
    found = []
    for metric in metrics:
        for row in (r for r in rows if r.completed):
            curves = [c for c in (series(run, metric, "step") for run in row.runs) if len(c[0])]
            if not curves:
                continue
            ends = []
            for index in (0, -1):
                mean, std = mean_std([float(y[index]) for _, y in curves])
                assert mean is not None
                ends.append(Endpoint(sorted({int(x[index]) for x, _ in curves}), mean, std))
            found.append(Summary(metric, row.key, ends[0], ends[1], len(curves)))
    return found


def markdown_section(summaries: Sequence[Summary], keys: Sequence[str],
                     figures: Mapping[str, Path]) -> list[str]:
    """The report's ``## Dynamics`` lines: a table of the summaries (each quantity linking its
    figure, ``figures``: metric -> path) and the figures of the whole-model quantities
    inline."""
    if not summaries:
        return []
    names = ["quantity", *keys, "first", "last", "n"]
    lines = ["", "## Dynamics", "",
             "Each `dynamics/` quantity at the first and the last step it was logged, mean ± "
             "sample std (ddof=1) over the completed runs of a group; its figure against step "
             f"in `{FOLDER}/`.", "",
             "| " + " | ".join(names) + " |", "|" + " --- |" * len(names)]
    for summary in summaries:
        figure = figures.get(summary.metric)
        quantity = (f"[`{summary.metric}`]({FOLDER}/{figure.name})" if figure is not None
                    else f"`{summary.metric}`")
        cells = [quantity, *map(show, summary.key), summary.first.cell(), summary.last.cell(),
                 str(summary.n)]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    inline = [path for metric, path in figures.items() if whole_model(metric)]
    if inline:
        lines += [""] + [f"![{path.stem}]({FOLDER}/{path.name})" for path in inline]
    return lines


def write_csv(path: Path, summaries: Sequence[Summary], keys: Sequence[str]) -> None:
    """``dynamics.csv``: one line per summary, full precision (steps ``;``-separated)."""
    with path.open("w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["quantity", *keys, "n", "first_steps", "first_mean", "first_std",
                         "last_steps", "last_mean", "last_std"])
        for s in summaries:
            writer.writerow([s.metric, *map(show, s.key), s.n,
                             ";".join(map(str, s.first.steps)), repr(s.first.mean),
                             "" if s.first.std is None else repr(s.first.std),
                             ";".join(map(str, s.last.steps)), repr(s.last.mean),
                             "" if s.last.std is None else repr(s.last.std)])
