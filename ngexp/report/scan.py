"""Find run directories under the given paths and load each one exactly once, whatever is in
its files.

A run directory holds ``summary.json`` and/or ``metrics.jsonl`` (plus ``config.yaml``); a Hydra
sweep job directory holds ``run_dir.txt``, a pointer to its run directory. Runs are reported
whatever their state: completed, failed, interrupted, running, stale (``running`` but no file
written for :data:`STALE_AFTER_S` seconds: the process most likely died), unfinished (no
summary at all) or unreadable (a file the trainer would not have written: not UTF-8, not
JSON/YAML, a value of the wrong type). An unreadable run keeps whatever could be read (its
config, its valid records and summary fields); a partial last line of ``metrics.jsonl`` (a
process killed mid-write) is not a defect and is ignored.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import types
import typing
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ngexp.errors import UserError
from ngexp.summary import STATUSES, Status, field_types

RUN_FILES = ("summary.json", "metrics.jsonl")
POINTER = "run_dir.txt"
STALE_AFTER_S = 30 * 60
#: Record fields that are axes, not metrics.
AXES = ("epoch", "step", "time")

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
Check = Callable[[Any], bool]


@dataclass
class Run:
    """One run directory: flattened config, summary (``{}`` if absent), metric records; every
    value of a type the report expects (wrong ones are left out and make the run unreadable)."""

    path: Path
    config: dict[str, Any]  # dotted key -> value, e.g. {"optimizer.lr": 0.1}
    summary: dict[str, Any]
    records: list[dict[str, Any]]  # metrics.jsonl lines in order
    state: str  # completed | failed | interrupted | running | stale | unfinished | unreadable
    detail: str | None  # failure reason, "step 812/1410", what is unreadable, ...

    @property
    def status(self) -> str:
        """Display form, e.g. ``failed(nan at step 812)``."""
        return f"{self.state}({self.detail})" if self.detail else self.state

    @property
    def completed(self) -> bool:
        return self.state == "completed"

    @property
    def seed(self) -> int | None:
        """summary.json's seed, else config.yaml's (when an integer)."""
        seeds = (self.summary.get("seed"), self.config.get("seed"))
        return next((seed for seed in seeds if is_int(seed)), None)

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
            return self.records[-1]["step"]
        return self.summary.get("step")


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_finite(value: Any) -> bool:
    return is_number(value) and math.isfinite(value)


def _is_str(value: Any) -> bool:
    return isinstance(value, str)


def _is_option(value: Any) -> bool:
    return value is None or isinstance(value, (str, int, float, bool))


#: Checks of a value of each type :class:`RunSummary` declares (``X | None``: X's; null passes
#: every check): a scalar field's, and an entry's of a field that is an object.
FIELD_CHECKS: dict[Any, tuple[Check, str]] = {
    Status: (lambda value: value in STATUSES, "one of " + ", ".join(STATUSES)),
    str: (_is_str, "a string"),
    int: (is_int, "an integer"),
    float: (_is_finite, "a finite number"),
}
ENTRY_CHECKS: dict[Any, tuple[Check, str]] = {
    str | None: (_is_option, "an option name"),
    str: (_is_str, "a string"),
    int: (is_int, "an integer"),
    float: (is_number, "a number"),
}


def _summary_checks() -> tuple[dict[str, tuple[Check, str]], dict[str, tuple[Check, str]]]:
    """The checks of :class:`RunSummary`'s scalar fields and of its object fields' entries."""
    scalars, maps = {}, {}
    for name, annotation in field_types().items():
        if typing.get_origin(annotation) is dict:
            maps[name] = ENTRY_CHECKS[typing.get_args(annotation)[1]]
        else:
            rest = [a for a in typing.get_args(annotation) if a is not type(None)]
            plain = rest[0] if typing.get_origin(annotation) is types.UnionType else annotation
            scalars[name] = FIELD_CHECKS[plain]
    return scalars, maps


#: summary.json's fields (:class:`ngexp.summary.RunSummary`) with the check of each value, and
#: those that are objects with the check of each entry; other fields are kept as they are.
SUMMARY_FIELDS, SUMMARY_MAPS = _summary_checks()
#: metrics.jsonl fields with their own check; every other field is a metric (any number).
RECORD_FIELDS: dict[str, tuple[Check, str]] = {
    "step": (is_int, "an integer"),
    "epoch": (_is_finite, "a finite number"),
    "time": (_is_finite, "a finite number"),
}


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
    try:
        target = Path(pointer.read_bytes().decode("utf-8").strip())
    except (OSError, UnicodeDecodeError) as error:
        _warn(f"{pointer} is unreadable ({_why(error)})")
        return
    if not target.is_absolute():
        target = pointer.parent / target
    if target.is_dir():
        yield target.resolve()
    else:  # the job died before creating its run directory, or the runs were moved
        _warn(f"{pointer} points to missing {target}")


def _warn(message: str) -> None:
    print(f"ngexp: warning: {message}", file=sys.stderr)


def load_run(path: Path, now: float | None = None) -> Run:
    """Read ``config.yaml``, ``summary.json`` and ``metrics.jsonl`` (each once) of one run."""
    summary, summary_problems = _read_summary(path / "summary.json")
    config, config_problem = _read_config(path / "config.yaml")
    records, record_problems = _read_records(path / "metrics.jsonl")
    run = Run(path, config, summary, records, "unfinished", None)
    problems = [text for text in (_first("summary.json", summary_problems), config_problem,
                                  _first("metrics.jsonl", record_problems)) if text]
    if problems:
        if summary.get("status"):
            problems.append(f"summary status: {summary['status']}")
        run.state, run.detail = "unreadable", "; ".join(problems)
    else:
        run.state, run.detail = _state(run, _idle_s(path, now))
    return run


def _first(name: str, problems: list[str]) -> str | None:
    """``<name><first problem>`` and how many more, e.g. ``metrics.jsonl line 3: ... (+2 more)``;
    ``None`` without problems."""
    if not problems:
        return None
    return f"{name}{problems[0]}" + (f" (+{len(problems) - 1} more)" if len(problems) > 1 else "")


def _idle_s(path: Path, now: float | None) -> float:
    """Seconds since the run last wrote summary.json or metrics.jsonl."""
    mtimes = []
    for name in RUN_FILES:
        try:
            mtimes.append((path / name).stat().st_mtime)
        except OSError:
            continue
    return (time.time() if now is None else now) - max(mtimes, default=0.0)


def _state(run: Run, idle_s: float) -> tuple[str, str | None]:
    summary = run.summary
    step = run.last_step
    progress = None if step is None else (
        f"step {step}/{summary['total_steps']}" if summary.get("total_steps") else f"step {step}")
    if not summary:
        return "unfinished", f"no summary.json, {progress}" if progress else "no summary.json"
    state = summary.get("status") or "unfinished"
    if state == "running" and idle_s > STALE_AFTER_S:
        return "stale", f"{progress or 'no step'}, no update for {_duration(idle_s)}"
    if state in ("running", "unfinished"):
        return state, progress
    reason = summary.get("reason")
    if state == "interrupted" and progress:
        reason = f"{reason}, {progress}" if reason else progress
    return state, reason or None


def _duration(seconds: float) -> str:
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h" if seconds < 86400 else f"{seconds / 86400:.1f} days"


def read_json_object(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """``(object, None)`` for a file holding a JSON object; ``(None, "missing")`` without the
    file; else ``(None, reason)``, e.g. ``invalid UTF-8 at byte 0``."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None, "missing"
    except OSError as error:
        return None, f"unreadable ({_why(error)})"
    return decode_json_object(data)


