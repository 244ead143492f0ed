"""Optimizers: K-FAC, EKFAC and the natural gradient as preconditioners of any ``torch.optim``
optimizer, and the first-order baselines' schemas. Importing this package registers them."""

from ngexp.optim import first_order  # noqa: F401  (registers the first-order schemas)
from ngexp.optim.ekfac import EKFAC
from ngexp.optim.kfac import KFAC
from ngexp.optim.natural_gradient import NaturalGradient
from ngexp.optim.preconditioner import Preconditioner
from ngexp.optim.training import TrainingOptimizer, base_optimizer

__all__ = ["EKFAC", "KFAC", "NaturalGradient", "Preconditioner", "TrainingOptimizer",
           "base_optimizer"]
