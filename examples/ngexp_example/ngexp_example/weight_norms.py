"""Per-layer weight norms at every evaluation: ``callbacks=[weight_norms]``.

For every module with a weight matrix or kernel (``weight.ndim >= 2``: Linear, Conv, Embedding)
named ``<layer>``, at each evaluation::

    dynamics/weight_norm/<layer>   = ||W_t||_F
    dynamics/weight_ratio/<layer>  = ||W_t||_F / ||W_0||_F     (relative=true)

with ``W_0`` the weights at the start of training (step 0; kept in checkpoints, so a resumed
run divides by the same norms). The trainer logs the metrics with the evaluation and puts the
last values in ``summary.json``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ngexp.callbacks import Callback, Trainer
from ngexp.options import configurable


def weight_matrices(model: nn.Module) -> dict[str, Tensor]:
    """Module name -> weight of every module whose ``weight`` has 2 or more dimensions (the
    model unwrapped from DistributedDataParallel / torch.compile: names without a prefix)."""
    model = getattr(model, "module", model)
    model = getattr(model, "_orig_mod", model)
    return {name: module.weight for name, module in model.named_modules()
            if isinstance(getattr(module, "weight", None), Tensor) and module.weight.ndim >= 2}


@torch.no_grad()
def frobenius_norms(model: nn.Module) -> dict[str, float]:
    """``||W||_F`` of each of :func:`weight_matrices` (float64 sums; one host sync)."""
    weights = weight_matrices(model)
    if not weights:
        return {}
    norms = torch.stack([w.detach().double().norm() for w in weights.values()]).tolist()
    return dict(zip(weights, norms, strict=True))


@configurable("callbacks", "weight_norms")
class WeightNorms(Callback):
    """See the module docstring."""

    name = "weight_norms"

    def __init__(self, relative: bool = True) -> None:
        self.relative = relative
        self.initial: dict[str, float] = {}

    def on_train_start(self, trainer: Trainer) -> None:
        if not self.initial:  # a resumed run has them from its checkpoint
            self.initial = frobenius_norms(trainer.model)

    def metrics(self, trainer: Trainer) -> dict[str, float]:
        found = {}
        for layer, norm in frobenius_norms(trainer.model).items():
            found[f"dynamics/weight_norm/{layer}"] = norm
            start = self.initial.get(layer)
            if self.relative and start:
                found[f"dynamics/weight_ratio/{layer}"] = norm / start
        return found

    def state_dict(self) -> dict[str, Any]:
        return {"initial": dict(self.initial)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.initial = dict(state.get("initial", {}))