def decode_json_object(data: bytes) -> tuple[dict[str, Any] | None, str | None]:
    """``(object, None)`` for UTF-8 bytes holding a JSON object, else ``(None, reason)``."""
    try:
        value = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as error:
        return None, f"invalid UTF-8 at byte {error.start}"
    except json.JSONDecodeError as error:  # the line only where there are several
        lines = b"\n" in data.strip()
        where = f"line {error.lineno} column {error.colno}" if lines else f"column {error.colno}"
        return None, f"not JSON ({error.msg.removesuffix(' at')} at {where})"
    except (ValueError, RecursionError) as error:  # a 5000-digit integer, nesting too deep
        return None, f"not JSON ({_why(error)})"
    if not isinstance(value, dict):
        return None, f"a JSON {_json_kind(value)}, not an object"
    return value, None


def _why(error: BaseException) -> str:
    return getattr(error, "strerror", None) or str(error) or type(error).__name__


def _json_kind(value: Any) -> str:
    kinds = {list: "array", str: "string", bool: "boolean", type(None): "null"}
    return kinds.get(type(value), "number")


def _read_summary(path: Path) -> tuple[dict[str, Any], list[str]]:
    """The summary's valid fields (``{}`` if missing or unreadable) and its problems, each
    starting with ``: `` (e.g. ``: wall_time is "abc", not a finite number``)."""
    raw, reason = read_json_object(path)
    if raw is None:
        return {}, [] if reason == "missing" else [f": {reason}"]
    summary: dict[str, Any] = {}
    problems: list[str] = []
    for key, value in raw.items():
        if value is None:
            summary[key] = value
        elif key in SUMMARY_MAPS:
            summary[key] = _valid_entries(key, value, *SUMMARY_MAPS[key], problems)
        elif key in SUMMARY_FIELDS and not SUMMARY_FIELDS[key][0](value):
            problems.append(f": {key} is {_brief(value)}, not {SUMMARY_FIELDS[key][1]}")
        else:
            summary[key] = value
    if raw.get("status") is None:
        problems.insert(0, ": no status")
    return summary, problems


