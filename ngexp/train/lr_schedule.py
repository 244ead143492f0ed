"""Learning-rate schedules as multipliers of the base lr, stepped once per optimizer step.

Each option builds ``f(step) -> factor`` for ``torch.optim.lr_scheduler.LambdaLR``; all share a
linear warm-up from 0 over ``warmup_steps``. Epoch-based settings are converted with the
number of steps per epoch.
"""

from __future__ import annotations

import math
import warnings
from bisect import bisect_right
from collections.abc import Callable, Sequence
from typing import Any

from ngexp.options import check, check_integer, check_range, checked, configurable

Multiplier = Callable[[int], float]


def with_warmup(schedule: Multiplier, warmup_steps: int) -> Multiplier:
    if warmup_steps == 0:
        return schedule
    return lambda step: min(1.0, (step + 1) / warmup_steps) * schedule(step)


def check_schedule(warmup_steps: int, **options: object) -> None:
    """Checks of every schedule's options (``step_epochs``, ``gamma``, ... where it has them)."""
    check_integer("warmup_steps", warmup_steps, 0)
    if "step_epochs" in options:
        check_integer("step_epochs", options["step_epochs"], 1)
    if "gamma" in options:
        check_range("gamma", options["gamma"], 0, 1, closed="(]")
    if "milestones" in options:
        milestones = list(options["milestones"])  # type: ignore[call-overload]
        check(milestones == sorted(milestones), "milestones", milestones,
              "epochs in increasing order")
    if "min_factor" in options:
        check_range("min_factor", options["min_factor"], 0, 1)


@configurable("lr_schedule", "constant")
@checked(check_schedule)
def constant(total_steps: int, steps_per_epoch: int, warmup_steps: int = 0) -> Multiplier:
    """The base lr (after the warm-up)."""
    return with_warmup(lambda step: 1.0, warmup_steps)


@configurable("lr_schedule", "step")
@checked(check_schedule)
def step(total_steps: int, steps_per_epoch: int, step_epochs: int = 30, gamma: float = 0.1,
         warmup_steps: int = 0) -> Multiplier:
    """Multiply by ``gamma`` every ``step_epochs`` epochs."""
    period = step_epochs * steps_per_epoch
    return with_warmup(lambda s: gamma ** (s // period), warmup_steps)


@configurable("lr_schedule", "multistep")
@checked(check_schedule)
def multistep(total_steps: int, steps_per_epoch: int, milestones: Sequence[int] = (100, 150),
              gamma: float = 0.1, warmup_steps: int = 0) -> Multiplier:
    """Multiply by ``gamma`` at each epoch in ``milestones``."""
    bounds = [m * steps_per_epoch for m in milestones]
    return with_warmup(lambda s: gamma ** bisect_right(bounds, s), warmup_steps)


@configurable("lr_schedule", "cosine")
@checked(check_schedule)
def cosine(total_steps: int, steps_per_epoch: int, min_factor: float = 0.0,
           warmup_steps: int = 0) -> Multiplier:
    """Cosine decay from the base lr to ``min_factor`` x base lr at the last step."""
    span = max(1, total_steps - warmup_steps)

    def factor(s: int) -> float:
        progress = min(1.0, max(0, s - warmup_steps) / span)
        return min_factor + (1 - min_factor) * 0.5 * (1 + math.cos(math.pi * progress))

    return with_warmup(factor, warmup_steps)


def step_scheduler(scheduler: Any, before_any_optimizer_step: bool) -> None:
    """Advance ``scheduler`` (a ``LambdaLR``) one step: once per training step, also a step
    that the grad scaler skipped; ``before_any_optimizer_step`` (a scaled run's first step):
    torch's warning that the schedule stepped before the optimizer is expected and not shown."""
    if not before_any_optimizer_step:
        scheduler.step()
        return
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r"Detected call of `lr_scheduler\.step\(\)` before",
                                UserWarning)
        scheduler.step()
