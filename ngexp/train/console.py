"""Where metrics go: ``metrics.jsonl``, TensorBoard events and the console."""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table


class MetricsLogger:
    """Appends one JSON object per record to ``metrics.jsonl`` (flushed) and mirrors every
    numeric key to TensorBoard under its ``train/``, ``test/``, ``optim/``... name."""

    def __init__(self, run_dir: Path, purge_step: int | None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.stream = (run_dir / "metrics.jsonl").open("a")
        self.writer = SummaryWriter(str(run_dir / "tb"), purge_step=purge_step)

    def log(self, step: int, epoch: float, time: float, metrics: Mapping[str, float]) -> None:
        record = {"step": step, "epoch": round(epoch, 4), "time": round(time, 3), **metrics}
        self.stream.write(json.dumps(record) + "\n")
        self.stream.flush()
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)

    def log_hparams(self, hparams: Mapping[str, Any], final: Mapping[str, float]) -> None:
        """Record the run's settings and final metrics for TensorBoard's HParams tab."""
        self.writer.add_hparams(dict(hparams), {f"hparam/{k}": v for k, v in final.items()},
                                run_name=".")

    def close(self) -> None:
        self.stream.close()
        self.writer.close()


class ConsoleProgress:
    """A rich progress bar on a terminal; plain periodic lines otherwise (``mode='plain'``)."""

    def __init__(self, console: Console, mode: str, total_steps: int, start_step: int) -> None:
        if mode == "auto":
            mode = "rich" if sys.stdout.isatty() else "plain"
        self.console, self.mode = console, mode
        self.progress: Progress | None = None
        if mode == "rich":
            self.progress = Progress(TextColumn("[bold]epoch {task.fields[epoch]}"), BarColumn(),
                                     MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                                     TimeRemainingColumn(), console=console, transient=True)
            self.task = self.progress.add_task("train", total=total_steps, completed=start_step,
                                               epoch=0, info="")
            self.progress.start()

    def update(self, step: int, epoch: int, metrics: Mapping[str, float]) -> None:
        info = "  ".join(f"{key.split('/')[-1]} {value:.4g}" for key, value in metrics.items()
                         if key.startswith(("train/loss", "train/acc", "test/", "val/"))
                         or key == "train/examples_per_s")
        if self.progress is not None:
            self.progress.update(self.task, completed=step, epoch=epoch, info=info)
        elif self.mode == "plain":
            self.console.print(f"epoch {epoch} step {step}  {info}", highlight=False)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()


def summary_table(title: str, rows: Mapping[str, Any]) -> Table:
    table = Table(title=title, show_header=False)
    for key, value in rows.items():
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    return table
