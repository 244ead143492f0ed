"""Build what the engine steps from a composed ``optimizer`` config node."""

from __future__ import annotations

import inspect

import torch
from hydra.utils import get_object
from omegaconf import DictConfig, OmegaConf
from torch import nn

from ngexp.curvature.tasks import Task
from ngexp.optim.preconditioner import Preconditioner
from ngexp.optim.training import TrainingOptimizer, base_optimizer
from ngexp.targets import check_targets, instantiate

#: Keys of a preconditioner's config that configure its base optimizer.
BASE_KEYS = tuple(inspect.signature(base_optimizer).parameters)[1:]


def build_optimizer(cfg: DictConfig, model: nn.Module, task: Task,
                    grad_scaler: torch.amp.GradScaler | None = None) -> TrainingOptimizer:
    """A torch optimizer for ``_target_: torch.optim.*`` or another optimizer class or builder
    (given ``params``, or ``model`` when it takes one: :class:`ngexp.optim.muon.Muon`); for a
    preconditioner's target, the preconditioner (hooked to ``model``, with ``task``, and
    ``grad_scaler`` when given: it receives the scaled loss's gradients) and its
    :func:`base_optimizer`."""
    params = [p for p in model.parameters() if p.requires_grad]
    check_targets(cfg, "optimizer")  # before get_object imports what it names
    target = get_object(cfg._target_)
    if not (isinstance(target, type) and issubclass(target, Preconditioner)):
        takes_model = "model" in inspect.signature(target).parameters
        optimizer = instantiate(cfg, key="optimizer",
                                **({"model": model} if takes_model else {"params": params}))
        return TrainingOptimizer(optimizer, grad_scaler=grad_scaler)
    options = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(options, dict)
    base = {key: options.pop(key) for key in BASE_KEYS}
    scaling = {} if grad_scaler is None else {"grad_scaler": grad_scaler}
    preconditioner = instantiate(options, key="optimizer", model=model, task=task, **scaling)
    return TrainingOptimizer(base_optimizer(params, **base), preconditioner, grad_scaler)
