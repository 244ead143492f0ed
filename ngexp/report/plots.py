"""PNG figures (matplotlib, Agg backend, imported only when plotting).

- ``<metric>_vs_{epoch,step,time}.png``: one line per group of completed runs, the mean over its
  seeds with a ± 1 sample-std band (seeds matched by step, e.g. for wall-clock time, else
  interpolated onto a common grid: :func:`ngexp.report.aggregate.band`); runs in other states
  dashed, one line each; runs with nothing to draw (e.g. failed before their first record) are
  legend entries of their own (a cross, no line). The y axis is logarithmic when the positive
  values plotted span more than :data:`LOG_DECADES` decades.
- Legends sit outside the axes (right, or below when long) and label the lines by the report
  keys that differ among them; the keys equal for every line go into the title once.
- ``<metric>_vs_sparsity.png`` (pruning runs only): metric against final sparsity, one line per
  pruning criterion, error bars ± 1 sample std over seeds.
- ``dynamics/<quantity>_vs_step.png``: each selected ``dynamics/`` quantity of the instrument
  callbacks against step, drawn like the metric-vs-step figure (:mod:`ngexp.report.dynamics`).
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ngexp.report.aggregate import Row, band, label, pruning_curves, series, show
from ngexp.report.dynamics import FOLDER

LOG_DECADES = 1.5
MAX_LEGEND = 30
X_LABELS = {"epoch": "epoch", "step": "optimizer step", "time": "wall-clock training time"}
#: Units of metric leaves other than accuracies and losses.
UNITS = {"seconds": "s", "prune_seconds": "s", "dead_flops": "FLOPs per example"}


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_all(rows: Sequence[Row], keys: Sequence[str], metric: str, best: bool,
             out_dir: Path) -> list[Path]:
    """Write every figure of ``metric`` that has data; returns their paths."""
    plt = _pyplot()
    colors = _colors(plt, rows)
    paths = [_curves(plt, rows, keys, metric, axis, colors, out_dir) for axis in X_LABELS]
    paths.append(_sparsity(plt, rows, keys, metric, best, out_dir))
    return [path for path in paths if path is not None]


def plot_dynamics(rows: Sequence[Row], keys: Sequence[str], metrics: Sequence[str],
                  out_dir: Path) -> dict[str, Path]:
    """One figure against step per metric of ``metrics`` that has data, in ``out_dir /
    dynamics``; metric -> path."""
    if not metrics:
        return {}
    plt = _pyplot()
    colors = _colors(plt, rows)
    folder = out_dir / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    drawn = {metric: _curves(plt, rows, keys, metric, "step", colors, folder)
             for metric in metrics}
    return {metric: path for metric, path in drawn.items() if path is not None}


def slug(metric: str) -> str:
    return metric.replace("/", "-")


def y_label(metric: str, values: np.ndarray) -> str:
    """The metric with its unit: accuracies as a fraction (or %), losses in nats per term."""
    leaf = metric.split("/")[-1]
    if leaf == "acc":
        return f"{metric} ({'fraction correct' if values.max(initial=0) <= 1 else '%'})"
    if leaf == "loss":
        return f"{metric} (nats)"
    return f"{metric} ({UNITS[leaf]})" if leaf in UNITS else metric


def _colors(plt: Any, rows: Sequence[Row]) -> dict[tuple[Any, ...], Any]:
    """One color per group key (a failed seed gets its group's color)."""
    keys = list(dict.fromkeys(row.key for row in rows))
    cmap = plt.get_cmap("tab10" if len(keys) <= 10 else "tab20")
    return {key: cmap(i % cmap.N) for i, key in enumerate(keys)}


def _time_unit(rows: Sequence[Row]) -> tuple[float, str]:
    longest = max((run.wall_time or 0.0 for row in rows for run in row.runs), default=0.0)
    if longest <= 300:
        return 1.0, "s"
    return (60.0, "min") if longest <= 3 * 3600 else (3600.0, "h")


def varying_keys(keys: Sequence[str], row_keys: Sequence[tuple[Any, ...]]
                 ) -> tuple[list[int], str]:
    """Indices of ``keys`` whose values differ among ``row_keys`` (all when none does), and
    ``k=v, ...`` of the others, shared by every line."""
    varying = [i for i in range(len(keys)) if len({key[i] for key in row_keys}) > 1]
    varying = varying or list(range(len(keys)))
    shared = [i for i in range(len(keys)) if i not in varying]
    return varying, ", ".join(f"{keys[i]}={show(row_keys[0][i])}" for i in shared)


def _curves(plt: Any, rows: Sequence[Row], keys: Sequence[str], metric: str, axis: str,
            colors: dict[tuple[Any, ...], Any], out_dir: Path) -> Path | None:
    scale, unit = _time_unit(rows) if axis == "time" else (1.0, "")
    fig, ax = plt.subplots(figsize=(7.5, 4.5), layout="constrained")
    plotted: list[np.ndarray] = []
    drawn = [row for row in rows if any(len(series(run, metric, axis)[0]) for run in row.runs)]
    shown, shared = varying_keys(keys, [row.key for row in drawn or rows])
    missing = [(row, run) for row in rows for run in row.runs
               if not len(series(run, metric, axis)[0])]
    for row in drawn:
        logged = [(run, c) for run in row.runs if len((c := series(run, metric, axis))[0])]
        curves = [curve for _, curve in logged]
        steps = [series(run, metric, "step")[0] for run, _ in logged]
        name = label([keys[i] for i in shown], tuple(row.key[i] for i in shown)) if keys \
            else "all runs"
        color = colors[row.key]
        summary = band(curves, steps=steps) if row.completed else None
        if summary is not None:
            grid, mean, std = summary
            ax.plot(grid / scale, mean, color=color, lw=1.8, label=f"{name} (n={len(curves)})")
            if std is not None:
                ax.fill_between(grid / scale, mean - std, mean + std, color=color, alpha=0.2,
                                lw=0)
            plotted.append(mean)
            continue
        for i, (run, (x, y)) in enumerate(logged):  # one line per run
            text = name if row.completed else f"{name}, seed {run.seed}: {run.status}"
            ax.plot(x / scale, y, color=color, lw=1.0, ls="-" if row.completed else "--",
                    marker="o" if len(x) == 1 else None, label=None if i else text)
            plotted.append(y)
    if not plotted:
        plt.close(fig)
        return None
    values = np.concatenate(plotted)
    if (values > 0).all() and np.log10(values.max() / values.min()) > LOG_DECADES:
        ax.set_yscale("log")
    ax.set_xlabel(X_LABELS[axis] + (f" ({unit})" if unit else ""))
    ax.set_ylabel(y_label(metric, values))
    ax.set_title(f"{metric} vs {X_LABELS[axis]}: mean ± 1 std over seeds"
                 + (f"\n{shared}" if shared else ""), fontsize="medium")
    for row, run in missing:  # said in the legend, drawn nowhere
        name = label([keys[i] for i in shown], tuple(row.key[i] for i in shown)) if keys \
            else "all runs"
        seed = f", seed {run.seed}" if run.seed is not None else ""
        ax.plot([], [], color=colors[row.key], ls="none", marker="x",
                label=f"{name}{seed}: {run.status}, no {metric} to draw")
    _legend(ax)
    return _save(fig, out_dir / f"{slug(metric)}_vs_{axis}.png")


def _sparsity(plt: Any, rows: Sequence[Row], keys: Sequence[str], metric: str, best: bool,
              out_dir: Path) -> Path | None:
    curves = pruning_curves(rows, keys, metric, best)
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(7.5, 4.5), layout="constrained")
    for name, points in curves.items():
        ax.errorbar([p.sparsity for p in points], [p.mean for p in points],
                    yerr=[p.std or 0.0 for p in points], marker="o", capsize=3, label=name)
    ax.set_xlabel("sparsity (pruned fraction of the weights in pruning scope)")
    ax.set_ylabel(y_label(metric, np.array([p.mean for ps in curves.values() for p in ps])))
    ax.set_title(f"{metric} ({'best' if best else 'final'}) vs sparsity per pruning criterion")
    _legend(ax)
    return _save(fig, out_dir / f"{slug(metric)}_vs_sparsity.png")


