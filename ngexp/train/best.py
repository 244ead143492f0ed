"""The best evaluation of each metric so far, and which metric ``best.pt`` follows."""

from __future__ import annotations

from collections.abc import Mapping

from ngexp.curvature.tasks import Task
from ngexp.data.bundle import DataBundle
from ngexp.metrics import better


def selection_key(data: DataBundle, task: Task) -> str:
    """The metric ``best.pt`` (and by default early stopping) follows: ``val/acc``, or
    ``test/acc`` without a validation split; the loss for tasks without accuracy."""
    split = "val" if data.val is not None else "test"
    metric = "acc" if "acc" in task.metric_names else "loss"
    return f"{split}/{metric}"


class BestMetrics:
    """The best value of every evaluated ``val/``/``test/`` metric and the step it was reached
    at (lower or higher is better by the metric's name, :func:`ngexp.metrics.better`)."""

    def __init__(self) -> None:
        self.values: dict[str, float] = {}
        self.steps: dict[str, int] = {}

    def update(self, metrics: Mapping[str, float], step: int, key: str) -> bool:
        """Take in an evaluation's ``metrics`` at ``step``; whether ``key`` improved."""
        improved = key in metrics and better(key, metrics[key], self.values.get(key))
        for name, value in metrics.items():
            if name.startswith(("test/", "val/")) and better(name, value, self.values.get(name)):
                self.values[name], self.steps[name] = value, step
        return improved
