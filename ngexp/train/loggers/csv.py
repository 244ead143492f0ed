"""CSV files a spreadsheet or pandas reads without ngexp: ``<run dir>/csv/``.

- ``metrics.csv``: one row per value, ``step,epoch,time,name,value`` (long format: new metric
  names need no new columns, and rows are appended and flushed as they come, so a crash loses
  nothing written);
- ``hparams.csv``: ``name,value`` of every hyperparameter, written when the run starts;
- ``status.csv``: ``status,reason`` of the last session's end.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ngexp.options import configurable
from ngexp.train.loggers.base import Logger, RunInfo

METRIC_COLUMNS = ("step", "epoch", "time", "name", "value")


@configurable("logger", "csv")
class CSVLogger(Logger):
    """See the module docstring; on resume, rows after the checkpoint's step are dropped."""

    def __init__(self) -> None:
        self.folder: Path | None = None
        self.stream: Any = None
        self.writer: Any = None

    def start(self, run: RunInfo) -> None:
        self.folder = run.run_dir / "csv"
        self.folder.mkdir(exist_ok=True)
        with (self.folder / "hparams.csv").open("w", newline="", encoding="utf-8") as stream:
            rows = csv.writer(stream)
            rows.writerow(("name", "value"))
            rows.writerows(run.hparams.items())
        path = self.folder / "metrics.csv"
        if run.resumed_step is not None and path.is_file():
            keep_rows_up_to(path, run.resumed_step)
        fresh = not path.is_file() or path.stat().st_size == 0
        self.stream = path.open("a", newline="", encoding="utf-8")
        self.writer = csv.writer(self.stream)
        if fresh:
            self.writer.writerow(METRIC_COLUMNS)

    def log(self, step: int, epoch: float, time: float, metrics: Mapping[str, float]) -> None:
        self.writer.writerows((step, round(epoch, 4), round(time, 3), name, value)
                              for name, value in metrics.items())
        self.stream.flush()

    def finish(self, status: str, reason: str | None) -> None:
        assert self.folder is not None
        with (self.folder / "status.csv").open("w", newline="", encoding="utf-8") as stream:
            csv.writer(stream).writerows((("status", "reason"), (status, reason or "")))

    def close(self) -> None:
        if self.stream is not None:
            self.stream.close()
            self.stream = None


def keep_rows_up_to(path: Path, last_step: int) -> None:
    """Rewrite ``metrics.csv`` with the whole rows whose step is at most ``last_step``."""
    with path.open(newline="", encoding="utf-8", errors="replace") as stream:
        rows = list(csv.reader(stream))
    kept = [rows[0]] if rows else [list(METRIC_COLUMNS)]
    for row in rows[1:]:
        if len(row) == len(METRIC_COLUMNS) and row[0].isdigit() and int(row[0]) <= last_step:
            kept.append(row)
    with path.open("w", newline="", encoding="utf-8") as stream:
        csv.writer(stream).writerows(kept)
