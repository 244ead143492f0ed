"""What a run shows on the console: a progress bar on a terminal, plain lines otherwise, and the
summary at the end -- every number labelled with its split and formatted for people.

- ``trainer.progress=rich``: a bar that advances every step (a host-side count, no device
  sync) and shows the latest ``train/`` and evaluation metrics, kept on screen at the end;
- ``plain`` (the default when the output is not a terminal): one line per training record and
  one per evaluation, ``step 200/1000  epoch 1.00  train/loss 0.5734  train/acc 0.8125
  train/examples_per_s 10.4k``;
- ``none``: no progress and no summary box (``summary.json`` and ``train.log`` have it).
"""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Mapping
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

log = logging.getLogger("ngexp")

#: Metrics shown while training, in this order (others of these prefixes follow).
SHOWN_PREFIXES = ("train/loss", "train/acc", "train/bpc", "train/mse", "val/", "test/")


def format_number(value: float, key: str = "") -> str:
    """A metric for people: throughput as ``10.4k``/``1.20M``, counts whole, everything else
    with 4 significant digits and no exponent (``0.8175``, ``245.3``, ``0.0001234``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if not math.isfinite(value):
        return str(value)
    if key.endswith("examples_per_s"):
        for size, suffix in ((1e6, "M"), (1e3, "k")):
            if abs(value) >= size:
                return f"{value / size:.3g}{suffix}"
        return f"{value:.3g}"
    if isinstance(value, int) or (value == int(value) and abs(value) >= 1e4):
        return f"{int(value):,}"
    if value == 0:
        return "0"
    digits = max(0, 3 - math.floor(math.log10(abs(value))))
    return f"{value:.{digits}f}"


def format_duration(seconds: float) -> str:
    """``4.2s``, ``1m 23s``, ``2h 05m``."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes}m {secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m"


def metrics_line(metrics: Mapping[str, float]) -> str:
    """``train/loss 0.5734  test/acc 0.8175 ...``: the shown metrics with their names."""
    shown = [key for prefix in SHOWN_PREFIXES for key in metrics if key.startswith(prefix)]
    shown = list(dict.fromkeys(shown))
    if "train/examples_per_s" in metrics:
        shown.append("train/examples_per_s")
    return "  ".join(f"{key} {format_number(metrics[key], key)}" for key in shown)


class ConsoleProgress:
    """The progress display of a run; see the module docstring."""

    def __init__(self, console: Console, mode: str, total_steps: int, start_step: int,
                 steps_per_epoch: int) -> None:
        if mode == "auto":
            mode = "rich" if sys.stdout.isatty() else "plain"
        self.console, self.mode, self.total_steps = console, mode, total_steps
        self.steps_per_epoch = steps_per_epoch
        self.train_info = self.eval_info = ""
        self.progress: Progress | None = None
        if mode == "rich":
            self.progress = Progress(TextColumn("epoch {task.fields[epoch]}"), BarColumn(),
                                     MofNCompleteColumn(), TimeElapsedColumn(),
                                     TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                                     console=console, transient=False)
            self.task = self.progress.add_task("train", total=total_steps, completed=start_step,
                                               epoch=self._epoch(start_step), info="")
            self.progress.start()

    def _epoch(self, step: int) -> str:
        return f"{step / self.steps_per_epoch:.2f}"

    def advance(self, step: int) -> None:
        """Move the bar to ``step`` (every training step; no device sync)."""
        if self.progress is not None:
            self.progress.update(self.task, completed=step, epoch=self._epoch(step))

    def update(self, step: int, metrics: Mapping[str, float]) -> None:
        """Show a record of ``metrics`` logged at ``step``."""
        info = metrics_line(metrics)
        if any(key.startswith("train/") for key in metrics):
            self.train_info = info
        else:
            self.eval_info = info
        line = f"step {step}/{self.total_steps}  epoch {self._epoch(step)}  {info}"
        log.info(line)  # the run's train.log gets every record, whatever the display
        if self.progress is not None:
            self.progress.update(self.task, completed=step, epoch=self._epoch(step),
                                 info="  ".join(p for p in (self.train_info, self.eval_info)
                                                if p))
        elif self.mode == "plain" and info:
            self.console.print(line, highlight=False)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()


def summary_table(rows: Mapping[str, Any]) -> Table:
    table = Table(title="summary", show_header=False)
    for key, value in rows.items():
        table.add_row(key, format_number(value, key) if isinstance(value, float) else str(value))
    return table
