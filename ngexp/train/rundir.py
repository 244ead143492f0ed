"""Run directories: naming by config hash, state on disk, atomic writes.

Layout: ``<output_root>/<name>/<hash>/seed_<seed>/`` where ``hash`` covers the resolved config
minus non-semantic keys (:data:`ngexp.config.NON_SEMANTIC_KEYS`) and the seed, so the seeds of one
configuration sit side by side.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

from omegaconf import DictConfig, OmegaConf

from ngexp.config import semantic_config

GROUPS = ("data", "model", "optimizer", "lr_schedule", "prune")


def config_hash(cfg: DictConfig) -> str:
    text = json.dumps(semantic_config(cfg), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def run_name(cfg: DictConfig, choices: Mapping[str, str | None]) -> str:
    if cfg.name:
        return str(cfg.name)
    parts = [choices.get(group) for group in ("data", "model", "optimizer", "prune")]
    return "-".join(str(part) for part in parts if part)


def run_directory(cfg: DictConfig, choices: Mapping[str, str | None]) -> Path:
    return (Path(cfg.output_root) / run_name(cfg, choices) / config_hash(cfg)
            / f"seed_{cfg.seed}")


def atomic_write_text(path: Path, text: str) -> None:
    """Write via a temporary file in the same folder and rename, so readers never see half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(handle, "w") as stream:
        stream.write(text)
    os.replace(tmp, path)


def read_summary(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / "summary.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


def write_summary(run_dir: Path, summary: Mapping[str, Any]) -> None:
    atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2, default=str) + "\n")


def is_finished(summary: Mapping[str, Any] | None) -> bool:
    """Completed runs, and runs that diverged (deterministic: re-running would diverge again)."""
    if summary is None:
        return False
    return summary.get("status") == "completed" or (
        summary.get("status") == "failed" and str(summary.get("reason", "")).startswith("nan"))


def set_aside(run_dir: Path) -> Path:
    """Rename an existing run directory (``force=true``) so nothing written is lost."""
    target = run_dir.with_name(f"{run_dir.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
    run_dir.rename(target)
    return target


def save_config(run_dir: Path, cfg: DictConfig) -> None:
    plain = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(plain, dict)
    plain.pop("hydra", None)
    atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(OmegaConf.create(plain)))


def truncate_metrics(path: Path, last_step: int) -> None:
    """Keep only records up to ``last_step`` (those after the checkpoint are recomputed)."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= last_step]
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
