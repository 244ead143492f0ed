"""The machinery K-FAC and EKFAC share: curvature bookkeeping, damping and the outer step.

Per training step (engine order: forward, :meth:`KroneckerOptimizer.backward`, callbacks,
clipping, :meth:`KroneckerOptimizer.step`):

1. ``backward`` back-propagates the loss; on a statistics step the forward hooks of
   :class:`~ngexp.optim.curvature.CurvatureCapture` were armed, and the output gradients of the
   Fisher type are recorded (one extra pass per Monte-Carlo sample for ``fisher_type=mc``).
2. ``step`` folds the batch factors into running averages every ``cov_update_freq`` steps
   (``A <- e A + (1 - e) A_batch`` with ``e = min(stat_decay, 1 - 1/k)`` at the ``k``-th update:
   the first estimate replaces -- no identity initialization -- and early ones are averaged with
   equal weights), eigendecomposes all factors every ``inv_update_freq`` steps (one batched
   ``eigh`` per factor size, :func:`~ngexp.optim.linalg.robust_eigh`), and preconditions each
   covered layer's gradient ``M = [dW | db]`` in the Kronecker eigenbasis,

       V = U_G ((U_G^T M U_A) / D) U_A^T,

   with the subclass's denominator ``D`` (K-FAC: damped eigenvalue products; EKFAC: ``s +
   damping``; K-FAC's factored damping multiplies by the damped inverse factors instead).
   Batch statistics that are not finite are skipped (no host sync).
3. KL clipping (Ba et al. 2017, Sec. 5): ``V <- nu V`` with ``nu = min(1, sqrt(kl_clip /
   (lr^2 sum_layers <V, M>)))``, a tensor (no sync).
4. The outer step is SGD on the direction, for preconditioned and uncovered parameters alike:
   ``d = V + weight_decay w`` (uncovered: ``d = grad + weight_decay w``), ``buf <- momentum buf +
   d``, ``w <- w - lr buf``. Weight decay is thus applied after preconditioning (decoupled from the
   curvature, not added to the damping).

Damping (``damping_schedule``): ``constant``; ``exponential``: ``damping * damping_decay^(t /
damping_decay_steps)``, floored at ``damping_min``; ``adaptive``: the Levenberg-Marquardt rule of
Martens & Grosse (2015, Sec. 6.5) every ``adapt_interval`` (T1) steps: ``rho = (h(w + delta) -
h(w)) / M(delta)`` on the step's own batch, damping times ``omega = (19/20)^T1`` if ``rho > 3/4``,
divided by it if ``rho < 1/4``, clamped to ``[damping_min, damping_max]``. The quadratic model is
the cheap one given by the Kronecker curvature itself, evaluated in its eigenbasis:
``M(delta) = <grad, delta> + 1/2 sum_layers <C + damping, (U_G^T Delta U_A)^2> + 1/2 damping
|delta_uncovered|^2`` with ``C`` the undamped eigenvalues (K-FAC: ``lambda_G lambda_A^T``, EKFAC:
``s``), so no extra curvature-vector product is needed; ``h(w + delta)`` costs one extra forward
pass without gradients (buffers such as BatchNorm running statistics are restored after it). This
needs the batch ``targets`` in :meth:`backward`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ngexp.config import check, check_choice
from ngexp.optim.base import ModelOptimizer
from ngexp.optim.curvature import (
    FISHER_TYPES,
    KFAC_APPROXIMATIONS,
    CurvatureCapture,
    KroneckerLayer,
    record_backward,
)
from ngexp.optim.first_order import check_common
from ngexp.optim.linalg import neutral_eigen, robust_eigh
from ngexp.train.tasks import Task

log = logging.getLogger("ngexp")

DAMPING_SCHEDULES = ("constant", "exponential", "adaptive")

#: Keys of a layer's optimizer state that :meth:`KroneckerOptimizer.curvature` reports.
CURVATURE_KEYS = ("A", "G", "U_A", "U_G", "lambda_A", "lambda_G", "pi", "s")


@dataclass
class KroneckerConfig:
    """Options shared by K-FAC and EKFAC (module docstring of :mod:`ngexp.optim.kronecker`)."""

    lr: float = 0.03
    momentum: float = 0.9
    weight_decay: float = 0.0
    damping: float = 0.1
    damping_schedule: str = "constant"  # constant | exponential | adaptive
    damping_decay: float = 0.5  # exponential: factor per damping_decay_steps
    damping_decay_steps: int = 1000
    damping_min: float = 1e-6  # floor of exponential and adaptive damping
    damping_max: float = 1e3  # ceiling of adaptive damping
    adapt_interval: int = 5  # adaptive: steps between Levenberg-Marquardt updates (T1)
    stat_decay: float = 0.95
    cov_update_freq: int = 10
    inv_update_freq: int = 100
    kl_clip: float | None = 0.01
    fisher_type: str = "mc"  # mc | empirical
    mc_samples: int = 1
    kfac_approx: str = "expand"  # expand | reduce

    def __post_init__(self) -> None:
        check_common(self.lr, self.weight_decay, self.momentum)
        check(self.damping > 0, "optimizer.damping", self.damping, "a number > 0")
        check_choice("optimizer.damping_schedule", self.damping_schedule, DAMPING_SCHEDULES)
        check(0 < self.damping_decay <= 1, "optimizer.damping_decay", self.damping_decay,
              "a number in (0, 1]")
        check(self.damping_decay_steps >= 1, "optimizer.damping_decay_steps",
              self.damping_decay_steps, "an integer >= 1")
        check(0 < self.damping_min <= self.damping, "optimizer.damping_min", self.damping_min,
              f"a number in (0, optimizer.damping={self.damping}]")
        check(self.damping_max >= self.damping, "optimizer.damping_max", self.damping_max,
              f"a number >= optimizer.damping={self.damping}")
        check(self.adapt_interval >= 1, "optimizer.adapt_interval", self.adapt_interval,
              "an integer >= 1")
        check(0 <= self.stat_decay < 1, "optimizer.stat_decay", self.stat_decay,
              "a number in [0, 1)")
        check(self.cov_update_freq >= 1, "optimizer.cov_update_freq", self.cov_update_freq,
              "an integer >= 1")
        check(self.inv_update_freq >= 1, "optimizer.inv_update_freq", self.inv_update_freq,
              "an integer >= 1")
        check(self.kl_clip is None or self.kl_clip > 0, "optimizer.kl_clip", self.kl_clip,
              "null or a number > 0")
        check_choice("optimizer.fisher_type", self.fisher_type, FISHER_TYPES)
        check(self.mc_samples >= 1 and (self.fisher_type == "mc" or self.mc_samples == 1),
              "optimizer.mc_samples", self.mc_samples,
              "an integer >= 1 (and 1 unless optimizer.fisher_type=mc)")
        check_choice("optimizer.kfac_approx", self.kfac_approx, KFAC_APPROXIMATIONS)


def kronecker_eigenvalues(state: dict[str, Tensor]) -> Tensor:
    """Eigenvalues ``lambda_G lambda_A^T`` of ``G (x) A`` in its eigenbasis, ``(groups, d_out,
    d_in)``."""
    return state["lambda_G"][:, :, None] * state["lambda_A"][:, None, :]


def precondition(grad: Tensor, basis_a: Tensor, basis_g: Tensor, denominator: Tensor) -> Tensor:
    """``U_G ((U_G^T M U_A) / D) U_A^T`` for ``M = grad (groups, d_out, d_in)``, eigenbases
    ``basis_a (groups, d_in, d_in)``, ``basis_g (groups, d_out, d_out)`` and ``D`` shaped like
    ``M``: the inverse of ``U diag(D) U^T``, ``U = U_G (x) U_A``, applied to ``vec(M)``."""
    return basis_g @ ((basis_g.mT @ grad @ basis_a) / denominator) @ basis_a.mT


class KroneckerOptimizer(ModelOptimizer):
    """Base of :class:`~ngexp.optim.kfac.KFAC` and :class:`~ngexp.optim.ekfac.EKFAC`.

    Built as ``Subclass(model, **options)`` with the options of :attr:`config_class` (validated
    by it; its defaults apply). Subclasses define the curvature eigenvalues in the Kronecker
    eigenbasis (:meth:`_eigenvalues`), may precondition differently (:meth:`_precondition`) and
    update their own terms after the statistics (:meth:`_update_scaling`).
    """

    config_class: ClassVar[type[KroneckerConfig]] = KroneckerConfig

    def __init__(self, model: nn.Module, **options: Any) -> None:
        self.options = opts = self.config_class(**options)
        super().__init__(model, {"lr": opts.lr, "momentum": opts.momentum,
                                 "weight_decay": opts.weight_decay})
        self.capture = CurvatureCapture(model)
        self.layers: list[KroneckerLayer] = self.capture.layers
        covered = {id(p) for layer in self.layers for p in layer.params}
        #: Names of trained parameters without a Kronecker factor (plain SGD-momentum step).
        self.uncovered_parameters = [name for name, p in model.named_parameters()
                                     if p.requires_grad and id(p) not in covered]
        if self.uncovered_parameters:
            log.info("%s: %d parameter tensors are not preconditioned (plain momentum step): %s",
                     type(self).__name__, len(self.uncovered_parameters),
                     ", ".join(self.uncovered_parameters))
        device = self.param_groups[0]["params"][0].device
        #: Python counters (saved in the state dict): optimizer steps taken, factor updates.
        self.counters = {"step": 0, "factor_updates": 0}
        self._damping = torch.tensor(opts.damping, device=device)
        #: Set whenever the damping is written, for subclasses that fold it into cached matrices.
        self._damping_changed = True
        self._kept_bases = torch.zeros((), dtype=torch.long, device=device)
        self._skipped_statistics = torch.zeros((), dtype=torch.long, device=device)
        self._kl_scale = torch.ones((), device=device)
        self._rho = torch.full((), float("nan"), device=device)
        self._generator: torch.Generator | None = None
        if opts.fisher_type == "mc":  # its own stream: MC targets do not shift other draws
            seed = (torch.initial_seed() + 1) % 2**63
            self._generator = torch.Generator(device).manual_seed(seed)
        self._num_terms = 1
        self._adapt_batch: tuple[Tensor, Tensor, Task, Tensor] | None = None
        self.capture.active = self._captures(0)

    # ------------------------------------------------------------------ public API
    def backward(self, loss: Tensor, *, outputs: Tensor, inputs: Tensor, task: Task,
                 targets: Tensor | None = None) -> None:
        """Fill ``.grad`` from ``loss``; on statistics steps also record the output gradients of
        the Fisher type. ``targets`` (the batch's) are needed by adaptive damping; the number of
        loss terms is read from them, else from ``outputs`` (the targets of every task share
        the leading shape ``outputs.shape[:-1]``)."""
        if self._adapting():
            if targets is None:
                raise ValueError("optimizer.damping_schedule=adaptive needs the batch targets: "
                                 "call optimizer.backward(..., targets=targets)")
            self._adapt_batch = (inputs, targets, task, loss.detach())
        if not self.capture.captured_inputs:
            loss.backward()
            return
        self._num_terms = task.num_terms(targets if targets is not None else outputs[..., 0])
        opts = self.options
        record_backward(self.capture, loss, outputs, task, opts.fisher_type, opts.mc_samples,
                        self._generator)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Update the curvature, precondition, clip and take the outer step (module docstring)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.capture.active = False
        self._update_curvature()
        updates = self._updates(self._directions())
        predicted = self._model_change(updates) if self._adapt_batch is not None else None
        torch._foreach_sub_([p for p, _ in updates], [u for _, u in updates])
        if predicted is not None:
            self._adapt_damping(predicted)
        self.counters["step"] += 1
        self._schedule_damping()
        self.capture.active = self._captures(self.counters["step"])
        return loss

    def curvature(self) -> dict[str, dict[str, Tensor]]:
        """The curvature of every covered layer that has statistics, by module name: running
        factors ``A (groups, d_in, d_in)`` and ``G (groups, d_out, d_out)`` (bias as the last
        input coordinate), after the first inverse update the eigenbases ``U_A``, ``U_G`` and
        eigenvalues ``lambda_A``, ``lambda_G``, plus the subclass's terms (K-FAC: ``pi``,
        EKFAC: scaling ``s (groups, d_out, d_in)``). Live tensors: do not modify them."""
        return {layer.name: {key: state[key] for key in CURVATURE_KEYS if key in state}
                for layer, state in self._layers_with("A")}

    def reset_state(self) -> None:
        """Forget moments and curvature (e.g. after pruning); the next forward collects fresh
        statistics and the next step recomputes the eigenbases."""
        super().reset_state()
        self.counters.update({key: 0 for key in self.counters if key != "step"})
        self.capture.clear()
        self.capture.active = True

    def log_metrics(self) -> dict[str, float]:
        metrics = {"damping": float(self._damping), "kept_bases": float(self._kept_bases),
                   "skipped_statistics": float(self._skipped_statistics)}
        if self.options.kl_clip is not None:
            metrics["kl_scale"] = float(self._kl_scale)
        if self.options.damping_schedule == "adaptive":
            metrics["rho"] = float(self._rho)
        return metrics

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["kronecker"] = {
            "counters": dict(self.counters),
            "damping": self._damping.clone(),
            "kept_bases": self._kept_bases.clone(),
            "skipped_statistics": self._skipped_statistics.clone(),
            "generator": None if self._generator is None else self._generator.get_state(),
        }
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        extra = state_dict.pop("kronecker")
        super().load_state_dict(state_dict)
        self.counters.update(extra["counters"])
        for name in ("damping", "kept_bases", "skipped_statistics"):
            getattr(self, f"_{name}").copy_(extra[name])
        if self._generator is not None and extra["generator"] is not None:
            self._generator.set_state(extra["generator"].cpu())
        self._damping_changed = True
        self.capture.clear()
        self.capture.active = self._captures(self.counters["step"])

    def _layers_with(self, key: str) -> list[tuple[KroneckerLayer, dict[str, Tensor]]]:
        """Covered layers whose state holds ``key`` (``"A"``: statistics, ``"U_A"``: a basis)."""
        return [(layer, self.state[layer.module.weight]) for layer in self.layers
                if key in self.state.get(layer.module.weight, {})]

    # ------------------------------------------------------------------ schedule
    def _stats_due(self, step: int) -> bool:
        return self.counters["factor_updates"] == 0 or step % self.options.cov_update_freq == 0

    def _captures(self, step: int) -> bool:
        """Whether the forward of step ``step`` must capture inputs and output gradients."""
        return self._stats_due(step)

    def _adapting(self) -> bool:
        opts = self.options
        return (opts.damping_schedule == "adaptive"
                and self.counters["step"] % opts.adapt_interval == 0)

    def _schedule_damping(self) -> None:
        """Write the exponential schedule's damping for the next step (once at its floor, the
        value stops changing and nothing is written)."""
        if self.options.damping_schedule != "exponential":
            return
        value = self._exponential_damping(self.counters["step"])
        if value != self._exponential_damping(self.counters["step"] - 1):
            self._damping.fill_(value)
            self._damping_changed = True

    def _exponential_damping(self, step: int) -> float:
        opts = self.options
        return max(opts.damping_min,
                   opts.damping * opts.damping_decay ** (step / opts.damping_decay_steps))

    # ------------------------------------------------------------------ curvature
    def _update_curvature(self) -> None:
        step = self.counters["step"]
        captured = self.capture.captured
        if captured and self._stats_due(step):
            self._update_factors()
        with_factors = self._layers_with("A")
        stale = any("U_A" not in state for _, state in with_factors)
        refreshed = bool(with_factors) and (step % self.options.inv_update_freq == 0 or stale)
        if refreshed:
            self._update_bases(with_factors)
        self._update_scaling(refreshed, captured)
        self._damping_changed = False
        self.capture.clear()

    def _update_factors(self) -> None:
        count = self.counters["factor_updates"] = self.counters["factor_updates"] + 1
        decay = min(self.options.stat_decay, 1 - 1 / count)
        for layer in self.layers:
            if not layer.inputs:
                continue
            a, g = layer.factors(self._num_terms, self.options.kfac_approx)
            state = self.state[layer.module.weight]
            self._average(state, "A", a, decay)
            self._average(state, "G", g, decay)

    def _average(self, state: dict[str, Tensor], key: str, batch: Tensor, decay: float) -> None:
        """``state[key] <- decay * state[key] + (1 - decay) * batch``; a first (or non-finite)
        old value is replaced, a non-finite batch estimate is skipped -- without host syncs."""
        if key not in state:
            state[key] = batch
            return
        old = state[key]
        good = torch.isfinite(batch).all()
        self._skipped_statistics += ~good
        blended = torch.where(torch.isfinite(old).all(), torch.lerp(batch, old, decay), batch)
        state[key] = torch.where(good, blended, old)

    def _update_bases(self, layers: list[tuple[KroneckerLayer, dict[str, Tensor]]]) -> None:
        factors, previous, names = [], [], []
        for layer, state in layers:
            for which in ("A", "G"):
                factors.append(state[which])
                names.append(f"{layer.name}.{which}")
                if f"U_{which}" in state:
                    previous.append((state[f"lambda_{which}"], state[f"U_{which}"]))
                else:
                    previous.append(neutral_eigen(state[which]))
        eigens, kept = robust_eigh(factors, previous, names)
        self._kept_bases += kept
        for index, (_, state) in enumerate(layers):
            state["lambda_A"], state["U_A"] = eigens[2 * index]
            state["lambda_G"], state["U_G"] = eigens[2 * index + 1]

    def _update_scaling(self, refreshed: bool, captured: bool) -> None:
        """Update the subclass's eigenvalue terms after the factors and bases (default: none)."""

    # ------------------------------------------------------------------ preconditioning
    def _eigenvalues(self, state: dict[str, Tensor]) -> Tensor:
        """Undamped curvature in the eigenbasis, ``(groups, d_out, d_in)``."""
        raise NotImplementedError

    def _precondition(self, layer: KroneckerLayer, state: dict[str, Tensor],
                      grad: Tensor) -> Tensor:
        """The layer's direction for ``grad = [dW | db]``: by default ``(C + damping)^-1`` in the
        eigenbasis, ``C`` from :meth:`_eigenvalues`."""
        denominator = self._eigenvalues(state) + self._damping
        return precondition(grad, state["U_A"], state["U_G"], denominator)

    def _directions(self) -> dict[Tensor, Tensor]:
        """Preconditioned (and KL-clipped) directions of the covered parameters with a basis."""
        directions: dict[Tensor, Tensor] = {}
        products = []
        for layer, state in self._layers_with("U_A"):
            weight, bias = layer.module.weight, layer.module.bias
            if weight.grad is None:
                continue
            bias_grad = None
            if bias is not None:
                bias_grad = bias.grad if bias.grad is not None else torch.zeros_like(bias)
            grad = layer.matrix(weight.grad, bias_grad).float()
            direction = self._precondition(layer, state, grad)
            products.append((direction * grad).sum())
            weight_direction, bias_direction = layer.split(direction)
            directions[weight] = weight_direction.to(weight.dtype)
            if bias is not None and bias_direction is not None:
                directions[bias] = bias_direction.to(bias.dtype)
        if self.options.kl_clip is not None and products:
            lr = self.param_groups[0]["lr"]
            quadratic = torch.stack(products).sum().clamp_min(torch.finfo(torch.float32).tiny)
            self._kl_scale = (self.options.kl_clip / (lr**2 * quadratic)).sqrt().clamp(max=1.0)
            torch._foreach_mul_(list(directions.values()), self._kl_scale)
        return directions

    def _updates(self, directions: dict[Tensor, Tensor]) -> list[tuple[Tensor, Tensor]]:
        """``(param, lr * buf)`` pairs of the momentum-SGD outer step on ``directions``
        (the raw gradient for parameters without one); ``param -= lr * buf`` is the step."""
        updates = []
        for group in self.param_groups:
            lr, momentum, decay = group["lr"], group["momentum"], group["weight_decay"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                direction = directions.get(param, param.grad)
                if decay:
                    direction = direction.add(param, alpha=decay)
                if momentum:
                    state = self.state[param]
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = direction.clone()
                    else:
                        state["momentum_buffer"].mul_(momentum).add_(direction)
                    direction = state["momentum_buffer"]
                updates.append((param, direction * lr))
        return updates

    # ------------------------------------------------------------------ adaptive damping
    def _model_change(self, updates: list[tuple[Tensor, Tensor]]) -> Tensor:
        """Quadratic-model change ``M(delta)`` of the step ``delta = -update`` (module doc)."""
        change = torch.zeros((), device=self._damping.device)
        steps = {param: update for param, update in updates}
        for param, update in updates:
            change -= (param.grad.float() * update.float()).sum()
        curved: set[int] = set()
        for layer, state in self._layers_with("U_A"):
            if layer.module.weight not in steps:
                continue
            bias = layer.module.bias
            bias_step = None if bias is None else steps.get(bias, torch.zeros_like(bias))
            delta = layer.matrix(steps[layer.module.weight], bias_step).float()
            rotated = state["U_G"].mT @ delta @ state["U_A"]
            change += 0.5 * ((self._eigenvalues(state) + self._damping) * rotated.square()).sum()
            curved.update(id(p) for p in layer.params)
        for param, update in updates:
            if id(param) not in curved:
                change += 0.5 * self._damping * update.float().square().sum()
        return change

    def _adapt_damping(self, predicted: Tensor) -> None:
        """Levenberg-Marquardt update of the damping from the reduction ratio (Sec. 6.5)."""
        assert self._adapt_batch is not None
        inputs, targets, task, loss_before = self._adapt_batch
        self._adapt_batch = None
        buffers = [buffer.clone() for buffer in self.model.buffers()]
        loss_after = task.loss(self.model(inputs), targets).float()
        for buffer, saved in zip(self.model.buffers(), buffers, strict=True):
            buffer.copy_(saved)
        self._rho = (loss_after - loss_before.float()) / predicted
        omega = (19 / 20) ** self.options.adapt_interval
        factor = torch.where(self._rho > 0.75, omega, torch.where(self._rho < 0.25, 1 / omega, 1.0))
        factor = torch.where(predicted < 0, factor, 1 / omega)  # no predicted decrease: damp more
        opts = self.options
        self._damping.copy_((self._damping * factor).clamp(opts.damping_min, opts.damping_max))
        self._damping_changed = True
