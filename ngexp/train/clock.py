"""The training clock: the ``time`` of every record and ``wall_time`` of ``summary.json``.

Training seconds of a run, summed over its sessions (resumes), without the seconds spent
evaluating and writing checkpoints: a time to target (:mod:`ngexp.report.target`) compares
optimizers by what their training costs, so it must not depend on how often a run evaluates.
While paused the clock reads the time at which it was paused (an evaluation's record carries
the training time it was measured at).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from time import perf_counter


class TrainingClock:
    """``seconds = before + (now - start) - paused``, ``now`` frozen while paused."""

    def __init__(self) -> None:
        self.before = 0.0  # training seconds of earlier sessions
        self.start = perf_counter()
        self.paused_seconds = 0.0
        self.paused_at: float | None = None

    def start_session(self) -> None:
        """Start this session's clock (after ``before`` seconds of earlier sessions)."""
        self.start, self.paused_seconds = perf_counter(), 0.0

    @property
    def seconds(self) -> float:
        now = self.paused_at if self.paused_at is not None else perf_counter()
        return self.before + now - self.start - self.paused_seconds

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Stop the clock for the block (nested blocks count once)."""
        if self.paused_at is not None:
            yield
            return
        self.paused_at = perf_counter()
        try:
            yield
        finally:
            self.paused_seconds += perf_counter() - self.paused_at
            self.paused_at = None
