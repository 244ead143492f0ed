"""What K-FAC and EKFAC share: the step, built from parts that each do one job.

Per training step (between the backward pass and the optimizer's step),
:class:`KroneckerPreconditioner` runs:

1. On a statistics step (every ``cov_update_freq`` steps) the capture recorded the layer inputs
   and the output gradients of the Fisher type (:mod:`ngexp.curvature.capture`; its names:
   :mod:`ngexp.curvature.choices`); the batch factors enter each layer's running averages
   (:mod:`ngexp.optim.kronecker_statistics`, which also holds the schedule of statistics and
   refreshes). Each layer's state is a typed
   :class:`~ngexp.optim.layer_curvature.LayerCurvature`.
2. Every ``inv_update_freq`` steps the subclass's terms (:mod:`ngexp.optim.kronecker_terms`:
   K-FAC's damped inverses by Cholesky or eigenbases, EKFAC's eigenbases) are refreshed,
   batched over all layers (:mod:`ngexp.curvature.linalg`).
3. Each covered layer's gradient ``M = [dW | db]`` becomes the terms' direction ``V``; layers
   without curvature (BatchNorm, uncovered biases) keep their gradient. KL clipping and the
   outer step: :mod:`ngexp.optim.preconditioner`.

Data-parallel (constructed on every rank of an initialized ``torch.distributed`` process
group, the model wrapped in ``DistributedDataParallel``): factors (and EKFAC's scaling) are
all-reduced at statistics steps, decompositions are spread over the ranks and their results or
the preconditioned gradients broadcast per ``grad_worker_fraction`` (:mod:`ngexp.optim.kaisa`);
Monte-Carlo targets are drawn for the global batch (:class:`~ngexp.optim.kaisa.GlobalSamples`).
Then ``state_dict()`` is a collective (every rank calls it; it gathers the terms a checkpoint
needs). The CPU's factored K-FAC product is not used: ``.grad`` is the ranks' mean, not this
rank's ``D^T [X | 1]``.

The default damping, 0.1, comes from the default MLP on Fashion-MNIST (20k images, 3 epochs):
1e-2 left K-FAC below SGD and made EKFAC diverge; of 1e-2, 3e-2 and 1e-1, 1e-1 was best for both.

Damping (``damping_schedule``, :class:`~ngexp.optim.damping.Damping`): ``constant`` (``damping``
a number or a schedule of the step, :mod:`ngexp.optim.hyperparams`); ``exponential``: the
schedule ``damping * damping_decay^(t / damping_decay_steps)`` floored at ``damping_min``
(:func:`~ngexp.optim.damping.scheduled_damping`); ``adaptive``: the Levenberg-Marquardt rule of
Martens & Grosse (2015, Sec. 6.5) every ``adapt_interval`` (T1) steps from the reduction ratio
``rho`` of the step's own batch (:mod:`ngexp.optim.adaptive_damping`), damping times ``omega =
(19/20)^T1`` if ``rho > 3/4``, divided by it if ``rho < 1/4``, clamped to ``[damping_min,
damping_max]``. This needs the batch targets: ``pre.backward(loss, targets=y)``.

The state dict keeps the layout of a flat K-FAC state: ``layers[name][key]`` with the keys of
:mod:`ngexp.optim.layer_curvature` (``A``, ``G``, ``pi``, ``A_inv``, ``U_A``, ``lambda_A``,
``s``, ...), ``counters``, ``damping``, ``kept``, ``skipped_statistics``,
``factor_estimates`` (the factor updates that entered: those of steps the grad scaler did not
skip), ``generator``, ``damping_changed``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ngexp.curvature.capture import LayerIO, backward_sampled
from ngexp.curvature.choices import FisherType, KFACApproxName, KroneckerFisherType
from ngexp.distributed.world import current
from ngexp.optim.adaptive_damping import AdaptiveStep
from ngexp.optim.damping import Damping, DampingScheduleName, scheduled_damping
from ngexp.optim.hyperparams import Hyperparameter, check_hyperparameter
from ngexp.optim.kaisa import GlobalSamples, Kaisa
from ngexp.optim.kl_clip import KLBlock
from ngexp.optim.kronecker_statistics import FactorSchedule, FactorStatistics
from ngexp.optim.kronecker_terms import KroneckerTerms, LayerGradient
from ngexp.optim.layer_curvature import LayerCurvature
from ngexp.optim.loss_scaling import found_inf
from ngexp.optim.preconditioner import Preconditioner
from ngexp.options import check, check_integer, check_range, checked, is_number


def check_kronecker(damping: Any, damping_schedule: str, damping_decay: float,
                    damping_decay_steps: int, damping_min: float, damping_max: float,
                    adapt_interval: int, stat_decay: float, cov_update_freq: Any,
                    inv_update_freq: Any, fisher_type: str, mc_samples: int,
                    grad_worker_fraction: float, **_: Any) -> None:
    check_hyperparameter("damping", damping)
    check(damping_schedule == "constant" or is_number(damping), "damping", damping,
          f"a number when damping_schedule={damping_schedule}")
    check_range("damping_decay", damping_decay, 0, 1, closed="(]")
    check_integer("damping_decay_steps", damping_decay_steps, 1)
    if is_number(damping):
        check_range("damping_min", damping_min, 0, damping, closed="(]")
        check(is_number(damping_max) and damping_max >= damping, "damping_max", damping_max,
              f"a finite number >= damping={damping}")
    check_integer("adapt_interval", adapt_interval, 1)
    check_range("stat_decay", stat_decay, 0, 1, closed="[)")
    check_hyperparameter("cov_update_freq", cov_update_freq, integer=True)
    check_hyperparameter("inv_update_freq", inv_update_freq, integer=True)
    check(isinstance(mc_samples, int) and mc_samples >= 1
          and (fisher_type == FisherType.MC or mc_samples == 1), "mc_samples", mc_samples,
          "an integer >= 1 (and 1 unless fisher_type=mc)")
    check_range("grad_worker_fraction", grad_worker_fraction, 0, 1, closed="(]")


def write_direction(layer: LayerIO, direction: Tensor) -> None:
    """Copy ``direction (groups, d_out, d_in)`` into the ``.grad`` of the layer's weight and
    bias, in place (their memory layout, e.g. channels_last, is kept)."""
    weight_grad = layer.weight.grad
    assert weight_grad is not None
    layer.write_weight(weight_grad, direction[..., :layer.fan_in])
    bias = layer.bias
    if bias is not None and bias.grad is not None:
        layer.write_bias(bias.grad, direction[..., layer.fan_in])


@checked(check_kronecker)
class KroneckerPreconditioner(Preconditioner):
    """Base of :class:`~ngexp.optim.kfac.KFAC` and :class:`~ngexp.optim.ekfac.EKFAC`; options
    in the module docstring (``grad_worker_fraction``: :mod:`ngexp.optim.kaisa`). A subclass
    sets its :class:`~ngexp.optim.kronecker_terms.KroneckerTerms` (``terms``) and may update
    terms between refreshes (:meth:`_update_scaling`) or choose another way to a layer's
    direction (:meth:`_direction`)."""

    data_parallel = True  # factors all-reduced (KAISA, ngexp/optim/kaisa.py)

    #: Whether every rank of a data-parallel run keeps every layer's terms (EKFAC's scaling
    #: rotates each rank's per-example gradients into the eigenbases).
    _terms_everywhere = False

    #: What a layer is preconditioned with (set by the subclass before this ``__init__``).
    terms: KroneckerTerms

    def __init__(self, model: nn.Module, *, damping: Hyperparameter = 0.1,
                 damping_schedule: DampingScheduleName = "constant", damping_decay: float = 0.5,
                 damping_decay_steps: int = 1000, damping_min: float = 1e-6,
                 damping_max: float = 1e3, adapt_interval: int = 5, stat_decay: float = 0.95,
                 cov_update_freq: Hyperparameter = 10, inv_update_freq: Hyperparameter = 100,
                 fisher_type: KroneckerFisherType = "mc", mc_samples: int = 1,
                 kfac_approx: KFACApproxName = "expand", grad_worker_fraction: float = 1.0,
                 **options: Any) -> None:
        super().__init__(model, **options)
        self.damping, self.damping_schedule = damping, damping_schedule
        self.damping_decay, self.damping_decay_steps = damping_decay, damping_decay_steps
        self.damping_min, self.damping_max = damping_min, damping_max
        self.adapt_interval, self.stat_decay = adapt_interval, stat_decay
        self.cov_update_freq, self.inv_update_freq = cov_update_freq, inv_update_freq
        self.fisher_type, self.mc_samples = FisherType(fisher_type), mc_samples
        self.kfac_approx = kfac_approx
        self.layers: list[LayerIO] = self.capture.layers
        if not self.layers:
            raise ValueError(f"{type(self).__name__}: the model has no layer with curvature "
                             f"(Linear, Conv1d/2d, Embedding, MultiheadAttention, LayerNorm, "
                             f"GroupNorm, BatchNorm) whose weight requires grad")
        device = self.layers[0].weight.device
        world = current()
        self.grad_worker_fraction = grad_worker_fraction
        self._kaisa = Kaisa(self.layers, grad_worker_fraction, world, self._terms_everywhere)
        #: The task MC targets are sampled from (for the global batch when data-parallel).
        self._sampling_task = GlobalSamples(self.task, world) if world.distributed else self.task
        self._schedule = FactorSchedule(cov_update_freq, inv_update_freq)
        self._statistics = FactorStatistics(self.layers, self._kaisa, self.fisher_type,
                                            kfac_approx, stat_decay, device)
        #: Curvature state by layer name.
        self.state: dict[str, LayerCurvature] = {}
        #: Layers whose preconditioning terms were computed (the same set on every rank).
        self._fresh: set[str] = set()
        #: Python counters (saved in the state dict).
        self.counters = {"factor_updates": 0}
        #: Whether a factor update is known to have entered the averages (:meth:`_updates`).
        self._entered = False
        adaptive = damping_schedule == "adaptive"
        self._damping = Damping(scheduled_damping(damping, damping_schedule, damping_decay,
                                                  damping_decay_steps, damping_min),
                                device, adapt_interval=adapt_interval if adaptive else None,
                                minimum=damping_min, maximum=damping_max)
        self._kept = torch.zeros((), dtype=torch.long, device=device)
        self._generator: torch.Generator | None = None
        if self.fisher_type == FisherType.MC:  # its own stream: MC targets shift no other draw
            seed = (torch.initial_seed() + 1) % 2**63
            self._generator = torch.Generator(device).manual_seed(seed)
        self._adaptive: AdaptiveStep | None = None
        self._arm(0)

    # ------------------------------------------------------------------ public API
    def backward(self, loss: Tensor, outputs: Tensor | None = None,
                 targets: Tensor | None = None) -> None:
        """Fill ``.grad`` from ``loss``; on the steps that capture (statistics steps, and
        EKFAC's scaling steps) with ``fisher_type="mc"`` first record ``mc_samples`` backward
        passes of losses on targets sampled from the model."""
        self._begin_backward(loss, targets)
        if (self.fisher_type == FisherType.MC
                and any(layer.inputs for layer in self.capture.layers)
                and self._captures(self.steps)):
            outputs = self.capture.model_output if outputs is None else outputs
            if outputs is None:
                raise RuntimeError(f"{type(self).__name__}.backward(loss): the forward of this "
                                   f"step was not seen; pass backward(loss, outputs)")
            backward_sampled(self.capture, outputs, self._sampling_task, self.mc_samples,
                             self._generator, retain_last=True)
        loss.backward()

    def curvature(self) -> dict[str, dict[str, Tensor]]:
        """The curvature of every covered layer that has statistics, by module name: running
        factors ``A (groups, d_in, d_in)`` and ``G (groups, d_out, d_out)`` (bias as the last
        input coordinate) and the subclass's terms (K-FAC: ``pi`` and damped inverses
        ``A_inv``/``G_inv``, or eigenbases ``U_A``, ``U_G`` and eigenvalues ``lambda_A``,
        ``lambda_G``; EKFAC: eigenbases and scaling ``s (groups, d_out, d_in)``;
        :mod:`ngexp.optim.layer_curvature`). Live tensors: do not modify them."""
        return {name: state.as_state() for name, state in self.state.items()}

    def reset(self) -> None:
        """Forget the curvature (e.g. after pruning); the next forward collects fresh
        statistics and the next step recomputes the preconditioning terms."""
        self.state.clear()
        self._fresh.clear()
        self.counters = {key: 0 for key in self.counters}
        self._statistics.estimates.reset()
        self._entered = False
        self._adaptive = None
        super().reset()

    def log_metrics(self) -> dict[str, float]:
        metrics = {"damping": float(self._damping.value), "kept_bases": float(self._kept),
                   "skipped_statistics": float(self._statistics.averages.skipped),
                   **super().log_metrics()}
        if self.damping_schedule == "adaptive":
            metrics["rho"] = float(self._damping.rho)
        return metrics

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        fresh = [layer.name for layer in self.layers if layer.name in self._fresh]
        layers = self._kaisa.complete(fresh, self.state, self.terms.fields)
        state.update(
            layers={name: values.as_state() for name, values in layers.items()},
            counters=dict(self.counters),
            damping=self._damping.value.clone(),
            kept=self._kept.clone(),
            skipped_statistics=self._statistics.averages.skipped.clone(),
            factor_estimates=self._statistics.estimates.value.clone(),
            generator=None if self._generator is None else self._generator.get_state(),
            damping_changed=self._damping.changed,
        )
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        known = {layer.name for layer in self.layers}
        if not set(state["layers"]) <= known:
            raise ValueError(f"{type(self).__name__} state for layers "
                             f"{sorted(set(state['layers']) - known)} the model does not have")
        device = self._kept.device
        self.state = {name: LayerCurvature.from_state(values, device)
                      for name, values in state["layers"].items()}
        self._fresh = {name for name, values in self.state.items()
                       if values.has(self.terms.fields)}
        for name, values in self.state.items():  # a checkpoint holds every rank's terms
            if not self._kaisa.placement.holds(name):
                values.drop(self.terms.fields)
        self.counters.update(state["counters"])
        self._entered = False
        self._kept.copy_(state["kept"])
        self._statistics.averages.skipped.copy_(state["skipped_statistics"])
        # checkpoints from before the count: every factor update entered
        self._statistics.estimates.load(
            state.get("factor_estimates", self.counters["factor_updates"]))
        if self._generator is not None and state["generator"] is not None:
            self._generator.set_state(state["generator"].cpu())
        # A damping change not yet folded into the terms re-inverts them at the next step, as
        # it would have without the interruption (checkpoints without the flag: re-invert).
        self._damping.restore(state["damping"], bool(state.get("damping_changed", True)),
                              int(state["steps"]))
        super().load_state_dict(state)

    # ------------------------------------------------------------------ the step
    def _updates(self) -> int:
        """The factor updates that entered the running averages. A grad scaler may have
        skipped all of them: then their count is read off the device until one has entered (a
        host sync per step only at the start of an fp16 run whose first steps overflow; the
        scaler's own step syncs anyway), so that statistics are due again and no terms are
        computed from the placeholders."""
        updates = self.counters["factor_updates"]
        if not self._entered and updates > 0:
            scaled = self.grad_scaler is not None and self.grad_scaler.is_enabled()
            self._entered = not scaled or bool(self._statistics.estimates.value > 0)
        return updates if self._entered else 0

    def _statistics_due(self, step: int) -> bool:
        return self._schedule.statistics_due(step, self._updates())

    def _captures(self, step: int) -> bool:
        """Whether the forward of step ``step`` must capture inputs and output gradients."""
        return self._statistics_due(step)

    def _arm(self, step: int) -> None:
        captures = self._captures(step)
        self.capture.active = captures
        self.capture.watch_model = captures or self._damping.adapting(step)

    def _precondition_grads(self) -> list[KLBlock]:
        step, name = self.steps, type(self).__name__
        statistics = self._statistics
        statistics.check(name, self.capture, self._captures(step), bool(self.state))
        inf = found_inf(self.grad_scaler, name)
        if inf is not None:
            statistics.averages.ok = ~inf
        self._damping.follow(step)
        if statistics.captured(self.capture) and self._statistics_due(step):
            self.counters["factor_updates"] += 1
            for layer in statistics.update(self.capture, self.task, self.state):
                self._warnings.warn(f"unseen {layer.name}", f"{name}: layer {layer.name!r} "
                                    f"({type(layer.module).__name__}) got a gradient but its "
                                    f"forward hook never ran (called functionally?): its "
                                    f"parameters keep the plain gradient")
        entered = self._updates() > 0  # else the factors are placeholders of skipped steps
        with_factors = [layer for layer in self.layers if entered and layer.name in self.state]
        stale = any(layer.name not in self._fresh for layer in with_factors)
        refreshed = bool(with_factors) and (self._schedule.refresh_due(step) or stale)
        if refreshed:
            self._kept += self._kaisa.refresh(with_factors, self.terms.refresh, self.state,
                                              self.terms.fields, self._damping.value)
            self._fresh.update(layer.name for layer in with_factors)
        self._update_scaling(refreshed)
        self._damping.changed = False
        if self._damping.adapting(step):
            self._adaptive = AdaptiveStep.record(name, self.model, self.capture, self._targets,
                                                 self._loss)
        blocks = []
        for layer, grad, direction in self._kaisa.directions(with_factors, self._direction):
            blocks.append((layer.params, grad.dot(direction)))
            write_direction(layer, direction)
        self.capture.clear()
        return blocks

    def _direction(self, layer: LayerIO, grad: LayerGradient) -> Tensor:
        """The direction ``(groups, d_out, d_in)`` for the layer's gradient ``[dW | db]``."""
        return self.terms.direction(self.state[layer.name], grad, self._damping.value)

    def _update_scaling(self, refreshed: bool) -> None:
        """Update terms that change between refreshes (default: none)."""

    def _covered_parameters(self) -> list[nn.Parameter]:
        return [p for layer in self.capture.layers for p in layer.params]

    def _after_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Levenberg-Marquardt update of the damping from the reduction ratio
        (:mod:`ngexp.optim.adaptive_damping`)."""
        if self._adaptive is None:
            return
        adaptive, self._adaptive = self._adaptive, None
        damping = self._damping.value
        with torch.no_grad():
            deltas = adaptive.deltas()
            layers = [(layer, self.state[layer.name]) for layer in self.layers
                      if layer.name in self.state]
            predicted = adaptive.predicted(deltas, damping, layers, self.terms.quadratic)
            loss_after = adaptive.loss_after(self.model, self.task, damping.device)
            loss_before = adaptive.loss.float()
            if self._kaisa.distributed:  # the global batch's losses
                loss_after, loss_before = self._kaisa.mean([loss_after, loss_before])
            self._damping.adapt((loss_after - loss_before) / predicted, predicted)
