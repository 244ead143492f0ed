"""KL clipping (Ba et al. 2017, Sec. 5): just before the optimizer steps the preconditioned
gradients, scale them by ``nu = min(1, sqrt(kl_clip / sum_blocks lr^2 <V, M>))`` (``V`` the
preconditioned, ``M`` the raw gradient of a block, ``lr`` its parameter group's current lr, so
lr schedulers just work)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ngexp.optim.hyperparams import Hyperparameter, value_at

#: A block of the KL sum: its parameters and <V, M> (a 0-dim tensor).
KLBlock = tuple[list[Tensor], Tensor]


class KLClip:
    """The KL bound ``kl_clip`` (a number, a schedule of the step, or ``None`` for off) and the
    blocks of the last preconditioning step, waiting for the optimizer; :attr:`scale` is the
    last ``nu`` (a 0-dim tensor on ``device``). ``warn(key, message)`` says once that blocks
    of ``owner`` (a preconditioner's name) went unused."""

    def __init__(self, kl_clip: Hyperparameter | None, device: torch.device, owner: str,
                 warn: Callable[[str, str], None]) -> None:
        self.kl_clip, self.owner, self.warn = kl_clip, owner, warn
        self.scale = torch.ones((), device=device)
        self._pending: tuple[float, list[KLBlock]] | None = None
        #: Whether a GradScaler skips the optimizer step the blocks wait for (0-dim, or None).
        self._skipped: Tensor | None = None

    def arm(self, step: int, blocks: list[KLBlock], skipped: Tensor | None = None) -> None:
        """Keep ``blocks`` for the next optimizer step (when clipping is on at ``step``);
        ``skipped``: the scaler's non-finite flag, under which no optimizer step comes."""
        bound = None if self.kl_clip is None else value_at(self.kl_clip, step)
        if bound is not None and blocks:
            self._pending, self._skipped = (bound, blocks), skipped

    def apply(self, optimizer: torch.optim.Optimizer) -> None:
        """Scale the pending blocks' gradients by ``nu`` with ``optimizer``'s learning rates."""
        if self._pending is None:
            return
        bound, blocks = self._pending
        self._pending = None
        lrs = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
        kl = torch.stack([lrs.get(id(params[0]), 0.0) ** 2 * product
                          for params, product in blocks]).sum()
        tiny = torch.finfo(torch.float32).tiny
        self.scale = (bound / kl.clamp_min(tiny)).sqrt().clamp(max=1.0)
        grads = [p.grad for params, _ in blocks for p in params if p.grad is not None]
        torch._foreach_mul_(grads, self.scale)

    def discard(self) -> None:
        """Drop blocks no optimizer step used, warning once that there were some -- unless
        the GradScaler skipped that step (its overflow; one host sync, on such steps only)."""
        if self._pending is not None:
            self._pending = None
            if self._skipped is not None and bool(self._skipped):
                return
            self.warn("kl", f"{self.owner}: kl_clip was not applied because no torch.optim "
                      f"optimizer stepped the preconditioned parameters after step() (KL "
                      f"clipping reads the learning rate from it)")
