"""Learning-rate schedules as multipliers of the base lr, stepped once per optimizer step.

Each option builds ``f(step) -> factor`` for ``torch.optim.lr_scheduler.LambdaLR``; all share a
linear warm-up from 0 over ``warmup_steps``. Epoch-based settings are converted with the
number of steps per epoch.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Callable
from dataclasses import dataclass, field

from ngexp.config import check, schema

Multiplier = Callable[[int], float]


def with_warmup(schedule: Multiplier, warmup_steps: int) -> Multiplier:
    if warmup_steps == 0:
        return schedule
    return lambda step: min(1.0, (step + 1) / warmup_steps) * schedule(step)


@dataclass
class ScheduleConfig:
    warmup_steps: int = 0

    def __post_init__(self) -> None:
        check(self.warmup_steps >= 0, "lr_schedule.warmup_steps", self.warmup_steps,
              "an integer >= 0")


@schema("lr_schedule", "constant")
@dataclass
class ConstantConfig(ScheduleConfig):
    _target_: str = "ngexp.train.lr_schedule.constant"


@schema("lr_schedule", "step")
@dataclass
class StepConfig(ScheduleConfig):
    """Multiply by ``gamma`` every ``step_epochs`` epochs."""

    _target_: str = "ngexp.train.lr_schedule.step"
    step_epochs: int = 30
    gamma: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.step_epochs >= 1, "lr_schedule.step_epochs", self.step_epochs,
              "an integer >= 1")
        check(0 < self.gamma <= 1, "lr_schedule.gamma", self.gamma, "a number in (0, 1]")


@schema("lr_schedule", "multistep")
@dataclass
class MultiStepConfig(ScheduleConfig):
    """Multiply by ``gamma`` at each epoch in ``milestones``."""

    _target_: str = "ngexp.train.lr_schedule.multistep"
    milestones: list[int] = field(default_factory=lambda: [100, 150])
    gamma: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        check(list(self.milestones) == sorted(self.milestones), "lr_schedule.milestones",
              list(self.milestones), "epochs in increasing order")
        check(0 < self.gamma <= 1, "lr_schedule.gamma", self.gamma, "a number in (0, 1]")


@schema("lr_schedule", "cosine")
@dataclass
class CosineConfig(ScheduleConfig):
    """Cosine decay from the base lr to ``min_factor`` x base lr at the last step."""

    _target_: str = "ngexp.train.lr_schedule.cosine"
    min_factor: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check(0 <= self.min_factor <= 1, "lr_schedule.min_factor", self.min_factor,
              "a number in [0, 1]")


def constant(total_steps: int, steps_per_epoch: int, warmup_steps: int = 0) -> Multiplier:
    return with_warmup(lambda step: 1.0, warmup_steps)


def step(total_steps: int, steps_per_epoch: int, step_epochs: int, gamma: float,
         warmup_steps: int = 0) -> Multiplier:
    period = step_epochs * steps_per_epoch
    return with_warmup(lambda s: gamma ** (s // period), warmup_steps)


def multistep(total_steps: int, steps_per_epoch: int, milestones: list[int], gamma: float,
              warmup_steps: int = 0) -> Multiplier:
    bounds = [m * steps_per_epoch for m in milestones]
    return with_warmup(lambda s: gamma ** bisect_right(bounds, s), warmup_steps)


def cosine(total_steps: int, steps_per_epoch: int, min_factor: float = 0.0,
           warmup_steps: int = 0) -> Multiplier:
    span = max(1, total_steps - warmup_steps)

    def factor(s: int) -> float:
        progress = min(1.0, max(0, s - warmup_steps) / span)
        return min_factor + (1 - min_factor) * 0.5 * (1 + math.cos(math.pi * progress))

    return with_warmup(factor, warmup_steps)
