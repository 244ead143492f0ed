"""Ending training early: stop signals and a callback's stop request.

SIGINT, SIGTERM and SIGUSR2 (SLURM's warning before preemption or time-out) stop a run with a
checkpoint; the run then ends ``interrupted`` (:class:`RunInterrupted`). A callback (early
stopping) ends it ``completed`` with a reason.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from ngexp.distributed.world import World
from ngexp.train.ranks import agree_stop_signal

#: Signals that stop a run with a checkpoint (USR2: SLURM's warning before preemption/time-out).
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGUSR2")
                     if hasattr(signal, name))


class RunInterrupted(Exception):
    """Raised after SIGINT/SIGTERM once the checkpoint and summary are written."""


class StopRequest:
    """Whether and why training is to end before its last step."""

    def __init__(self) -> None:
        self.signal: int | None = None  # a stop signal that arrived (this rank's)
        self.reason: str | None = None  # a callback's reason to end as completed
        self.checkpoint_due = False  # agreed by signalled(): a rank's clock asks for last.pt

    def signalled(self, world: World, checkpoint_due: bool = False) -> bool:
        """Whether a stop signal arrived, on any rank; the same exchange agrees on this rank's
        ``checkpoint_due`` (:attr:`checkpoint_due`: whether any rank's is true)."""
        self.signal, self.checkpoint_due = agree_stop_signal(self.signal, checkpoint_due, world)
        return self.signal is not None

    def _handle(self, signum: int, frame: Any) -> None:
        self.signal = signum

    @contextmanager
    def catching_signals(self) -> Iterator[dict[int, Any]]:
        """Record :data:`STOP_SIGNALS` while open; yields the handlers it replaced (restored on
        exit)."""
        previous = {sig: signal.signal(sig, self._handle) for sig in STOP_SIGNALS}
        try:
            yield previous
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def pass_on(self, previous: dict[int, Any]) -> None:
        """Call the handler the stop signal had before the run (e.g. submitit's requeue on
        USR2)."""
        handler = previous.get(self.signal) if self.signal is not None else None
        if callable(handler) and handler is not signal.default_int_handler:
            handler(self.signal, None)
