"""``torch.optim``'s closure convention, shared by ngexp's own optimizers (Shampoo, Muon)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def closure_loss(closure: Callable[[], Any] | None) -> Any:
    """The loss ``closure()`` returns, computed with gradients enabled (an optimizer's ``step``
    runs under ``torch.no_grad``); ``None`` without a closure."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()
