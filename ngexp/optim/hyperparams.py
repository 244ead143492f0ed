"""Hyperparameters as functions of the preconditioner's step (as in kfac-pytorch).

Damping, KL clip and the update frequencies accept a number or a callable ``f(step) -> value``
(``step`` counts :meth:`Preconditioner.step` calls, from 0). In a config, a schedule is a node
with a ``_target_``::

    optimizer.damping:
      _target_: ngexp.optim.hyperparams.Exponential
      initial: 0.1
      decay: 0.5
      every: 1000
      minimum: 1e-4

The schedules here are stateless (the value depends only on the step), so a resumed run gets
the same values without saving them. They are the one schedule mechanism of the step-dependent
hyperparameters: K-FAC's ``damping_schedule=exponential`` is an :class:`Exponential` too
(:mod:`ngexp.optim.damping`), floored at its ``damping_min``.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ngexp.options import check, check_integer, check_positive, is_number, nested_target

#: A hyperparameter: a fixed value or a schedule of the step (int-valued for frequencies).
Hyperparameter = float | Callable[[int], float]


def value_at(value: Hyperparameter, step: int) -> Any:
    """The hyperparameter's value at ``step``."""
    return value(step) if callable(value) else value


def is_schedule_node(value: Any) -> bool:
    """A config node that builds a schedule (a mapping with a ``_target_``)."""
    return hasattr(value, "get") and value.get("_target_") is not None


def check_hyperparameter(key: str, value: Any, *, integer: bool = False,
                         allow_none: bool = False) -> None:
    """``value`` is a positive number (an integer >= 1 when ``integer``), a schedule (callable or
    config node with a ``_target_``) or, when allowed, ``None``."""
    if callable(value) or is_schedule_node(value):
        return
    if integer:
        check_integer(key, value, 1, allow_none=allow_none)
    else:
        check_positive(key, value, allow_none=allow_none)


@nested_target
@dataclass(frozen=True)
class Exponential:
    """``initial * decay^(step / every)``, floored at ``minimum`` (0 unless given: K-FAC's
    ``damping_schedule=exponential`` gives its ``damping_min``)."""

    initial: float
    decay: float = 0.5
    every: int = 1000
    minimum: float = 0.0

    def __post_init__(self) -> None:
        check_positive("initial", self.initial)
        check(is_number(self.decay) and 0 < self.decay <= 1, "decay", self.decay,
              "a number in (0, 1]")
        check_integer("every", self.every, 1)
        check(is_number(self.minimum) and self.minimum >= 0, "minimum", self.minimum,
              "a number >= 0")

    def __call__(self, step: int) -> float:
        return max(self.minimum, self.initial * self.decay ** (step / self.every))


@nested_target
@dataclass(frozen=True)
class Piecewise:
    """``values[i]`` from step ``boundaries[i - 1]`` on (``values[0]`` before the first
    boundary): e.g. inverse updates every 10 steps for 500 steps, then every 100."""

    values: Sequence[float]
    boundaries: Sequence[int]

    def __post_init__(self) -> None:
        check(len(self.values) == len(self.boundaries) + 1, "values", list(self.values),
              f"{len(self.boundaries) + 1} values for {len(self.boundaries)} boundaries")
        check(list(self.boundaries) == sorted(self.boundaries), "boundaries",
              list(self.boundaries), "increasing steps")

    def __call__(self, step: int) -> Any:
        return self.values[bisect_right(list(self.boundaries), step)]


@nested_target
@dataclass(frozen=True)
class Linear:
    """From ``start`` to ``end`` linearly over steps ``0 .. steps``, then ``end``."""

    start: float
    end: float
    steps: int

    def __post_init__(self) -> None:
        check_integer("steps", self.steps, 1)

    def __call__(self, step: int) -> float:
        return self.start + (self.end - self.start) * min(step, self.steps) / self.steps
