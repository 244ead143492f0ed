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

**torch.compile.** A compiled model (``cmodel = torch.compile(model)``, the preconditioner
built on ``model``) may be called on every step: on the steps that capture, dynamo breaks its
graph around the hooks' recording, which runs eagerly on the real tensors between the
compiled graphs (the same statistics as eager, to the rounding of the compiled kernels). Such
a step, and the later ones, run as several graphs; to keep the other steps in one graph, call
the eager model where the preconditioner captures (as ``ngexp train`` does)::

    outputs = (model if pre.captures_next_forward else cmodel)(x)

``torch.func.functional_call`` with the model's own parameters
(``dict(model.named_parameters())``) is the plain loop; with other tensors in place of the
covered parameters, their gradients would not reach ``.grad`` and the statistics would be of
them, so a training forward raises.

Subclasses implement :meth:`_precondition_grads` (replace ``.grad`` by the directions ``V``)
and may extend :meth:`backward`, :meth:`state_dict`, :meth:`load_state_dict`, :meth:`reset`,
:meth:`log_metrics`. The parts beside the base class: KL clipping in
:mod:`ngexp.optim.kl_clip`, the optimizer step hooks in :mod:`ngexp.optim.optimizer_hooks`,
the grad scaler's view in :mod:`ngexp.optim.loss_scaling`.
"""

from __future__ import annotations

import functools
import logging
import warnings
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ngexp.curvature.capture import Capture
from ngexp.curvature.coverage import Coverage
from ngexp.curvature.tasks import TASKS, Task, build_task
from ngexp.distributed.world import current
from ngexp.errors import UserError
from ngexp.optim.hyperparams import Hyperparameter, check_hyperparameter
from ngexp.optim.kl_clip import KLBlock, KLClip
from ngexp.optim.loss_scaling import found_inf, loss_scale
from ngexp.optim.optimizer_hooks import OptimizerWatch
from ngexp.options import check_choice, checked

log = logging.getLogger("ngexp")

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

    #: Whether the directions are the same on every rank of a data-parallel run: statistics
    #: reduced over the ranks, or computed from the DDP-averaged gradients alone. A subclass
    #: that does neither would precondition each rank differently, so it raises there.
    data_parallel: ClassVar[bool] = False

    def __init__(self, model: nn.Module, *, task: str | Task = "classification",
                 kl_clip: Hyperparameter | None = 1e-2,
                 grad_scaler: torch.amp.GradScaler | None = None) -> None:
        if not isinstance(model, nn.Module):
            name = type(self).__name__
            raise TypeError(f"{name}(model, ...) takes the nn.Module itself (it hooks the "
                            f"model's layers), not {type(model).__name__}: use {name}(model)")
        if current().distributed and not self.data_parallel:
            raise UserError(f"{type(self).__name__} does not declare data-parallel support "
                            f"(Preconditioner.data_parallel): its statistics would differ "
                            f"between the {current().size} ranks; run it in one process, or "
                            f"reduce them over the ranks and set data_parallel = True")
        self.model = model
        self.task = build_task(task)
        self.kl_clip = kl_clip
        #: Calls of :meth:`step` so far: the step that hyperparameter schedules read.
        self.steps = 0
        self.capture = Capture(model, accumulate=True)
        self.capture.owner = type(self).__name__
        self.grad_scaler = grad_scaler
        if grad_scaler is not None:
            self.capture.grad_scale = functools.partial(loss_scale, grad_scaler)
        self.keep_masks: dict[Tensor, Tensor] = {}
        trained = [p for p in model.parameters() if p.requires_grad]
        if not trained:
            raise ValueError(f"{type(self).__name__}: the model has no parameter that requires "
                             f"grad")
        #: Warnings given once each (by key).
        self._warnings = OnceWarnings()
        self._kl = KLClip(kl_clip, trained[0].device, type(self).__name__, self._warnings.warn)
        self._targets: Tensor | None = None
        self._loss: Tensor | None = None
        self._watch = OptimizerWatch(model, self, self._before_optimizer_step,
                                     self._after_optimizer_step)
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
        self._kl.discard()
        blocks = self._precondition_grads()
        skipped = found_inf(self.grad_scaler, type(self).__name__, required=False)
        self._kl.arm(self.steps, blocks, skipped)
        self.capture.forwarded = False
        self.steps += 1
        self._arm(self.steps)

    @property
    def captures_next_forward(self) -> bool:
        """Whether the hooks record the next training forward (module docstring: a compiled
        model compiles whole on the other steps only)."""
        return self.capture.active or self.capture.watch_model

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
        return {"kl_scale": float(self._kl.scale)}

    def state_dict(self) -> dict[str, Any]:
        """Plain tensors and containers (loadable with ``torch.load(weights_only=True)``)."""
        return {"steps": self.steps, "kl_scale": self._kl.scale.clone()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.steps = int(state["steps"])
        self._kl.scale.copy_(state["kl_scale"])
        self.capture.clear()
        self._arm(self.steps)

    def remove(self) -> None:
        """Detach every hook (the model and the optimizer steps are left alone afterwards)."""
        self.capture.remove()
        self._watch.remove()

    # ------------------------------------------------------------------ for subclasses
    def _covered_parameters(self) -> list[nn.Parameter]:
        """The parameters whose gradient this preconditioner rewrites (default: all)."""
        return [p for p in self.model.parameters() if p.requires_grad]

    def _precondition_grads(self) -> list[KLBlock]:
        """Replace the ``.grad`` ``M`` of the preconditioned parameters by their directions
        ``V``; return the KL blocks ``(params, <V, M>)``."""
        raise NotImplementedError

    def _arm(self, step: int) -> None:
        """Set what the capture records in the forward/backward of step ``step``."""

    def _begin_backward(self, loss: Tensor, targets: Tensor | None) -> None:
        self._kl.discard()
        self._targets = targets
        self._loss = loss.detach()
        if self.grad_scaler is not None:  # the scaled loss of an fp16 loop
            self._loss = self._loss / loss_scale(self.grad_scaler)

    def _after_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Runs after an optimizer step that updated the preconditioned parameters."""

    # ------------------------------------------------------------------ optimizer hooks
    def _before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Runs before an optimizer step that updates the preconditioned parameters: warns
        when ``step()`` was skipped, applies KL clipping."""
        if self.capture.forwarded:
            self._warnings.warn("no step", f"{optimizer.__class__.__name__}.step() after a "
                            f"training forward without {type(self).__name__}.step(): this "
                            f"update used the plain gradients")
        self._kl.apply(optimizer)


class OnceWarnings:
    """Python warnings given once each, by key."""

    def __init__(self) -> None:
        self._given: set[str] = set()

    def warn(self, key: str, message: str) -> None:
        """Warn with ``message`` unless ``key`` was warned before (the warning points at the
        caller's caller)."""
        if key not in self._given:
            self._given.add(key)
            warnings.warn(message, stacklevel=3)
