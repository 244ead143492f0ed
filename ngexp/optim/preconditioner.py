"""Preconditioners: rewrite ``.grad`` with curvature and leave the step to a ``torch.optim``
optimizer (the pattern of gpauloski/kfac-pytorch and Thrandis/EKFAC-pytorch)::

    pre = ngexp.KFAC(model, fisher_type="empirical")    # hooks the model's layers
    opt = torch.optim.SGD(model.parameters(), lr=0.03, momentum=0.9)
    for x, y in loader:
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()          # MC Fisher (the default): pre.backward(loss) instead
        pre.step()               # .grad <- preconditioned gradient
        opt.step()               # momentum, weight decay, lr schedules: torch's

**Fisher type.** The empirical Fisher is read from the plain ``loss.backward()``. The Monte-Carlo
Fisher (``fisher_type="mc"``) back-propagates losses on targets sampled from the model, so it
needs :meth:`Preconditioner.backward` (``pre.backward(loss)``: the sampled passes on
statistics steps, then the training gradient); a ``step()`` that finds only a plain backward
on a statistics step raises and says so.

**The optimizer.** KL clipping and adaptive damping need the learning rate and the step the
optimizer takes. The preconditioner watches every ``torch.optim`` optimizer step (torch's global
step hooks) and acts on the optimizers that update its parameters: just before such a step it
scales the preconditioned gradients by the KL factor ``nu = min(1, sqrt(kl_clip / sum_blocks
lr^2 <V, M>)))`` (Ba et al. 2017, Sec. 5; ``V`` the preconditioned, ``M`` the raw gradient of a
block, ``lr`` its parameter group's current lr, so lr schedulers just work); adaptive damping
measures the step after it. Nothing else is hooked, and a preconditioner whose parameters no
optimizer steps warns once.

**Misuse is never silent.** ``KFAC(model.parameters())`` is a ``TypeError`` naming the fix; a
``step()`` with no statistics ever captured raises naming the missing call; an optimizer step
after a training forward without ``pre.step()`` warns once. Each preconditioner reports once,
when it is built, which parameters it preconditions and which keep the plain gradient
(:attr:`Preconditioner.coverage`; a warning on the ``ngexp`` logger when some do).

**Gradient accumulation.** Every training forward and backward since the last ``step()``
counts (``zero_grad`` before a forward starts over): k micro-batches, each loss scaled so that
the accumulated gradient is that of the mean over all of them (``loss / k`` for equal sizes),
give the curvature and direction of their concatenated batch
(:mod:`ngexp.curvature.kronecker`).

**Loss scaling** (fp16)::

    pre = ngexp.KFAC(model, grad_scaler=scaler)
    scaler.scale(loss).backward()     # or pre.backward(scaler.scale(loss))
    scaler.unscale_(opt)              # before pre.step(): the direction is of true gradients
    pre.step()
    scaler.step(opt); scaler.update()

The recorded output gradients are divided by the scale, so the curvature is that of the
unscaled loss; a step whose gradients the scaler found non-finite (and skips) leaves the
curvature statistics as they were.

Subclasses implement :meth:`_precondition_grads` (replace ``.grad`` by the directions ``V``)
and may extend :meth:`backward`, :meth:`state_dict`, :meth:`load_state_dict`, :meth:`reset`,
:meth:`log_metrics`.
"""

from __future__ import annotations

import logging
import warnings
import weakref
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.amp.grad_scaler import OptState
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)

from ngexp.curvature.capture import Capture
from ngexp.curvature.coverage import Coverage
from ngexp.curvature.tasks import TASKS, Task, build_task
from ngexp.optim.hyperparams import Hyperparameter, check_hyperparameter, value_at
from ngexp.options import check_choice, checked

log = logging.getLogger("ngexp")

#: A block of the KL sum: its parameters and <V, M> (a 0-dim tensor).
KLBlock = tuple[list[Tensor], Tensor]


def check_preconditioner(kl_clip: Any = None, task: Any = "classification", **_: Any) -> None:
    check_hyperparameter("kl_clip", kl_clip, allow_none=True)
    if not isinstance(task, Task):
        check_choice("task", task, tuple(TASKS))


