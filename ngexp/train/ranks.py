"""Agreement across the ranks of a data-parallel run on what each rank's host decides alone:
rank 0's decisions, metric sums, the first non-finite loss, a stop signal and a
time-based checkpoint.

Every function is a no-op agreement (its local value) in a single-process run.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ngexp.distributed import comm
from ngexp.distributed.world import World
from ngexp.errors import UserError

#: ``first_bad_step`` of a rank without a non-finite loss, when the ranks agree on the first.
NO_BAD_STEP = 2**62


class RankZeroFailed(UserError):
    """Rank 0 stopped a data-parallel run before training (it reports why)."""


def on_main(world: World, action: Callable[[], bool]) -> bool:
    """``action()`` run on rank 0 only (where it may print, write and raise), its outcome the
    same on every rank; an exception there stops the other ranks too
    (:class:`RankZeroFailed`)."""
    outcome, failure = False, None
    if world.is_main:
        try:
            outcome = action()
        except Exception as error:  # re-raised below, once the other ranks know
            failure = error
    code = comm.broadcast_int(-1 if failure is not None else int(outcome))
    if failure is not None:
        raise failure
    if code < 0:
        raise RankZeroFailed("rank 0 stopped the run (its error says why)")
    return bool(code)


def sum_over_ranks(sums: Tensor, count: int) -> tuple[Tensor, int]:
    """``sums (k,)`` and ``count`` summed over the ranks (float64: exact counts)."""
    total, terms = comm.all_reduce_sum(
        [sums.double(), torch.tensor(float(count), dtype=torch.float64, device=sums.device)])
    return total, int(terms)


def agree_first_bad_step(bad: int, world: World) -> int:
    """The first step with a non-finite loss on any rank (``-1``: none on any)."""
    if not world.distributed:
        return bad
    bad = comm.agree_min(bad if bad >= 0 else NO_BAD_STEP)
    return -1 if bad == NO_BAD_STEP else bad


def agree_stop_signal(signal: int | None, checkpoint_due: bool, world: World
                      ) -> tuple[int | None, bool]:
    """A stop signal that arrived on any rank, and whether any rank's clock asks for a
    checkpoint (agreed on the host at every step in one exchange, ``2 signal + due``, so every
    rank checkpoints the same step; a stop checkpoints anyway)."""
    if not world.distributed:
        return signal, checkpoint_due
    agreed = comm.agree_max(2 * (signal or 0) + int(checkpoint_due))
    return agreed // 2 or None, bool(agreed % 2)
