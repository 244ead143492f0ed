"""Extension points of the training engine.

A :class:`Callback` sees the engine at fixed points of every step. The order within one
training step is::

    on_step_start        (e.g. a gradual pruning schedule prunes here)
    forward, loss, backward (second-order optimizers capture curvature during this)
    before_optimizer_step (e.g. mask gradients, before any preconditioning)
    gradient clipping, optimizer.step(), lr schedule step
    after_optimizer_step  (e.g. re-apply masks to the weights)

``on_train_start`` runs at the start of every training session, after a resumed run's state
(including the callback's own ``load_state_dict``) is restored. Callbacks with state implement
``state_dict``/``load_state_dict``; the engine saves it in every checkpoint under the callback's
``name``. ``metrics`` returns scalars (keys with a TensorBoard prefix such as ``prune/``) that the
engine logs at each evaluation and puts in ``summary.json``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ngexp.train.engine import Engine


class Callback:
    """Base class: every hook does nothing."""

    name: str = "callback"

    def on_train_start(self, engine: Engine) -> None: ...

    def on_step_start(self, engine: Engine) -> None: ...

    def before_optimizer_step(self, engine: Engine) -> None: ...

    def after_optimizer_step(self, engine: Engine) -> None: ...

    def on_epoch_end(self, engine: Engine) -> None: ...

    def on_train_end(self, engine: Engine) -> None: ...

    def metrics(self, engine: Engine) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None: ...
