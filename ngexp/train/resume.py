"""A run's checkpoints as its trainer sees them: when to write ``last.pt`` (:class:`Cadence`),
writing one (never a non-finite one) and, on resume, choosing the newest good one or starting
over on a directory whose earlier outputs were set aside (``docs/runs.md``).

Data-parallel, every rank builds the state (a preconditioner gathers its terms) and rank 0
writes it; a write error there stops every rank. Resuming, rank 0 chooses (and sets a
corrupted checkpoint aside) and every rank loads its choice. The ranks agree on a time-based
checkpoint in the exchange that agrees on stop signals (:mod:`ngexp.train.stop`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from ngexp.config import TrainerConfig
from ngexp.distributed import comm
from ngexp.distributed.world import World
from ngexp.train import rundir
from ngexp.train.checkpoint import (
    LAST,
    PREVIOUS,
    all_finite,
    load_resumable,
    read_checkpoint,
    save_checkpoint,
)
from ngexp.train.runlog import say

#: The checkpoints a run resumes from, newest first.
RESUMABLE = (LAST, PREVIOUS)


class Cadence:
    """When ``last.pt`` is written: at the end of every ``trainer.checkpoint_every``-th epoch
    and of training, at every ``trainer.checkpoint_every_steps``-th step, and at the first step
    after ``trainer.checkpoint_every_minutes`` of wall-clock time (evaluations included: the
    work a crash would lose) since the last write or the session's start; 0 turns a cadence
    off."""

    def __init__(self, settings: TrainerConfig) -> None:
        self.epochs, self.steps = settings.checkpoint_every, settings.checkpoint_every_steps
        self.seconds = 60.0 * settings.checkpoint_every_minutes
        self.reset()

    def reset(self) -> None:
        """``last.pt`` was just written, or a session starts: the minutes count from now."""
        self.since = time.monotonic()

    def time_due(self) -> bool:
        """Whether this rank's clock says a checkpoint is due (the ranks then agree)."""
        return self.seconds > 0 and time.monotonic() - self.since >= self.seconds

    def step_due(self, step: int) -> bool:
        return self.steps > 0 and step % self.steps == 0

    def epoch_due(self, epochs_done: int) -> bool:
        return epochs_done % self.epochs == 0


@dataclass
class Plan:
    """What a session resumes from: a checkpoint of :data:`RESUMABLE` (``None``: it starts
    over), its state where rank 0 read it already, and the lines that say what was decided."""

    name: str | None = None
    state: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)


class Checkpoints:
    """The ``checkpoints/`` folder of one run directory."""

    def __init__(self, run_dir: Path, world: World, console: Console) -> None:
        self.run_dir, self.world, self.console = run_dir, world, console
        self.folder = run_dir / "checkpoints"

    def save(self, name: str, state: dict[str, Any]) -> None:
        """Write ``state`` as ``checkpoints/<name>``, never one whose weights or optimizer state
        are not finite (``FloatingPointError``)."""
        if not all_finite([state["model"], state["optimizer"]]):
            raise FloatingPointError(f"nan at step {state['step']} (non-finite weights or "
                                     f"optimizer state; no checkpoint written)")
        failure: OSError | None = None
        if self.world.is_main:
            try:
                save_checkpoint(self.folder / name, state)
            except OSError as error:
                failure = error
        if comm.agree_max(int(failure is not None)):
            raise failure or OSError(f"rank 0 could not write checkpoints/{name}")

    def plan(self) -> Plan:
        """Rank 0 chooses the newest verified checkpoint a session can resume from (a
        corrupted one is set aside, kept for inspection) and, when there is none, sets aside
        whatever earlier sessions wrote (:func:`ngexp.train.rundir.set_aside_outputs`: a
        ``best.pt``, metrics), so the run starts over on a clean directory; every rank gets the
        choice. Nothing else is read: ``best.pt`` is no point to resume from."""
        plan = Plan()

        def choose() -> int:
            resumable = load_resumable(self.folder)
            for problem in resumable.skipped:
                name = problem.split(":", 1)[0]
                aside = rundir.set_aside(self.folder / name, "corrupt")
                plan.notes.append(f"checkpoint {problem}; moved to {aside.name}")
            if resumable.path is not None:
                plan.state = resumable.state
                return RESUMABLE.index(resumable.path.name) + 1
            moved = rundir.set_aside_outputs(self.run_dir)
            if moved is not None:
                why = "no usable checkpoint left" if resumable.skipped \
                    else f"no {' or '.join(RESUMABLE)} to resume from"
                plan.notes.append(f"{why}: starting over ({moved})")
            return 0

        choice = comm.broadcast_int(choose() if self.world.is_main else 0)
        plan.name = RESUMABLE[choice - 1] if choice else None
        return plan

    def resume(self, plan: Plan, load: Callable[[dict[str, Any]], None]) -> int | None:
        """Restore the checkpoint of ``plan`` through ``load`` and drop the records after it;
        the step resumed at (``None``: the run starts over)."""
        if plan.name is None:
            return None
        state = plan.state if plan.state is not None else read_checkpoint(self.folder / plan.name)
        load(state)
        step = int(state["step"])
        if self.world.is_main:
            rundir.truncate_metrics(self.run_dir / "metrics.jsonl", step)
        source = "" if plan.name == LAST else f" ({plan.name})"
        say(self.console, f"resuming from step {step}{source}")
        return step