def _legend(ax: Any) -> None:
    """Outside the axes: right of them up to 12 entries of up to 40 characters (the figure
    widens to hold it); else below up to :data:`MAX_LEGEND` (in two columns for labels up to
    60 characters; the figure grows to hold it); beyond that a note only."""
    labels = ax.get_legend_handles_labels()[1]
    figure = ax.figure
    width, height = figure.get_size_inches()
    if len(labels) > MAX_LEGEND:
        _note(figure, f"{len(labels)} lines: legend left out, see report.md")
    elif len(labels) > 12 or (labels and max(map(len, labels)) > 40):
        columns = 2 if max(map(len, labels)) <= 60 else 1
        figure.set_size_inches(width, height + 0.16 * math.ceil(len(labels) / columns))
        figure.legend(fontsize="x-small", loc="outside lower center", ncols=columns)
    elif labels:
        figure.set_size_inches(width + 0.3 + 0.075 * max(map(len, labels)), height)
        figure.legend(fontsize="small", loc="outside right upper")
    ax.grid(alpha=0.3)


def _note(figure: Any, text: str) -> None:
    """A line of small text under the axes (wrapped; the figure grows to hold it)."""
    lines = textwrap.wrap(text, 120)
    width, height = figure.get_size_inches()
    figure.set_size_inches(width, height + 0.16 * len(lines))
    figure.supxlabel("\n".join(lines), fontsize="x-small", ha="left", x=0.01)


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
