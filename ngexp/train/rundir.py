"""Run directories: naming by config hash, state on disk, atomic writes.

Layout: ``<output_root>/<name>/<hash>/seed_<seed>/`` where ``hash`` covers what the user chose
(:mod:`ngexp.identity`: the schemas and the semantic settings that differ from their reference
defaults; not the seed), so the seeds of one configuration sit side by side and a new option
moves no directory. A data-parallel run hashes its global batch in place of
``trainer.batch_size``: runs of any world size with the same global batch share a directory
(and resume each other). A run directory of an earlier ngexp (another hash of the same config)
is found by its stored ``config.yaml`` and used.

Before a session trains, :func:`prepare_run_dir` takes the directory's lock (a live run is never
renamed nor written to), sets a replaced run aside and writes the config; a finished run is
skipped (:func:`skip_finished`). A run with nothing to resume from starts over with what its
earlier sessions wrote set aside (:func:`set_aside_outputs`, :mod:`ngexp.train.resume`).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import time
from collections.abc import Iterable, Mapping
from contextlib import ExitStack
from pathlib import Path
from typing import IO, Any

from omegaconf import DictConfig, OmegaConf
from rich.console import Console

from ngexp.config import NAMING_GROUPS, NON_SEMANTIC_KEYS
from ngexp.errors import UserError
from ngexp.identity import NOT_IDENTITY, identity, matches_stored


class RunWriteError(UserError):
    """The run could not write its files (disk full, permissions); it ended ``failed(io)``."""


def config_hash(cfg: DictConfig, world_size: int = 1) -> str:
    text = json.dumps(identity(cfg, world_size), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def run_label(overrides: Iterable[str]) -> str:
    """The settings of a run's command line (Hydra's task overrides) that name a configuration
    for people: ``optimizer=kfac optimizer.lr=0.1`` (the seed, logging, paths and other
    non-semantic keys left out)."""
    kept = []
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        if key != "seed" and key not in NON_SEMANTIC_KEYS and key.split(".")[0] not in (
                "hydra", *NOT_IDENTITY):
            kept.append(override.lstrip("+~"))
    return " ".join(kept)


def run_name(cfg: DictConfig, choices: Mapping[str, str | None]) -> str:
    if cfg.name:
        return str(cfg.name)
    parts = [choices.get(group) for group in NAMING_GROUPS]
    return "-".join(str(part) for part in parts if part)


def run_directory(cfg: DictConfig, choices: Mapping[str, str | None],
                  world_size: int = 1) -> Path:
    """The run's directory: the hashed one, or, while that holds nothing, a directory of the
    same config that an earlier ngexp version wrote (:func:`earlier_run_directory`)."""
    family = Path(cfg.output_root) / run_name(cfg, choices)
    run_dir = family / config_hash(cfg, world_size) / f"seed_{cfg.seed}"
    if has_outputs(run_dir) or not family.is_dir():
        return run_dir
    return earlier_run_directory(cfg, family, world_size) or run_dir


def earlier_run_directory(cfg: DictConfig, family: Path, world_size: int) -> Path | None:
    """A ``<family>/<other hash>/seed_<seed>`` whose ``config.yaml`` is the run of ``cfg``
    (:func:`ngexp.identity.matches_stored`); directories set aside (``.replaced-``) are not."""
    for candidate in sorted(family.glob(f"*/seed_{cfg.seed}")):
        stored_path = candidate / "config.yaml"
        if "." in candidate.parent.name or not stored_path.is_file():
            continue
        try:
            stored = OmegaConf.to_container(OmegaConf.load(stored_path))
        except Exception:  # noqa: BLE001  (unreadable: not this run)
            continue
        summary = read_summary(candidate) or {}
        if isinstance(stored, dict) and matches_stored(
                cfg, stored, world_size, int(summary.get("world_size", 1) or 1)):
            return candidate
    return None


def atomic_write_text(path: Path, text: str) -> None:
    """Write via ``.<name>.tmp`` in the same folder and rename, so readers never see half; the
    file gets the permissions of a plain ``open`` (0644 under the usual umask) and the
    temporary file is removed when the write fails (disk full)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with tmp.open("w", encoding="utf-8") as stream:
            stream.write(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_json_object(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """``(object, None)`` for a readable JSON object file, else ``(None, reason)``."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None, "missing"
    except (OSError, UnicodeDecodeError, ValueError) as error:
        return None, f"unreadable ({type(error).__name__})"
    if not isinstance(value, dict):
        return None, f"not a JSON object ({type(value).__name__})"
    return value, None


def read_summary(run_dir: Path) -> dict[str, Any] | None:
    """The run's summary, or ``None`` when missing or unreadable (wrong encoding, not JSON,
    not an object): such a run is resumed, not skipped."""
    return read_json_object(run_dir / "summary.json")[0]


def write_summary(run_dir: Path, summary: Mapping[str, Any]) -> None:
    atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2, default=str) + "\n")


def is_finished(summary: Mapping[str, Any] | None) -> bool:
    """Completed runs, and runs that diverged (deterministic: re-running would diverge again)."""
    if summary is None:
        return False
    return summary.get("status") == "completed" or (
        summary.get("status") == "failed" and str(summary.get("reason", "")).startswith("nan"))


#: What the sessions of a run write besides its config (the loggers' files and folders among
#: them), set aside when it starts over; nothing else of a directory is touched.
SESSION_OUTPUTS = ("metrics.jsonl", "tb", "csv", "mlflow_run_id", "wandb", "wandb_run_id",
                   "train.log", "summary.json", "checkpoints")


def set_aside(path: Path, label: str, stamp: str | None = None) -> Path:
    """Rename ``path`` (a run directory replaced by ``force=true``, a corrupted checkpoint and its
    digest, the outputs of a run that starts over) to ``<name>.<label>-<stamp>`` (default: the
    time now) so nothing written is lost."""
    stamp = stamp or time.strftime("%Y%m%d-%H%M%S")
    target = path.with_name(f"{path.name}.{label}-{stamp}")
    counter = 1
    while target.exists():
        counter += 1
        target = path.with_name(f"{path.name}.{label}-{stamp}-{counter}")
    path.rename(target)
    digest = path.with_name(path.name + ".sha256")
    if digest.is_file():
        digest.rename(target.with_name(target.name + ".sha256"))
    return target


def has_outputs(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds anything a run wrote (not just its lock)."""
    return any(path.name != ".lock" for path in run_dir.iterdir()) if run_dir.is_dir() else False


def set_aside_outputs(run_dir: Path) -> str | None:
    """Set aside (:func:`set_aside`, label ``restarted``) what earlier sessions of a run that
    starts over wrote -- metrics, events, logs, summary, ``checkpoints/`` with a ``best.pt`` --
    so the new session appends to none of it; what moved where (``None``: nothing there)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    moved = [name for name in SESSION_OUTPUTS if (run_dir / name).exists()]
    for name in moved:
        set_aside(run_dir / name, "restarted", stamp)
    return f"{', '.join(moved)} moved to <name>.restarted-{stamp}" if moved else None


def save_config(run_dir: Path, cfg: DictConfig) -> None:
    plain = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(plain, dict)
    plain.pop("hydra", None)
    atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(OmegaConf.create(plain)))


def truncate_metrics(path: Path, last_step: int) -> None:
    """Keep only the whole records up to ``last_step`` (those after the checkpoint are
    recomputed); a partial last line (a crash mid-write) or an unreadable record is dropped."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_bytes().decode("utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        step = record.get("step") if isinstance(record, dict) else None
        if isinstance(step, int) and step <= last_step:
            kept.append(line)
    atomic_write_text(path, "".join(line + "\n" for line in kept))


def lock(run_dir: Path) -> IO[str] | None:
    """An exclusive lock on ``run_dir`` held while the returned file is open (released by the
    OS if the process dies); ``None`` when another process holds it."""
    stream = (run_dir / ".lock").open("w")
    try:
        fcntl.flock(stream, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        stream.close()
        return None
    return stream


def describe_os_error(error: OSError) -> str:
    """``No space left on device (checkpoints/.last.pt.tmp)``: the reason and the file."""
    reason = error.strerror or str(error) or type(error).__name__
    return f"{reason} ({error.filename})" if error.filename else reason


def make_run_dir(run_dir: Path, output_root: str) -> Path:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"output_root={output_root!r}: cannot create {run_dir} "
                        f"({describe_os_error(error)}); choose a writable folder") from None
    return run_dir


def write_pointer(job_dir: Path | None, run_dir: Path) -> None:
    """A sweep job's ``run_dir.txt``: where its run is (``ngexp report SWEEP`` follows it)."""
    if job_dir is not None:
        atomic_write_text(job_dir / "run_dir.txt", str(run_dir.resolve()) + "\n")


def skip_finished(run_dir: Path, console: Console, job_dir: Path | None = None) -> bool:
    """Whether the run in ``run_dir`` already finished (said on the console); a sweep job
    that skips it still points to it, so a relaunched sweep reports all its runs."""
    summary = read_summary(run_dir)
    if not is_finished(summary):
        return False
    assert summary is not None
    write_pointer(job_dir, run_dir)
    reason = f"({summary['reason']})" if summary.get("reason") else ""
    console.print(f"skipping {run_dir}: already {summary['status']}{reason} "
                  f"(force=true re-runs it)")
    return True


def hold_lock(stack: ExitStack, run_dir: Path, output_root: str, console: Console,
              holder: str) -> bool:
    """Lock ``run_dir`` (created if missing) for as long as ``stack`` is open; ``False``, said
    on the console, when another process ``holder`` (``is running``, ``started``) it."""
    held = lock(make_run_dir(run_dir, output_root))
    if held is None:
        console.print(f"skipping {run_dir}: another process {holder} this config")
        return False
    stack.enter_context(held)
    return True


def prepare_run_dir(stack: ExitStack, cfg: DictConfig, run_dir: Path, console: Console,
                    job_dir: Path | None, hydra_files: Mapping[str, str] | None) -> bool:
    """Lock ``run_dir`` (held by ``stack``), set a replaced run aside and write the config;
    ``False`` when the run is to be skipped (finished, or another process holds it)."""
    if not hold_lock(stack, run_dir, cfg.output_root, console, "is running"):
        return False
    if not cfg.force and skip_finished(run_dir, console, job_dir):
        return False
    if (cfg.force or not cfg.resume) and has_outputs(run_dir):
        aside = set_aside(run_dir, "replaced")  # we hold its lock: nobody runs it
        console.print(f"{'force=true' if cfg.force else 'resume=false'}: previous run moved "
                      f"to {aside}")
        if not hold_lock(stack, run_dir, cfg.output_root, console, "started"):
            return False
    try:
        write_pointer(job_dir, run_dir)
        save_config(run_dir, cfg)
        for name, text in (hydra_files or {}).items():  # Hydra's own record of the job
            atomic_write_text(run_dir / ".hydra" / name, text)
    except OSError as error:
        raise RunWriteError(f"{run_dir}: {describe_os_error(error)}") from None
    return True
