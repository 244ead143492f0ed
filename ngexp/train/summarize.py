"""The run's summary (:class:`ngexp.summary.RunSummary`, ``summary.json``) taken from a
trainer, and the console's table of it."""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

from ngexp.summary import RunSummary, Status
from ngexp.train.console import format_duration, format_number
from ngexp.train.trainer import Trainer


def summarize(trainer: Trainer, status: Status, reason: str | None = None) -> RunSummary:
    """The run's summary now."""
    run = trainer.run
    device = run.device
    return RunSummary(
        status=status,
        reason=reason,
        choices=run.choices,
        seed=run.cfg.seed,
        step=trainer.step,
        epoch=trainer.step / trainer.steps_per_epoch,
        total_steps=trainer.total_steps,
        wall_time=trainer.elapsed,
        final={**trainer.last_train, **trainer.last_eval},
        best=trainer.best.values,
        best_step=trainer.best.steps,
        world_size=run.world.size,
        global_batch_size=run.global_batch,
        device=(torch.cuda.get_device_name(device) if device.type == "cuda"
                else f"cpu ({platform.processor() or platform.machine()}, "
                     f"{torch.get_num_threads()} threads)"),
        **environment(),
        run_dir=str(run.run_dir.resolve()),
    )


def summary_rows(summary: RunSummary, trainer: Trainer) -> dict[str, Any]:
    """The console's summary table: status, progress, the last metrics and the best one."""
    rows: dict[str, Any] = {
        "status": f"{summary.status}({summary.reason})" if summary.reason else summary.status,
        "step": f"{summary.step:,} / {summary.total_steps:,}",
        "epoch": f"{summary.epoch:.2f}",
        "wall time": format_duration(summary.wall_time),
    }
    if "train/loss" in trainer.last_train:
        rows["train/loss"] = trainer.last_train["train/loss"]
    rows.update(trainer.last_eval)
    key = trainer.selection_key()
    if key in summary.best:
        rows[f"best {key}"] = (f"{format_number(summary.best[key], key)} "
                               f"(step {summary.best_step.get(key, '?')})")
    return rows


def environment() -> dict[str, Any]:
    """Library versions, the git commit of the ngexp source and the host, for the summary."""
    import hydra

    from ngexp import __version__

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent,
                                capture_output=True, text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {
        "versions": {"ngexp": __version__, "python": platform.python_version(),
                     "torch": torch.__version__, "hydra": hydra.__version__},
        "git_commit": commit,
        "host": platform.node(),
    }
