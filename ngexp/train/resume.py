"""A run's checkpoints as its trainer sees them: writing one (never a non-finite one) and, on
resume, choosing the newest good one.

Data-parallel, every rank builds the state (a preconditioner gathers its terms) and rank 0
writes it; a write error there stops every rank. Resuming, rank 0 chooses (and sets a
corrupted checkpoint aside) and every rank loads its choice.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console

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


class Checkpoints:
    """The ``checkpoints/`` folder of one run directory."""

    def __init__(self, run_dir: Path, world: World, console: Console) -> None:
        self.run_dir, self.world, self.console = run_dir, world, console
        self.folder = run_dir / "checkpoints"

    def exist(self) -> bool:
        """Whether rank 0 finds a checkpoint to resume from (every rank gets its answer)."""
        return bool(comm.broadcast_int(int(any(self.folder.glob("*.pt")))))

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

    def resume(self, load: Callable[[dict[str, Any]], None]) -> None:
        """Restore the newest verified checkpoint through ``load``; a
        corrupted ``last.pt`` is set aside (kept for inspection) and the previous one used, or
        the run starts over -- with one line why."""
        resumable = None

        def choose() -> int:
            nonlocal resumable
            resumable = load_resumable(self.folder)
            for problem in resumable.skipped:
                name = problem.split(":", 1)[0]
                aside = rundir.set_aside(self.folder / name, "corrupt")
                say(self.console, f"checkpoint {problem}; moved to {aside.name}")
            if resumable.path is not None:
                return RESUMABLE.index(resumable.path.name) + 1
            return -1 if resumable.skipped else 0

        choice = comm.broadcast_int(choose() if self.world.is_main else 0)
        if choice > 0:
            name = RESUMABLE[choice - 1]
            state = resumable.state if resumable is not None \
                else read_checkpoint(self.folder / name)
            load(state)
            step = state["step"]
            if self.world.is_main:
                rundir.truncate_metrics(self.run_dir / "metrics.jsonl", step)
            source = "" if name == LAST else f" ({name})"
            say(self.console, f"resuming from step {step}{source}")
        elif choice < 0:
            if self.world.is_main:
                rundir.remove_outputs(self.run_dir)
            say(self.console, "no usable checkpoint left: starting over")
