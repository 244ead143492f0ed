"""Optimizers. Importing this package registers every optimizer schema."""

from __future__ import annotations

import torch
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig
from torch import nn

from ngexp.optim import ekfac, first_order, kfac, natural_gradient  # noqa: F401  (schemas)
from ngexp.optim.base import ModelOptimizer


def build_optimizer(cfg: DictConfig, model: nn.Module) -> torch.optim.Optimizer:
    """Instantiate ``cfg``: a :class:`ModelOptimizer` gets the model, others its parameters."""
    factory = instantiate(cfg, _partial_=True)
    if issubclass(get_class(cfg._target_), ModelOptimizer):
        return factory(model=model)
    return factory(params=[p for p in model.parameters() if p.requires_grad])
