"""Mixed precision of a run (``trainer.precision``): the autocast context and, for fp16, the
``torch.amp.GradScaler`` (Micikevicius et al. 2018, "Mixed Precision Training", Sec. 3.2).

``bf16`` autocasts and needs no loss scaling (bfloat16 has float32's exponent range). ``fp16``
autocasts to float16 and scales the loss so that small gradients survive float16's range
(:class:`ngexp.optim.training.TrainingOptimizer` scales, unscales and steps through the scaler):
a step whose gradients overflow is skipped by the scaler, which halves its scale; the scale
doubles after 2000 finite steps. Skipped steps are not failures. A non-finite *loss* still ends
the run ``failed(nan ...)``: autocast computes the loss in float32 (cross-entropy and its
softmax run in float32), so only float16 logits beyond +-65504 make it non-finite, and a model
that produces those has diverged whatever the scale.
"""

from __future__ import annotations

import warnings
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch

from ngexp.errors import UserError

#: Autocast dtypes by ``trainer.precision`` (``fp32``: no autocast).
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(precision: str, device: torch.device) -> AbstractContextManager[Any]:
    """The context the forward passes of a run with ``precision`` run in."""
    dtype = AUTOCAST_DTYPES.get(precision)
    return nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler | None:
    """A fresh ``GradScaler`` for ``fp16`` (``None`` otherwise), or a one-line
    :class:`UserError` when this torch cannot autocast to float16 on ``device``'s type."""
    if precision != "fp16":
        return None
    unsupported = UserError(f"trainer.precision=fp16 is not supported on the {device.type} by "
                            f"torch {torch.__version__} (float16 autocast and "
                            f"torch.amp.GradScaler); choices there: fp32, bf16")
    if not hasattr(torch.amp, "GradScaler"):
        raise unsupported
    with warnings.catch_warnings():  # an unsupported dtype only warns and disables autocast
        warnings.simplefilter("ignore")
        with torch.autocast(device.type, dtype=torch.float16):
            probe = torch.ones(1, 1, device=device) @ torch.ones(1, 1, device=device)
    if probe.dtype != torch.float16:
        raise unsupported
    return torch.amp.GradScaler(device.type)