def _valid_entries(name: str, value: Any, check: Check, expected: str,
                   problems: list[str]) -> dict[str, Any]:
    """The entries of object ``value`` that pass ``check``; a problem for each other one."""
    if not isinstance(value, dict):
        problems.append(f": {name} is {_brief(value)}, not an object")
        return {}
    valid = {}
    for key, entry in value.items():
        if check(entry):
            valid[key] = entry
        else:
            problems.append(f": {name}[{json.dumps(key)}] is {_brief(entry)}, not {expected}")
    return valid


def _brief(value: Any) -> str:
    """``value`` as JSON, cut to 30 characters."""
    text = json.dumps(value, default=str)
    return text if len(text) <= 30 else text[:29] + "…"


def _read_records(path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """The JSON lines with their valid fields, and the problems (``" line 3: ..."``). The last
    line without its newline (a write cut short) is used if it parses, else ignored."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return [], []
    except OSError as error:
        return [], [f": unreadable ({_why(error)})"]
    *lines, partial = data.split(b"\n")
    records: list[dict[str, Any]] = []
    problems: list[str] = []
    for number, line in enumerate(lines, start=1):
        if line.strip():
            record, reason = decode_json_object(line)
            if record is None:
                problems.append(f" line {number}: {reason}")
            else:
                records.append(_valid_fields(record, number, problems))
    if (last := decode_json_object(partial)[0]) is not None:
        records.append(_valid_fields(last, len(lines) + 1, problems))
    return records, problems


def _valid_fields(record: dict[str, Any], number: int, problems: list[str]) -> dict[str, Any]:
    """The fields of a record that are numbers of the right kind; a problem for each other."""
    valid = {}
    for key, value in record.items():
        check, expected = RECORD_FIELDS.get(key, (is_number, "a number"))
        if check(value):
            valid[key] = value
        else:
            problems.append(f" line {number}: {key} is {_brief(value)}, not {expected}")
    return valid


def _read_config(path: Path) -> tuple[dict[str, Any], str | None]:
    """The flattened config (``{}`` if missing or unreadable) and what is wrong with it."""
    try:
        config = yaml.load(path.read_bytes().decode("utf-8"), Loader=_Loader)
        if not isinstance(config, dict):
            kind = "an empty file" if config is None else f"a YAML {type(config).__name__}"
            return {}, f"config.yaml: {kind}, not a mapping"
        return flatten(config), None
    except FileNotFoundError:
        return {}, None
    except OSError as error:
        return {}, f"config.yaml: unreadable ({_why(error)})"
    except UnicodeDecodeError as error:
        return {}, f"config.yaml: invalid UTF-8 at byte {error.start}"
    except (yaml.YAMLError, ValueError, RecursionError) as error:  # ValueError: a bad date
        return {}, f"config.yaml: not YAML ({_yaml_why(error)})"


def _yaml_why(error: BaseException) -> str:
    """``expected ',' or ']', but got '<stream end>' at line 3`` for a parse error."""
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None)
    if problem and mark is not None:
        return f"{problem} at line {mark.line + 1}"
    return (str(error).splitlines() or [type(error).__name__])[0]


def flatten(node: Mapping[Any, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}, "c": [1, 2]}`` -> ``{"a.b": 1, "c": (1, 2)}`` (hashable leaves:
    scalars kept, lists as tuples, anything else as JSON text)."""
    flat: dict[str, Any] = {}
    for key, value in node.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{name}."))
        elif isinstance(value, list):
            flat[name] = tuple(map(_scalar, value))
        else:
            flat[name] = None if isinstance(value, Mapping) else _scalar(value)
    return flat


def _scalar(value: Any) -> Any:
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    try:
        return json.dumps(value, sort_keys=True, default=str)
    except TypeError:  # keys of mixed types cannot be sorted
        return str(value)
