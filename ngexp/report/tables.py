"""Render report rows: a rich table for the terminal, Markdown and CSV files."""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path

from rich.table import Table

from ngexp.report.aggregate import Row, show

STYLES = {"failed": "red", "stale": "yellow", "interrupted": "yellow", "unfinished": "yellow",
          "running": "cyan"}


def number(value: float, like: float | None = None) -> str:
    """4 decimals, or 4 significant digits in exponent form for very small or large values;
    ``like`` picks the form by another value (a std is written in its mean's form)."""
    scale = value if like is None else like
    if not math.isfinite(value):
        return str(value)
    if math.isfinite(scale) and scale != 0 and not 1e-3 <= abs(scale) < 1e4:
        return f"{value:.3e}"
    return f"{value:.4f}"


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.1f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.2f} h"


def value_cell(row: Row) -> str:
    """``mean ± std``; a single value alone; ``-`` when no run logged the metric."""
    if row.mean is None:
        return "-"
    return number(row.mean) + (f" ± {number(row.std, row.mean)}" if row.std is not None else "")


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
             intro: Sequence[str], plots: Sequence[Path]) -> str:
    def line(items: Sequence[str]) -> str:
        return "| " + " | ".join(item.replace("|", "\\|") for item in items) + " |"

    names = headers(keys, metric, best)
    lines = ["# ngexp report", "", *intro, "", line(names), line(["---"] * len(names))]
    lines += [line(cells(row)) for row in rows]
    if plots:
        lines += ["", "## Plots", ""]
        lines += [f"![{plot.stem}]({plot.name})" for plot in plots]
    return "\n".join(lines) + "\n"


def write_csv(path: Path, rows: Sequence[Row], keys: Sequence[str], metric: str) -> None:
    """One line per row, full precision; ``std`` is empty for a single value."""
    with path.open("w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow([*keys, "status", "n", "n_metric", "seeds", f"{metric}_mean",
                         f"{metric}_std", "wall_time_s", "run_dirs"])
        for row in rows:
            writer.writerow([*map(show, row.key), row.status, row.n, len(row.values),
                             " ".join(map(str, row.seeds)), _raw(row.mean), _raw(row.std),
                             _raw(row.wall_time),
                             ";".join(_relative(run.path) for run in row.runs)])


def _relative(path: Path) -> str:
    """``path`` relative to the working directory when inside it (portable results)."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _raw(value: float | None) -> str:
    return "" if value is None else repr(value)
