"""``summary.json``: how a run ended, as one type written by the trainer and read by the report.

Torch-free (like :mod:`ngexp.metrics`): ``ngexp report`` derives its checks of each field from
the annotations of :class:`RunSummary` (:mod:`ngexp.report.scan`).
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any, Literal

#: How a run ended (``running`` while it trains).
Status = Literal["running", "completed", "failed", "interrupted"]
#: The ``status`` values the trainer writes.
STATUSES: tuple[str, ...] = typing.get_args(Status)


@dataclass(frozen=True)
class RunSummary:
    """One run's ``summary.json``, written at the start and the end of every session.

    ``final`` holds the last ``train/`` window and the last evaluation; ``best`` the best value
    of each evaluated ``val/``/``test/`` metric and ``best_step`` the step it was reached at;
    ``wall_time`` is training seconds summed over resumes.
    """

    status: Status
    reason: str | None
    choices: dict[str, str | None]  # group -> option
    seed: int
    step: int
    epoch: float
    total_steps: int
    wall_time: float
    final: dict[str, float]
    best: dict[str, float]
    best_step: dict[str, int]
    world_size: int
    global_batch_size: int
    device: str
    versions: dict[str, str]  # ngexp, python, torch, hydra
    git_commit: str | None
    host: str
    run_dir: str

    def to_json(self) -> dict[str, Any]:
        """The fields in declaration order (``summary.json``'s key order)."""
        return {item.name: getattr(self, item.name) for item in dataclasses.fields(self)}


def field_types() -> dict[str, Any]:
    """``summary.json``'s field names and their annotations, resolved."""
    return typing.get_type_hints(RunSummary)
