"""When to prune and to what sparsity.

Two levels:

- *locality steps* within one pruning event (Laurent et al. 2020, Sec. 3.3): the event goes from
  the current sparsity to its target in ``steps`` steps with the scores recomputed in between, on
  a ``linear`` ladder of sparsities or an ``exponential`` one where every step removes the same
  fraction of the remaining weights;
- *events* during training: ``oneshot`` (once, at the start of the last ``finetune_epochs``
  epochs), ``iterative`` (Han et al. 2015: every ``round_epochs`` epochs from ``start_epoch``
  remove ``rate_per_round`` of the remaining weights until the target) and ``gradual`` (Zhu &
  Gupta 2017, Eq. 1: s_t = s_f + (s_i - s_f) (1 - (t - t0) / (n dt))^3 every ``frequency``
  steps from ``start_step`` to ``end_step``).
"""

from __future__ import annotations

import math

from ngexp.errors import OptionError


def locality_ladder(current: float, target: float, steps: int, kind: str) -> list[float]:
    """Sparsities after each of ``steps`` steps from ``current`` to ``target`` (last = target).

    ``linear``: s_k = s_0 + (s_T - s_0) k / K; ``exponential``: the density 1 - s shrinks by
    the same factor each step, (1 - s_k) = (1 - s_0) ((1 - s_T) / (1 - s_0))^(k / K).
    """
    if kind == "linear":
        return [current + (target - current) * k / steps for k in range(1, steps + 1)]
    if kind == "exponential":
        ratio = (1 - target) / (1 - current)
        return [1 - (1 - current) * ratio ** (k / steps) for k in range(1, steps + 1)]
    raise OptionError(f"prune.step_schedule={kind!r} is invalid: expected one of linear, "
                     f"exponential")


def cubic_sparsity(step: int, initial: float, final: float, start: int, end: int) -> float:
    """Zhu & Gupta (2017) Eq. 1 at training step ``step``, constant outside ``[start, end]``."""
    progress = min(max((step - start) / (end - start), 0.0), 1.0)
    return final + (initial - final) * (1 - progress) ** 3


def iterative_sparsities(target: float, rate: float) -> list[float]:
    """Sparsity after each round removing ``rate`` of the remaining weights, the last one
    clipped to ``target``: 1 - (1 - rate)^r for r = 1 .. ceil(log(1 - target) / log(1 - rate))."""
    rounds = max(1, math.ceil(math.log(1 - target) / math.log(1 - rate) - 1e-9))
    return [min(1 - (1 - rate) ** r, target) for r in range(1, rounds + 1)]


def pruning_events(schedule: str, *, target: float, steps_per_epoch: int, total_steps: int,
                   finetune_epochs: int = 0, rate_per_round: float = 0.2, round_epochs: int = 1,
                   start_epoch: int = 0, initial_sparsity: float = 0.0, start_step: int = 0,
                   end_step: int | None = None, frequency: int = 100) -> dict[int, float]:
    """Training step (optimizer steps done when it happens) -> target sparsity of each event.

    ``gradual`` ends at ``end_step``, or by default where the last ``finetune_epochs`` epochs
    start; an event at ``total_steps`` happens at the end of training.
    """
    finetune_start = max(0, total_steps - finetune_epochs * steps_per_epoch)
    if schedule == "oneshot":
        return {finetune_start: target}
    if schedule == "iterative":
        first = start_epoch * steps_per_epoch
        return {first + r * round_epochs * steps_per_epoch: sparsity
                for r, sparsity in enumerate(iterative_sparsities(target, rate_per_round))}
    if schedule == "gradual":
        end = finetune_start if end_step is None else end_step
        if end <= start_step:
            raise OptionError(f"prune.end_step={end} is invalid: expected a step after "
                              f"prune.start_step={start_step} (training has {total_steps} steps; "
                              f"the default end is where the last prune.finetune_epochs start)")
        steps = list(range(start_step, end, frequency)) + [end]
        return {t: cubic_sparsity(t, initial_sparsity, target, start_step, end) for t in steps}
    raise OptionError(f"prune.schedule={schedule!r} is invalid: expected one of oneshot, "
                     f"iterative, gradual")