@checked(check_preconditioner)
class Preconditioner:
    """Base class; see the module docstring. ``task`` (a :class:`Task` or its name) gives the
    loss the curvature is taken of, its sampled targets and output Hessian; ``kl_clip`` (a
    number, a schedule of the step, or ``None`` for off) bounds the step's KL divergence;
    ``grad_scaler`` is the ``torch.amp.GradScaler`` of an fp16 loop (module docstring)."""

    def __init__(self, model: nn.Module, *, task: str | Task = "classification",
                 kl_clip: Hyperparameter | None = 1e-2,
                 grad_scaler: torch.amp.GradScaler | None = None) -> None:
        if not isinstance(model, nn.Module):
            name = type(self).__name__
            raise TypeError(f"{name}(model, ...) takes the nn.Module itself (it hooks the "
                            f"model's layers), not {type(model).__name__}: use {name}(model)")
        self.model = model
        self.task = build_task(task)
        self.kl_clip = kl_clip
        #: Calls of :meth:`step` so far: the step that hyperparameter schedules read.
        self.steps = 0
        self.capture = Capture(model, accumulate=True)
        self.grad_scaler = grad_scaler
        if grad_scaler is not None:
            self.capture.grad_scale = self._loss_scale
        self.keep_masks: dict[Tensor, Tensor] = {}
        trained = [p for p in model.parameters() if p.requires_grad]
        if not trained:
            raise ValueError(f"{type(self).__name__}: the model has no parameter that requires "
                             f"grad")
        device = trained[0].device
        self._kl_scale = torch.ones((), device=device)
        self._pending_kl: tuple[float, list[KLBlock]] | None = None
        self._targets: Tensor | None = None
        self._loss: Tensor | None = None
        self._covers: weakref.WeakKeyDictionary[torch.optim.Optimizer, bool] = \
            weakref.WeakKeyDictionary()
        self._warned: set[str] = set()
        own = weakref.ref(self)

        def before(optimizer: torch.optim.Optimizer, *_: Any) -> None:
            live = own()
            if live is not None:
                live._before_optimizer_step(optimizer)

        def after(optimizer: torch.optim.Optimizer, *_: Any) -> None:
            live = own()
            if live is not None and live._covered(optimizer):
                live._after_optimizer_step(optimizer)

        self._hooks = [register_optimizer_step_pre_hook(before),
                       register_optimizer_step_post_hook(after)]
        weakref.finalize(self, _remove_handles, list(self._hooks))
        #: Which parameters this preconditioner covers (:mod:`ngexp.curvature.coverage`).
        self.coverage = Coverage.of(model, self._covered_parameters())
        line = self.coverage.describe(type(self).__name__)
        (log.warning if self.coverage.plain else log.info)("%s", line)

    # ------------------------------------------------------------------ public API
    def backward(self, loss: Tensor, outputs: Tensor | None = None,
                 targets: Tensor | None = None) -> None:
        """Fill ``.grad`` from ``loss`` (a mean over the batch's terms, as ``F.cross_entropy``'s
        default) and record what this preconditioner needs from the backward pass. ``outputs``
        defaults to the model output of the last forward; ``targets`` are needed by adaptive
        damping only."""
        self._begin_backward(loss, targets)
        loss.backward()

    @torch.no_grad()
    def step(self) -> None:
        """Replace the ``.grad`` of the preconditioned parameters by their directions."""
        self._warn_unused_kl()
        blocks = self._precondition_grads()
        bound = None if self.kl_clip is None else value_at(self.kl_clip, self.steps)
        if bound is not None and blocks:
            self._pending_kl = (bound, blocks)
        self.capture.forwarded = False
        self.steps += 1
        self._arm(self.steps)

    def restrict_to(self, keep_masks: Mapping[Tensor, Tensor]) -> None:
        """Hold the coordinates of a parameter where its mask (same shape, read at every step:
        it may change in place) is 0 at zero, e.g. pruned weights. Preconditioners whose step
        couples coordinates in a solve (the natural gradient) solve in the subspace of the
        others; for the rest, masked gradients and re-masked weights suffice."""
        self.keep_masks = dict(keep_masks)

    def reset(self) -> None:
        """Forget the curvature, e.g. after pruning changed the network; schedules keep their
        step."""
        self.capture.clear()
        self._arm(self.steps)

    def log_metrics(self) -> dict[str, float]:
        """Scalars for TensorBoard's ``optim/`` group; reading them synchronizes the device."""
        if self.kl_clip is None:
            return {}
        return {"kl_scale": float(self._kl_scale)}

    def state_dict(self) -> dict[str, Any]:
        """Plain tensors and containers (loadable with ``torch.load(weights_only=True)``)."""
        return {"steps": self.steps, "kl_scale": self._kl_scale.clone()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.steps = int(state["steps"])
        self._kl_scale.copy_(state["kl_scale"])
        self.capture.clear()
        self._arm(self.steps)

    def remove(self) -> None:
        """Detach every hook (the model and the optimizer steps are left alone afterwards)."""
        self.capture.remove()
        _remove_handles(self._hooks)

    # ------------------------------------------------------------------ for subclasses
    def _covered_parameters(self) -> list[nn.Parameter]:
        """The parameters whose gradient this preconditioner rewrites (default: all)."""
        return [p for p in self.model.parameters() if p.requires_grad]

    def _loss_scale(self) -> Tensor | float:
        """The grad scaler's current scale (1 before its first ``scale`` or when disabled)."""
        assert self.grad_scaler is not None
        scale = self.grad_scaler._get_scale_async()  # the device tensor: no host sync
        return 1.0 if scale is None else scale

    def _scaler_found_inf(self) -> Tensor | None:
        """Whether the grad scaler found non-finite gradients at this step (a 0-dim bool on
        the device; ``None`` without an enabled scaler). The scaler must have unscaled the
        gradients already: preconditioning and KL clipping need the true gradients."""
        scaler = self.grad_scaler
        if scaler is None or not scaler.is_enabled():
            return None
        # GradScaler keeps its per-optimizer state private; this is where unscale_ records
        # the non-finite flags that make scaler.step skip the optimizer step
        states = [state for state in scaler._per_optimizer_states.values()
                  if state["stage"] is OptState.UNSCALED]
        if not states:
            raise RuntimeError(f"{type(self).__name__}(grad_scaler=...).step() needs "
                               f"scaler.unscale_(optimizer) first: call it after the backward "
                               f"and before pre.step()")
        flags = [flag for state in states for flag in state["found_inf_per_device"].values()]
        return torch.stack(flags).sum() > 0

    def _precondition_grads(self) -> list[KLBlock]:
        """Replace the ``.grad`` ``M`` of the preconditioned parameters by their directions
        ``V``; return the KL blocks ``(params, <V, M>)``."""
        raise NotImplementedError

    def _arm(self, step: int) -> None:
        """Set what the capture records in the forward/backward of step ``step``."""

    def _begin_backward(self, loss: Tensor, targets: Tensor | None) -> None:
        self._warn_unused_kl()
        self._targets = targets
        self._loss = loss.detach()
        if self.grad_scaler is not None:  # the scaled loss of an fp16 loop
            self._loss = self._loss / self._loss_scale()

    def _after_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Runs after an optimizer step that updated the preconditioned parameters."""

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, stacklevel=3)

    # ------------------------------------------------------------------ optimizer hooks
    def _covered(self, optimizer: torch.optim.Optimizer) -> bool:
        """Whether ``optimizer`` updates any parameter of the model."""
        if optimizer not in self._covers:
            mine = {id(p) for p in self.model.parameters()}
            self._covers[optimizer] = any(id(p) in mine for group in optimizer.param_groups
                                          for p in group["params"])
        return self._covers[optimizer]

    def _before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if not self._covered(optimizer):
            return
        if self.capture.forwarded:
            self._warn_once("no step", f"{optimizer.__class__.__name__}.step() after a "
                            f"training forward without {type(self).__name__}.step(): this "
                            f"update used the plain gradients")
        if self._pending_kl is None:
            return
        bound, blocks = self._pending_kl
        self._pending_kl = None
        lrs = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
        kl = torch.stack([lrs.get(id(params[0]), 0.0) ** 2 * product
                          for params, product in blocks]).sum()
        tiny = torch.finfo(torch.float32).tiny
        self._kl_scale = (bound / kl.clamp_min(tiny)).sqrt().clamp(max=1.0)
        grads = [p.grad for params, _ in blocks for p in params if p.grad is not None]
        torch._foreach_mul_(grads, self._kl_scale)

    def _warn_unused_kl(self) -> None:
        if self._pending_kl is not None:
            self._pending_kl = None
            self._warn_once("kl", f"{type(self).__name__}: kl_clip was not applied because no "
                            f"torch.optim optimizer stepped the preconditioned parameters "
                            f"after step() (KL clipping reads the learning rate from it)")


def _remove_handles(handles: list[Any]) -> None:
    for handle in handles:
        handle.remove()
    handles.clear()
