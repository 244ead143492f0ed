"""Newline-delimited JSON events: ``logger=[ndjson]`` writes ``<run dir>/events.ndjson``.

One JSON object per line, appended and flushed as it comes (a crash loses nothing written)::

    {"event": "start", "run_id": "<hash>/seed_0", "name": ..., "resumed_step": null,
     "hparams": {"optimizer.lr": 0.03, ...}}
    {"event": "metrics", "step": 50, "epoch": 0.53, "time": 1.2, "metrics": {"train/loss": ...}}
    {"event": "finish", "status": "completed", "reason": null}

Non-finite metric values are written as ``null`` (JSON has no NaN). A resumed session (the
``start`` of a run with ``resumed_step``) first drops the ``metrics`` events after that step,
which the resumed run logs again, so the file holds each step once.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ngexp.options import configurable
from ngexp.train.loggers.base import Logger, RunInfo


def finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def keep_events_up_to(path: Path, step: int) -> None:
    """Rewrite ``path`` without the ``metrics`` events after ``step`` (and without a torn last
    line of a crashed writer); atomically, by a rename."""
    kept = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            continue
        if event.get("event") != "metrics" or event.get("step", 0) <= step:
            kept.append(line + "\n")
    partial = path.with_suffix(".ndjson.partial")
    partial.write_text("".join(kept), encoding="utf-8")
    os.replace(partial, path)


@configurable("logger", "ndjson")
class NDJSONLogger(Logger):
    """See the module docstring."""

    def __init__(self, filename: str = "events.ndjson") -> None:
        self.filename = filename
        self.stream: Any = None

    def start(self, run: RunInfo) -> None:
        path = run.run_dir / self.filename
        if run.resumed_step is not None and path.is_file():
            keep_events_up_to(path, run.resumed_step)
        self.stream = path.open("a", encoding="utf-8")
        self.write({"event": "start", "run_id": run.run_id, "name": run.name,
                    "resumed_step": run.resumed_step, "hparams": run.hparams})

    def log(self, step: int, epoch: float, time: float, metrics: Mapping[str, float]) -> None:
        self.write({"event": "metrics", "step": step, "epoch": round(epoch, 4),
                    "time": round(time, 3),
                    "metrics": {key: finite_or_none(float(value))
                                for key, value in metrics.items()}})

    def finish(self, status: str, reason: str | None) -> None:
        self.write({"event": "finish", "status": status, "reason": reason})

    def write(self, event: dict[str, Any]) -> None:
        self.stream.write(json.dumps(event, allow_nan=False) + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.stream is not None:
            self.stream.close()
            self.stream = None
