"""Early stopping (config group ``callbacks``): end training when a metric stops improving.

After each evaluation the monitored metric (default: the one ``best.pt`` follows, ``val/acc``
or ``test/acc``, a loss for tasks without accuracy) counts as improved when it beats the best
value so far by more than ``min_delta``, in the metric's direction (``mode=auto``: lower is
better for losses, ``ngexp.metrics``; or ``min``/``max``). After ``patience`` evaluations
without improvement the run stops, as ``completed`` with the reason, and its last checkpoint is
written (Lightning's ``EarlyStopping`` semantics).
"""

from __future__ import annotations

from typing import Any, Literal

from ngexp.callbacks import Callback, Trainer
from ngexp.metrics import lower_is_better
from ngexp.options import check_integer, check_nonnegative, checked, configurable


def check_early_stopping(patience: int, min_delta: float, **_: Any) -> None:
    check_integer("patience", patience, 1)
    check_nonnegative("min_delta", min_delta)


@configurable("callbacks", "early_stopping")
@checked(check_early_stopping)
class EarlyStopping(Callback):
    """See the module docstring; its best value and count are saved in checkpoints."""

    name = "early_stopping"

    def __init__(self, monitor: str | None = None, patience: int = 3, min_delta: float = 0.0,
                 mode: Literal["auto", "min", "max"] = "auto") -> None:
        self.monitor, self.patience, self.min_delta, self.mode = monitor, patience, min_delta, mode
        self.best: float | None = None
        self.waited = 0

    def on_evaluation(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        key = self.monitor or trainer.selection_key()
        if key not in metrics:
            return
        value = metrics[key]
        lower = lower_is_better(key) if self.mode == "auto" else self.mode == "min"
        improved = self.best is None or (value < self.best - self.min_delta if lower
                                         else value > self.best + self.min_delta)
        if improved:
            self.best, self.waited = value, 0
            return
        self.waited += 1
        if self.waited >= self.patience:
            trainer.request_stop(f"early stop: {key} did not improve by more than "
                                 f"{self.min_delta} for {self.patience} evaluations "
                                 f"(best {self.best:.4g})")

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "waited": self.waited}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.waited = state.get("best"), state.get("waited", 0)
