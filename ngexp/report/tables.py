"""Render report rows: a rich table for the terminal, Markdown and CSV files."""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Sequence
from pathlib import Path

from rich.table import Table

from ngexp.report.aggregate import Row, show

STYLES = {"failed": "red", "unreadable": "red", "stale": "yellow", "interrupted": "yellow",
          "unfinished": "yellow", "running": "cyan"}
#: Significant digits of a metric value in the table.
DIGITS = 4
#: Column of report.csv with the rows' run directories.
RUN_DIRS = "run_dirs_relative_to_csv"


def places(value: float, digits: int = DIGITS) -> int:
    """Decimals that show ``value`` with ``digits`` significant digits (none for an integer
    part that long already)."""
    if value == 0 or not math.isfinite(value):
        return 0
    return max(0, digits - 1 - math.floor(math.log10(abs(value))))


def number(value: float, decimals: int | None = None) -> str:
    """Fixed point, never an exponent: 4 significant digits (``0.8300``, ``245.3``, ``10440``,
    ``0.0001234``) or ``decimals`` places."""
    if not math.isfinite(value):
        return str(value)
    return f"{value:.{places(value) if decimals is None else decimals}f}"


def duration(seconds: float | None) -> str:
    """``3.7s``, ``42s``, ``1m 23s``, ``2h 05m``, ``3d 04h``."""
    if seconds is None:
        return "-"
    if seconds < 9.95:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    if days:
        return f"{days}d {hours:02d}h"
    if hours:
        return f"{hours}h {minutes:02d}m"
    return f"{minutes}m {secs:02d}s" if minutes else f"{secs}s"


def value_cell(row: Row) -> str:
    """The row's :func:`mean_std_cell`."""
    return mean_std_cell(row.mean, row.std)


def mean_std_cell(mean: float | None, std: float | None) -> str:
    """``mean ± std`` (the std to the mean's decimals, or to its first significant digit up to
    2 places more); a single value (``std`` ``None``) alone; ``-`` without a value."""
    if mean is None:
        return "-"
    if std is None:
        return number(mean)
    decimals = places(mean)
    std_decimals = min(max(decimals, places(std, 1)), decimals + 2)
    return f"{number(mean, decimals)} ± {number(std, std_decimals)}"


def count_cell(row: Row) -> str:
    """Runs in the row, as ``k/n`` when only k of them logged the metric."""
    return str(row.n) if len(row.values) == row.n else f"{len(row.values)}/{row.n}"


def headers(keys: Sequence[str], metric: str, best: bool) -> list[str]:
    return [*keys, f"{metric} ({'best' if best else 'final'})", "n", "seeds", "wall time",
            "status"]


def cells(row: Row) -> list[str]:
    return [*map(show, row.key), value_cell(row), count_cell(row),
            ",".join(map(str, row.seeds)) or "-", duration(row.wall_time), row.status]


def console_table(rows: Sequence[Row], keys: Sequence[str], metric: str, best: bool,
                  caption: str) -> Table:
    table = Table(title=f"ngexp report: {metric}", caption=caption)
    names = headers(keys, metric, best)
    for name in names[:-1]:
        table.add_column(name, justify="right" if name in ("n", "wall time") else "left",
                         no_wrap=name not in keys)
    table.add_column(names[-1], overflow="fold")
    for row in rows:
        style = STYLES.get(row.status.split("(")[0])
        table.add_row(*cells(row), style=style)
    return table


def markdown(rows: Sequence[Row], keys: Sequence[str], metric: str, best: bool,
             intro: Sequence[str], plots: Sequence[Path], extra: Sequence[str] = ()) -> str:
    """report.md: ``intro``, the table, the figures of ``metric`` and the ``extra`` lines (the
    dynamics section)."""

    def line(items: Sequence[str]) -> str:
        return "| " + " | ".join(item.replace("|", "\\|") for item in items) + " |"

    names = headers(keys, metric, best)
    lines = ["# ngexp report", "", *intro, "", line(names), line(["---"] * len(names))]
    lines += [line(cells(row)) for row in rows]
    if plots:
        lines += ["", "## Plots", ""]
        lines += [f"![{plot.stem}]({plot.name})" for plot in plots]
    lines += extra
    return "\n".join(lines) + "\n"


def write_csv(path: Path, rows: Sequence[Row], keys: Sequence[str], metric: str) -> None:
    """One line per row, full precision; ``std`` is empty for a single value; the run
    directories ``;``-separated, relative to the CSV's folder (valid as long as the report
    folder moves together with the runs)."""
    folder = path.parent.resolve()
    with path.open("w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow([*keys, "status", "n", "n_metric", "seeds", f"{metric}_mean",
                         f"{metric}_std", "wall_time_s", RUN_DIRS])
        for row in rows:
            writer.writerow([*map(show, row.key), row.status, row.n, len(row.values),
                             " ".join(map(str, row.seeds)), _raw(row.mean), _raw(row.std),
                             _raw(row.wall_time),
                             ";".join(os.path.relpath(run.path, folder) for run in row.runs)])


def _raw(value: float | None) -> str:
    return "" if value is None else repr(value)
