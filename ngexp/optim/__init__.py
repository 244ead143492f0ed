"""Optimizers: K-FAC, EKFAC, the natural gradient, Hessian-free and TONGA as preconditioners
of any ``torch.optim`` optimizer, the first-order baselines' schemas, and Shampoo, SOAP and
Muon. Importing this package registers them."""

from ngexp.optim import first_order, soap  # noqa: F401  (registers their schemas)
from ngexp.optim.ekfac import EKFAC
from ngexp.optim.hessian_free import HessianFree
from ngexp.optim.kfac import KFAC
from ngexp.optim.muon import Muon
from ngexp.optim.natural_gradient import NaturalGradient
from ngexp.optim.preconditioner import Preconditioner
from ngexp.optim.shampoo import Shampoo
from ngexp.optim.tonga import TONGA
from ngexp.optim.training import TrainingOptimizer, base_optimizer

__all__ = ["EKFAC", "KFAC", "TONGA", "HessianFree", "Muon", "NaturalGradient", "Preconditioner",
           "Shampoo", "TrainingOptimizer", "base_optimizer"]
