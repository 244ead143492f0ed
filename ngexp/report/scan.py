"""Find run directories under the given paths and load each one exactly once.

A run directory holds ``summary.json`` and/or ``metrics.jsonl`` (plus ``config.yaml``); a Hydra
sweep job directory holds ``run_dir.txt``, a pointer to its run directory. Runs are reported
whatever their state: completed, failed, interrupted, running, stale (``running`` but no file
written for :data:`STALE_AFTER_S` seconds: the process most likely died) or unfinished (no
summary at all).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ngexp.errors import UserError

RUN_FILES = ("summary.json", "metrics.jsonl")
POINTER = "run_dir.txt"
STALE_AFTER_S = 30 * 60

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@dataclass
class Run:
    """One run directory: flattened config, summary (``{}`` if absent), metric records."""

    path: Path
    config: dict[str, Any]  # dotted key -> value, e.g. {"optimizer.lr": 0.1}
    summary: dict[str, Any]
    records: list[dict[str, Any]]  # metrics.jsonl lines in order
    state: str  # completed | failed | interrupted | running | stale | unfinished
    detail: str | None  # failure reason, "step 812/1410", ...

    @property
    def status(self) -> str:
        """Display form, e.g. ``failed(nan at step 812)``."""
        return f"{self.state}({self.detail})" if self.detail else self.state

    @property
    def completed(self) -> bool:
        return self.state == "completed"

    @property
    def seed(self) -> int | None:
        seed = self.summary.get("seed", self.config.get("seed"))
        return int(seed) if seed is not None else None

    @property
    def choices(self) -> dict[str, Any]:
        return self.summary.get("choices") or {}

    @property
    def wall_time(self) -> float | None:
        """Training seconds (summed over resumes): the later of summary.json's ``wall_time``
        (written at the start and the end) and the last record's ``time``."""
        times = [float(t) for t in (self.summary.get("wall_time"),
                                    self.records[-1].get("time") if self.records else None)
                 if t is not None]
        return max(times, default=None)

    @property
    def last_step(self) -> int | None:
        if self.records and "step" in self.records[-1]:
            return int(self.records[-1]["step"])
        return self.summary.get("step")


def find_run_dirs(paths: Iterable[str | Path]) -> list[Path]:
    """Run directories under ``paths`` (recursively, following ``run_dir.txt``), deduplicated.

    Raises :class:`UserError` for a path that does not exist or holds no run directory.
    """
    found: dict[Path, None] = {}
    for path in map(Path, paths):
        if not path.exists():
            raise UserError(f"no such file or directory: {path}")
        here = list(_runs_under(path))
        if not here:
            raise UserError(f"no run directories (summary.json, metrics.jsonl or {POINTER}) "
                            f"under {path}")
        found.update(dict.fromkeys(here))
    return list(found)


def _runs_under(path: Path) -> Iterator[Path]:
    if path.is_file():
        if path.name == POINTER:
            yield from _follow(path)
        elif path.name in (*RUN_FILES, "config.yaml"):
            yield path.parent.resolve()
        return
    for dirpath, dirnames, filenames in os.walk(path):
        if any(name in filenames for name in RUN_FILES):
            dirnames.clear()  # tb/, checkpoints/: nothing more to find inside a run
            yield Path(dirpath).resolve()
            continue
        if POINTER in filenames:
            yield from _follow(Path(dirpath) / POINTER)
        dirnames[:] = sorted(name for name in dirnames if not name.startswith("."))


def _follow(pointer: Path) -> Iterator[Path]:
    target = Path(pointer.read_text().strip())
    if not target.is_absolute():
        target = pointer.parent / target
    if target.is_dir():
        yield target.resolve()
    else:  # the job died before creating its run directory, or the runs were moved
        print(f"ngexp report: warning: {pointer} points to missing {target}", file=sys.stderr)


def load_run(path: Path, now: float | None = None) -> Run:
    """Read ``config.yaml``, ``summary.json`` and ``metrics.jsonl`` (each once) of one run."""
    summary, unreadable = _read_summary(path / "summary.json")
    config = _read_config(path / "config.yaml")
    records = list(_read_records(path / "metrics.jsonl"))
    mtimes = [p.stat().st_mtime for p in (path / "summary.json", path / "metrics.jsonl")
              if p.is_file()]
    idle = (time.time() if now is None else now) - max(mtimes, default=0.0)
    run = Run(path, config, summary, records, "unfinished", None)
    run.state, run.detail = _state(run, idle, unreadable)
    return run


def _state(run: Run, idle_s: float, unreadable: bool) -> tuple[str, str | None]:
    summary = run.summary
    step = run.last_step
    progress = None if step is None else (
        f"step {step}/{summary['total_steps']}" if summary.get("total_steps") else f"step {step}")
    if not summary:
        reason = "unreadable summary.json" if unreadable else "no summary.json"
        return "unfinished", f"{reason}, {progress}" if progress else reason
    state = str(summary.get("status", "unfinished"))
    if state == "running" and idle_s > STALE_AFTER_S:
        return "stale", f"{progress or 'no step'}, no update for {_duration(idle_s)}"
    if state in ("running", "unfinished"):
        return state, progress
    reason = summary.get("reason")
    if state == "interrupted" and progress:
        reason = f"{reason}, {progress}" if reason else progress
    return state, str(reason) if reason else None


def _duration(seconds: float) -> str:
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h" if seconds < 86400 else f"{seconds / 86400:.1f} days"


def _read_summary(path: Path) -> tuple[dict[str, Any], bool]:
    """The summary (``{}`` if missing) and whether the file existed but did not parse."""
    if not path.is_file():
        return {}, False
    try:
        summary = json.loads(path.read_text())
    except json.JSONDecodeError:
        return {}, True
    return (summary, False) if isinstance(summary, dict) else ({}, True)


def _read_config(path: Path) -> dict[str, Any]:
    """The flattened config; ``{}`` if missing or not YAML (the run still gets its row)."""
    if not path.is_file():
        return {}
    try:
        config = yaml.load(path.read_text(), Loader=_Loader)
    except yaml.YAMLError:
        return {}
    return flatten(config) if isinstance(config, dict) else {}


def _read_records(path: Path) -> Iterator[dict[str, Any]]:
    """JSON lines; a line cut short by a killed process is skipped."""
    if not path.is_file():
        return
    with path.open() as stream:
        for line in stream:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict):
                yield record


def flatten(node: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}, "c": [1, 2]}`` -> ``{"a.b": 1, "c": (1, 2)}`` (hashable leaves)."""
    flat: dict[str, Any] = {}
    for key, value in node.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{name}."))
        elif isinstance(value, list):
            flat[name] = tuple(item if isinstance(item, (str, int, float, bool, type(None)))
                               else json.dumps(item, sort_keys=True) for item in value)
        else:
            flat[name] = None if isinstance(value, Mapping) else value
    return flat
