"""ngexp: an experiment runner for second-order optimization and pruning of neural networks.

As a library: ``ngexp.KFAC``, ``ngexp.EKFAC`` and ``ngexp.NaturalGradient`` precondition the
gradients of any ``torch.optim`` optimizer (:mod:`ngexp.optim.preconditioner`); the curvature
core is :mod:`ngexp.curvature`. They are imported on first use, so ``ngexp`` on the command
line starts without loading torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

#: Public names and the modules that define them.
_EXPORTS = {
    "KFAC": "ngexp.optim.kfac",
    "EKFAC": "ngexp.optim.ekfac",
    "NaturalGradient": "ngexp.optim.natural_gradient",
    "HessianFree": "ngexp.optim.hessian_free",
    "TONGA": "ngexp.optim.tonga",
    "Preconditioner": "ngexp.optim.preconditioner",
    "hyperparams": "ngexp.optim",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'ngexp' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
