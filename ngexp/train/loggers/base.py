"""Where a run's metrics and hyperparameters go: the interface every logger implements, and
``metrics.jsonl``, the run's own record that is always written.

A logger sees a run through three calls:

- ``start(run)`` when a training session starts (also on resume, with ``run.resumed_step``):
  register the hyperparameters (so failed and interrupted runs show them too) and, on resume,
  drop records after the checkpoint's step;
- ``log(step, epoch, time, metrics)`` for each record (``train/...``, ``test/...``, ``optim/...``:
  the same names for every logger);
- ``finish(status, reason)`` when the session ends: ``completed``, ``failed`` or
  ``interrupted``.

The config group ``logger`` is list-valued (``logger=[tensorboard,csv]``, the
lightning-hydra-template's convention); ``metrics.jsonl`` is not an option of it, since resume
and ``ngexp report`` read it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: A hyperparameter value as every logger can store it.
Scalar = int | float | str | bool


@dataclass(frozen=True)
class RunInfo:
    """What a logger knows of the run: its directory, names, hyperparameters and metrics."""

    run_dir: Path
    #: The run family (``<data>-<model>-<optimizer>``), e.g. an MLflow experiment or W&B project.
    name: str
    #: Unique within the family: ``<hash>/seed_<seed>``.
    run_id: str
    #: Runs of one configuration across seeds (``<name>/<hash>``).
    group: str
    output_root: Path
    hparams: dict[str, Scalar] = field(default_factory=dict)
    #: Tags of the metrics a hyperparameter study compares (``test/acc``, ``val/loss``, ...).
    metrics: tuple[str, ...] = ()
    #: The checkpoint's step when the session resumes a run, else ``None``.
    resumed_step: int | None = None
    #: The run's choices for people, seed left out: its command line's settings
    #: (``optimizer=kfac optimizer.lr=0.1``), or '' when it has none.
    label: str = ""


class Logger:
    """Base class; see the module docstring. ``close`` releases files even after an error."""

    def start(self, run: RunInfo) -> None: ...

    def log(self, step: int, epoch: float, time: float, metrics: Mapping[str, float]) -> None: ...

    def finish(self, status: str, reason: str | None) -> None: ...

    def close(self) -> None: ...


class MetricsFile(Logger):
    """``metrics.jsonl``: one JSON object per record, flushed as written (``step``, ``epoch``,
    ``time`` and the metrics)."""

    def __init__(self) -> None:
        self.stream: Any = None

    def start(self, run: RunInfo) -> None:
        self.stream = (run.run_dir / "metrics.jsonl").open("a", encoding="utf-8")

    def log(self, step: int, epoch: float, time: float, metrics: Mapping[str, float]) -> None:
        record = {"step": step, "epoch": round(epoch, 4), "time": round(time, 3), **metrics}
        self.stream.write(json.dumps(record) + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.stream is not None:
            self.stream.close()
            self.stream = None


def flat_hparams(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Scalar]:
    """``{"optimizer.lr": 0.03, ...}``: the leaves of a config tree as loggable scalars (lists
    as their text, ``None`` as ``"null"``)."""
    found: dict[str, Scalar] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            found.update(flat_hparams(value, f"{name}."))
        elif isinstance(value, (bool, int, float, str)):
            found[name] = value
        else:
            found[name] = "null" if value is None else json.dumps(value, default=str)
    return found
