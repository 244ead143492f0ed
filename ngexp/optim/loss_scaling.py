"""What a preconditioner reads from the ``torch.amp.GradScaler`` of an fp16 loop: the current
loss scale and whether this step's gradients were found non-finite (the step it skips)."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.amp.grad_scaler import OptState


def loss_scale(scaler: torch.amp.GradScaler) -> Tensor | float:
    """The scaler's current scale (1 before its first ``scale`` or when disabled)."""
    scale = scaler._get_scale_async()  # the device tensor: no host sync
    return 1.0 if scale is None else scale


def found_inf(scaler: torch.amp.GradScaler | None, owner: str, *,
              required: bool = True) -> Tensor | None:
    """Whether the scaler found non-finite gradients at this step (a 0-dim bool on the device;
    ``None`` without an enabled scaler). The scaler must have unscaled the gradients already:
    preconditioning and KL clipping need the true gradients (else raises, naming ``owner``;
    ``None`` when not ``required``)."""
    if scaler is None or not scaler.is_enabled():
        return None
    # GradScaler keeps its per-optimizer state private; this is where unscale_ records
    # the non-finite flags that make scaler.step skip the optimizer step
    states = [state for state in scaler._per_optimizer_states.values()
              if state["stage"] is OptState.UNSCALED]
    if not states and not required:
        return None
    if not states:
        raise RuntimeError(f"{owner}(grad_scaler=...).step() needs "
                           f"scaler.unscale_(optimizer) first: call it after the backward "
                           f"and before pre.step()")
    flags = [flag for state in states for flag in state["found_inf_per_device"].values()]
    return torch.stack(flags).sum() > 0
