"""What K-FAC and EKFAC share: statistics, their schedule, damping and the step's bookkeeping.

Per training step (between the backward pass and the optimizer's step):

1. On a statistics step (every ``cov_update_freq`` steps) the capture recorded the layer inputs
   and the output gradients of the Fisher type (:mod:`ngexp.curvature.capture`); ``step``
   folds the batch factors into running averages ``A <- e A + (1 - e) A_batch`` with ``e =
   min(stat_decay, 1 - 1/k)`` at the ``k``-th update: the first estimate replaces -- no
   identity initialization -- and early ones are averaged with equal weights. Batch statistics
   that are not finite are skipped (no host sync).
2. Every ``inv_update_freq`` steps the subclass refreshes what it preconditions with (K-FAC:
   damped inverses by Cholesky, or eigenbases; EKFAC: eigenbases), batched over factors of one
   size (:mod:`ngexp.curvature.linalg`).
3. Each covered layer's gradient ``M = [dW | db]`` becomes the subclass's direction ``V``;
   layers without curvature (BatchNorm, uncovered biases) keep their gradient. KL clipping and
   the outer step: :mod:`ngexp.optim.preconditioner`.

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

Damping (``damping_schedule``): ``constant`` (``damping`` a number or a schedule of the step,
:mod:`ngexp.optim.hyperparams`); ``exponential``: ``damping * damping_decay^(t /
damping_decay_steps)``, floored at ``damping_min``; ``adaptive``: the Levenberg-Marquardt rule
of Martens & Grosse (2015, Sec. 6.5) every ``adapt_interval`` (T1) steps: ``rho = (h(w + delta)
- h(w)) / M(delta)`` on the step's own batch, damping times ``omega = (19/20)^T1`` if ``rho >
3/4``, divided by it if ``rho < 1/4``, clamped to ``[damping_min, damping_max]``. ``delta`` is
the step the optimizer actually took; the quadratic model is the Kronecker curvature itself,
``M(delta) = <grad, delta> + 1/2 sum_layers delta^T C delta + 1/2 damping |delta|^2`` (K-FAC: ``C
= G (x) A``, EKFAC: ``U diag(s) U^T``), so no curvature-vector product is needed; ``h(w +
delta)`` costs one forward pass without gradients (buffers such as BatchNorm running statistics
are restored after it). This needs the batch targets: ``pre.backward(loss, targets=y)``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ngexp.curvature.capture import SAMPLED, TRAINING, LayerIO, autocast_like, backward_sampled
from ngexp.curvature.kronecker import PASS_KIND, kronecker_factors, pass_groups
from ngexp.curvature.linalg import neutral_eigen, robust_eigh
from ngexp.distributed.world import current
from ngexp.optim.damping import levenberg_marquardt
from ngexp.optim.hyperparams import Hyperparameter, check_hyperparameter, value_at
from ngexp.optim.kaisa import GlobalSamples, Kaisa, reduced_kept
from ngexp.optim.preconditioner import KLBlock, Preconditioner
from ngexp.options import check, check_integer, check_range, checked, is_number

log = logging.getLogger("ngexp")

DampingSchedule = Literal["constant", "exponential", "adaptive"]
FisherType = Literal["mc", "empirical"]
KFACApprox = Literal["expand", "reduce"]
#: State keys of a layer that :meth:`KroneckerPreconditioner.curvature` reports.
CURVATURE_KEYS = ("A", "G", "A_inv", "G_inv", "U_A", "U_G", "lambda_A", "lambda_G", "pi", "s")


def check_kronecker(damping: Any, damping_schedule: str, damping_decay: float,
                    damping_decay_steps: int, damping_min: float, damping_max: float,
                    adapt_interval: int, stat_decay: float, cov_update_freq: Any,
                    inv_update_freq: Any, fisher_type: str, mc_samples: int, kfac_approx: str,
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
          and (fisher_type == "mc" or mc_samples == 1), "mc_samples", mc_samples,
          "an integer >= 1 (and 1 unless fisher_type=mc)")
    check_range("grad_worker_fraction", grad_worker_fraction, 0, 1, closed="(]")


def matmul(left: Tensor, right: Tensor) -> Tensor:
    """``left @ right`` for stacks ``(groups, n, k) @ (groups, k, m)``, as one 2-D product when
    there is a single group (faster than a batched product of one)."""
    if left.shape[0] == 1 and right.shape[0] == 1:
        return (left[0] @ right[0])[None]
    return left @ right


@dataclass(frozen=True)
class LayerGradient:
    """A layer's gradient ``[dW | db]`` kept in its two parts (no concatenated copy): ``weight
    (groups, d_out, fan_in)`` and ``bias (groups, d_out)`` or ``None``, float32."""

    weight: Tensor
    bias: Tensor | None

    @classmethod
    def of(cls, layer: LayerIO) -> LayerGradient | None:
        """The ``.grad`` of ``layer`` (``None`` without a weight gradient; a missing bias
        gradient counts as zero)."""
        weight, bias = layer.weight, layer.bias
        if weight.grad is None:
            return None
        weight_grad = layer.weight_matrix(weight.grad).float()
        bias_grad = None
        if bias is not None:
            bias_grad = (layer.bias_vector(bias.grad).float() if bias.grad is not None
                         else weight_grad.new_zeros(layer.groups, layer.out_dim))
        return cls(weight_grad, bias_grad)

    def times(self, matrix: Tensor) -> Tensor:
        """``[dW | db] @ matrix`` for ``matrix (groups, d_in, k)``: ``(groups, d_out, k)``."""
        fan_in = self.weight.shape[-1]
        product = matmul(self.weight, matrix[:, :fan_in])
        if self.bias is None:
            return product
        if product.shape[0] == 1:  # in place, one pass: product += db (x) matrix[fan_in]
            product[0].addr_(self.bias[0], matrix[0, fan_in])
            return product
        return product.baddbmm_(self.bias[:, :, None], matrix[:, fan_in, None, :])

    def dot(self, direction: Tensor) -> Tensor:
        """``<[dW | db], direction>`` for ``direction (groups, d_out, d_in)`` (0-dim)."""
        fan_in = self.weight.shape[-1]
        value = torch.mul(direction[..., :fan_in], self.weight).sum()
        if self.bias is not None:
            value = value + torch.mul(direction[..., fan_in], self.bias).sum()
        return value


def write_direction(layer: LayerIO, direction: Tensor) -> None:
    """Copy ``direction (groups, d_out, d_in)`` into the ``.grad`` of the layer's weight and
    bias, in place (their memory layout, e.g. channels_last, is kept)."""
    weight_grad = layer.weight.grad
    assert weight_grad is not None
    layer.write_weight(weight_grad, direction[..., :layer.fan_in])
    bias = layer.bias
    if bias is not None and bias.grad is not None:
        layer.write_bias(bias.grad, direction[..., layer.fan_in])


def eigenbasis_precondition(grad: LayerGradient, basis_a: Tensor, basis_g: Tensor,
                            denominator: Tensor) -> Tensor:
    """``U_G ((U_G^T M U_A) / D) U_A^T`` for ``M = [dW | db] (groups, d_out, d_in)``,
    eigenbases ``basis_a (groups, d_in, d_in)``, ``basis_g (groups, d_out, d_out)`` and ``D``
    shaped like ``M``: the inverse of ``U diag(D) U^T``, ``U = U_G (x) U_A``, on ``vec(M)``."""
    rotated = matmul(basis_g.mT, grad.times(basis_a)) / denominator
    return matmul(matmul(basis_g, rotated), basis_a.mT)


def kronecker_eigenvalues(state: dict[str, Tensor]) -> Tensor:
    """Eigenvalues ``lambda_G lambda_A^T`` of ``G (x) A`` in its eigenbasis, ``(groups, d_out,
    d_in)``."""
    return state["lambda_G"][:, :, None] * state["lambda_A"][:, None, :]


@dataclass
class AdaptiveStep:
    """What the Levenberg-Marquardt update needs across the optimizer's step."""

    raw_grads: dict[Tensor, Tensor]
    before: dict[Tensor, Tensor]
    args: tuple[Any, ...]
    targets: Tensor
    loss: Tensor
    #: The autocast dtype of the step's forward (the loss after the step is evaluated alike).
    autocast: torch.dtype | None


@checked(check_kronecker)
class KroneckerPreconditioner(Preconditioner):
    """Base of :class:`~ngexp.optim.kfac.KFAC` and :class:`~ngexp.optim.ekfac.EKFAC`; options
    in the module docstring (``grad_worker_fraction``: :mod:`ngexp.optim.kaisa`). Subclasses
    refresh their preconditioning terms (:meth:`_refresh`, named by :meth:`_term_keys`), map a
    layer's gradient to its direction (:meth:`_precondition`) and give the quadratic form of
    their curvature (:meth:`_curvature_quadratic`)."""

    #: Whether every rank of a data-parallel run keeps every layer's terms (EKFAC's scaling
    #: rotates each rank's per-example gradients into the eigenbases).
    _terms_everywhere = False

    def __init__(self, model: nn.Module, *, damping: Hyperparameter = 0.1,
                 damping_schedule: DampingSchedule = "constant", damping_decay: float = 0.5,
                 damping_decay_steps: int = 1000, damping_min: float = 1e-6,
                 damping_max: float = 1e3, adapt_interval: int = 5, stat_decay: float = 0.95,
                 cov_update_freq: Hyperparameter = 10, inv_update_freq: Hyperparameter = 100,
                 fisher_type: FisherType = "mc", mc_samples: int = 1,
                 kfac_approx: KFACApprox = "expand", grad_worker_fraction: float = 1.0,
                 **options: Any) -> None:
        super().__init__(model, **options)
        self.damping, self.damping_schedule = damping, damping_schedule
        self.damping_decay, self.damping_decay_steps = damping_decay, damping_decay_steps
        self.damping_min, self.damping_max = damping_min, damping_max
        self.adapt_interval, self.stat_decay = adapt_interval, stat_decay
        self.cov_update_freq, self.inv_update_freq = cov_update_freq, inv_update_freq
        self.fisher_type, self.mc_samples, self.kfac_approx = fisher_type, mc_samples, kfac_approx
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
        #: Curvature state by layer name.
        self.state: dict[str, dict[str, Tensor]] = {}
        #: Layers whose preconditioning terms were computed (the same set on every rank).
        self._fresh: set[str] = set()
        #: Python counters (saved in the state dict).
        self.counters = {"factor_updates": 0}
        #: The damping on the device; ``_damping_value`` mirrors what was last written to it
        #: by a schedule (adaptive damping changes it on the device only).
        self._damping_value = self._scheduled_damping(0)
        self._damping = torch.tensor(self._damping_value, device=device)
        #: Set whenever the damping is written, for subclasses that fold it into cached matrices.
        self._damping_changed = True
        self._kept = torch.zeros((), dtype=torch.long, device=device)
        self._skipped_statistics = torch.zeros((), dtype=torch.long, device=device)
        self._rho = torch.full((), float("nan"), device=device)
        #: Whether this step's statistics may enter the running averages (a 0-dim bool: false
        #: when the grad scaler found non-finite gradients and skips the step).
        self._statistics_ok = torch.ones((), dtype=torch.bool, device=device)
        self._generator: torch.Generator | None = None
        if fisher_type == "mc":  # its own stream: MC targets do not shift other draws
            seed = (torch.initial_seed() + 1) % 2**63
            self._generator = torch.Generator(device).manual_seed(seed)
        self._adaptive: AdaptiveStep | None = None
        self._arm(0)

    # ------------------------------------------------------------------ public API
    def backward(self, loss: Tensor, outputs: Tensor | None = None,
                 targets: Tensor | None = None) -> None:
        """Fill ``.grad`` from ``loss``; on statistics steps with ``fisher_type="mc"`` first
        record ``mc_samples`` backward passes of losses on targets sampled from the model."""
        self._begin_backward(loss, targets)
        if (self.fisher_type == "mc" and any(layer.inputs for layer in self.capture.layers)
                and self._stats_due(self.steps)):
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
        ``lambda_G``; EKFAC: eigenbases and scaling ``s (groups, d_out, d_in)``). Live tensors:
        do not modify them."""
        return {name: {key: state[key] for key in CURVATURE_KEYS if key in state}
                for name, state in self.state.items()}

    def reset(self) -> None:
        """Forget the curvature (e.g. after pruning); the next forward collects fresh
        statistics and the next step recomputes the preconditioning terms."""
        self.state.clear()
        self._fresh.clear()
        self.counters = {key: 0 for key in self.counters}
        self._adaptive = None
        super().reset()

    def log_metrics(self) -> dict[str, float]:
        metrics = {"damping": float(self._damping), "kept_bases": float(self._kept),
                   "skipped_statistics": float(self._skipped_statistics), **super().log_metrics()}
        if self.damping_schedule == "adaptive":
            metrics["rho"] = float(self._rho)
        return metrics

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        fresh = [layer.name for layer in self.layers if layer.name in self._fresh]
        state.update(
            layers=self._kaisa.complete(fresh, self.state, self._term_keys()),
            counters=dict(self.counters),
            damping=self._damping.clone(),
            kept=self._kept.clone(),
            skipped_statistics=self._skipped_statistics.clone(),
            generator=None if self._generator is None else self._generator.get_state(),
            damping_changed=self._damping_changed,
        )
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        known = {layer.name for layer in self.layers}
        if not set(state["layers"]) <= known:
            raise ValueError(f"{type(self).__name__} state for layers "
                             f"{sorted(set(state['layers']) - known)} the model does not have")
        device = self._damping.device
        self.state = {name: {key: value.to(device) for key, value in values.items()}
                      for name, values in state["layers"].items()}
        self._fresh = {name for name, values in self.state.items() if self._refreshed(values)}
        for name, values in self.state.items():  # a checkpoint holds every rank's terms
            if not self._kaisa.holds(name):
                for key in self._term_keys():
                    values.pop(key, None)
        self.counters.update(state["counters"])
        for name in ("damping", "kept", "skipped_statistics"):
            getattr(self, f"_{name}").copy_(state[name])
        if self._generator is not None and state["generator"] is not None:
            self._generator.set_state(state["generator"].cpu())
        # what the schedule last wrote (the float32 copy on the device would differ from it)
        self._damping_value = self._scheduled_damping(max(int(state["steps"]) - 1, 0))
        # A damping change not yet folded into the terms re-inverts them at the next step, as
        # it would have without the interruption (checkpoints without the flag: re-invert).
        self._damping_changed = bool(state.get("damping_changed", True))
        super().load_state_dict(state)

    # ------------------------------------------------------------------ schedule
    def _stats_due(self, step: int) -> bool:
        return (self.counters["factor_updates"] == 0
                or step % value_at(self.cov_update_freq, step) == 0)

    def _refresh_due(self, step: int) -> bool:
        return step % value_at(self.inv_update_freq, step) == 0

    def _captures(self, step: int) -> bool:
        """Whether the forward of step ``step`` must capture inputs and output gradients."""
        return self._stats_due(step)

    @property
    def _captures_every_step(self) -> bool:
        """Whether layer inputs and output gradients are needed on every step, not only for
        statistics (K-FAC's factored preconditioning on the CPU)."""
        return False

    def _adapting(self, step: int) -> bool:
        return self.damping_schedule == "adaptive" and step % self.adapt_interval == 0

    def _arm(self, step: int) -> None:
        captures = self._captures(step)
        self.capture.active = captures or self._captures_every_step
        self.capture.watch_model = captures or self._adapting(step)

    def _scheduled_damping(self, step: int) -> float:
        if self.damping_schedule == "exponential":
            decayed = self.damping * self.damping_decay ** (step / self.damping_decay_steps)
            return max(self.damping_min, decayed)
        return float(value_at(self.damping, step))

    # ------------------------------------------------------------------ the step
    def _precondition_grads(self) -> list[KLBlock]:
        step = self.steps
        self._check_statistics()
        found_inf = self._scaler_found_inf()
        if found_inf is not None:
            self._statistics_ok = ~found_inf
        if self.damping_schedule != "adaptive":
            value = self._scheduled_damping(step)
            if value != self._damping_value:
                self._damping_value = value
                self._damping.fill_(value)
                self._damping_changed = True
        if self.capture.captured(PASS_KIND[self.fisher_type]) and self._stats_due(step):
            self._update_factors()
        with_factors = [layer for layer in self.layers if layer.name in self.state]
        stale = any(layer.name not in self._fresh for layer in with_factors)
        refreshed = bool(with_factors) and (self._refresh_due(step) or stale)
        if refreshed:
            self._distribute(with_factors, self._refresh)
            self._fresh.update(layer.name for layer in with_factors)
        self._update_scaling(refreshed)
        self._damping_changed = False
        if self._adapting(step):
            self._start_adaptive()
        if self._kaisa.distributed:
            blocks = self._precondition_shared(with_factors)
        else:
            blocks = []
            for layer in with_factors:
                grad = LayerGradient.of(layer)
                if grad is None:
                    continue
                direction = self._precondition(layer, self.state[layer.name], grad)
                blocks.append((layer.params, grad.dot(direction)))
                write_direction(layer, direction)
        self.capture.clear()
        return blocks

    def _precondition_shared(self, layers: list[LayerIO]) -> list[KLBlock]:
        """Data-parallel preconditioning: the layers' gradient workers compute the directions,
        the other ranks receive them (:meth:`Kaisa.share_directions`); then, as in one
        process, each ``.grad`` becomes its direction."""
        grads = {layer.name: LayerGradient.of(layer) for layer in layers}
        live = [layer for layer in layers if grads[layer.name] is not None]
        computed = {layer.name: self._precondition(layer, self.state[layer.name],
                                                   grads[layer.name])
                    for layer in live if self._kaisa.computes(layer.name)}
        directions = self._kaisa.share_directions([layer.name for layer in live], computed)
        blocks: list[KLBlock] = []
        for layer in live:
            blocks.append((layer.params, grads[layer.name].dot(directions[layer.name])))
            write_direction(layer, directions[layer.name])
        return blocks

    def _distribute(self, layers: list[LayerIO],
                    compute: Callable[[list[LayerIO]], None]) -> None:
        """``compute`` the preconditioning terms of the layers this rank owns, then share them
        with the ranks that hold them (:class:`~ngexp.optim.kaisa.Kaisa`); in one process,
        ``compute(layers)``."""
        if not self._kaisa.distributed:
            compute(layers)
            return
        kept = self._kept.clone()
        owned = [layer for layer in layers if self._kaisa.owns(layer.name)]
        if owned:
            compute(owned)
        self._kaisa.share_terms([layer.name for layer in layers], self.state,
                                self._term_keys())
        self._kept = reduced_kept(self._kaisa, kept, self._kept)

    def _check_statistics(self) -> None:
        """Raise when this step cannot precondition: no statistics ever, or a statistics step
        whose Monte-Carlo passes are missing."""
        capture = self.capture
        if (self.fisher_type == "mc" and capture.captured_inputs and self._stats_due(self.steps)
                and any(f.passes(TRAINING) and not f.passes(SAMPLED) for f in capture.forwards)):
            raise RuntimeError(f"{type(self).__name__}(fisher_type='mc') needs "
                               f"pre.backward(loss) instead of loss.backward() on statistics "
                               f"steps (it back-propagates sampled targets); or use "
                               f"fisher_type='empirical'")
        if not self.state and not capture.captured(PASS_KIND[self.fisher_type]):
            raise RuntimeError(f"{type(self).__name__}.step(): no curvature statistics were "
                               f"ever captured; run the hooked model forward in train mode "
                               f"with grad enabled, then loss.backward() (empirical Fisher) or "
                               f"pre.backward(loss) (MC Fisher), before step()")

    def _covered_parameters(self) -> list[nn.Parameter]:
        return [p for layer in self.capture.layers for p in layer.params]

    def _warn_unseen(self, missing: list[LayerIO]) -> None:
        """Warn once for each covered layer that has a gradient but whose forward hook did not
        run in the statistics step's forwards: it was called functionally (``F.linear(x,
        layer.weight)``) or its module's hooks were bypassed, so it keeps the plain gradient
        until its statistics exist."""
        for layer in missing:
            if layer.weight.grad is not None and layer.name not in self.state:
                self._warn_once(f"unseen {layer.name}", f"{type(self).__name__}: layer "
                                f"{layer.name!r} ({type(layer.module).__name__}) got a gradient "
                                f"but its forward hook never ran (called functionally?): its "
                                f"parameters keep the plain gradient")

    def _update_factors(self) -> None:
        count = self.counters["factor_updates"] = self.counters["factor_updates"] + 1
        decay = min(self.stat_decay, 1 - 1 / count)
        groups, num_terms = pass_groups(self.capture, self.fisher_type, self.task)
        layers = [layer for layer in self.layers
                  if any(layer.records[group.record].inputs for group in groups)]
        self._warn_unseen([layer for layer in self.layers if layer not in layers])
        factors: Iterable[tuple[Tensor, Tensor]] = (
            kronecker_factors(layer, groups, num_terms, self.kfac_approx) for layer in layers)
        if self._kaisa.distributed:  # the ranks' mean: the global batch's factors
            flat = self._kaisa.mean([f for pair in factors for f in pair])
            factors = zip(flat[0::2], flat[1::2], strict=True)
        for layer, (a, g) in zip(layers, factors, strict=True):
            state = self.state.setdefault(layer.name, {})
            self._average(state, "A", a, decay)
            self._average(state, "G", g, decay)

    def _average(self, state: dict[str, Tensor], key: str, batch: Tensor, decay: float) -> None:
        """``state[key] <- decay * state[key] + (1 - decay) * batch``; a first (or non-finite)
        old value is replaced, a non-finite batch estimate is skipped -- without host syncs.
        Finiteness is read off the sums (a NaN or inf entry makes the sum non-finite; so does,
        conservatively, an overflowing one)."""
        if key not in state:  # a skipped first estimate is replaced by the next good one
            state[key] = torch.where(self._statistics_ok, batch, float("nan"))
            return
        old = state[key]
        good = torch.isfinite(batch.sum()) & self._statistics_ok
        old_good = torch.isfinite(old.sum())
        self._skipped_statistics += ~good
        state[key] = torch.lerp(torch.where(good, batch, old), torch.where(old_good, old, batch),
                                decay)

    # ------------------------------------------------------------------ subclass terms
    def _refresh_eigenbases(self, layers: list[LayerIO]) -> None:
        """Eigendecompose ``A`` and ``G`` of ``layers`` into their state (``U_A``, ``lambda_A``,
        ``U_G``, ``lambda_G``); a failed decomposition keeps the previous basis."""
        factors, previous, names = [], [], []
        for layer in layers:
            state = self.state[layer.name]
            for which in ("A", "G"):
                factors.append(state[which])
                names.append(f"{layer.name}.{which}")
                previous.append((state[f"lambda_{which}"], state[f"U_{which}"])
                                if f"U_{which}" in state else neutral_eigen(state[which]))
        eigens, kept = robust_eigh(factors, previous, names)
        self._kept += kept
        for index, layer in enumerate(layers):
            state = self.state[layer.name]
            state["lambda_A"], state["U_A"] = eigens[2 * index]
            state["lambda_G"], state["U_G"] = eigens[2 * index + 1]

    def _refreshed(self, state: dict[str, Tensor]) -> bool:
        """Whether the layer's preconditioning terms exist."""
        raise NotImplementedError

    def _term_keys(self) -> tuple[str, ...]:
        """The state keys of the terms :meth:`_refresh` computes (:func:`~ngexp.optim.kaisa.
        term_shape` knows their shapes)."""
        raise NotImplementedError

    def _refresh(self, layers: list[LayerIO]) -> None:
        """Recompute the preconditioning terms of ``layers`` from their factors."""
        raise NotImplementedError

    def _update_scaling(self, refreshed: bool) -> None:
        """Update terms that change between refreshes (default: none)."""

    def _precondition(self, layer: LayerIO, state: dict[str, Tensor],
                      grad: LayerGradient) -> Tensor:
        """The direction ``(groups, d_out, d_in)`` for the layer's gradient ``[dW | db]``."""
        raise NotImplementedError

    def _curvature_quadratic(self, state: dict[str, Tensor], delta: Tensor) -> Tensor:
        """``delta^T C delta`` of the undamped curvature ``C`` for ``delta`` shaped like
        ``[dW | db]``."""
        raise NotImplementedError

    # ------------------------------------------------------------------ adaptive damping
    def _start_adaptive(self) -> None:
        if len(self.capture.forwards) > 1:
            raise RuntimeError(f"{type(self).__name__}(damping_schedule='adaptive') measures the "
                               f"reduction ratio on one batch: it does not support gradient "
                               f"accumulation ({len(self.capture.forwards)} forwards before one "
                               f"step); use damping_schedule=constant or exponential")
        if self._targets is None or self._loss is None or not self.capture.model_args:
            raise RuntimeError(f"{type(self).__name__}(damping_schedule='adaptive') needs the "
                               f"batch targets: call pre.backward(loss, targets=targets) "
                               f"instead of loss.backward()")
        params = [p for p in self.model.parameters() if p.grad is not None]
        self._adaptive = AdaptiveStep({p: p.grad.clone() for p in params},
                                      {p: p.detach().clone() for p in params},
                                      self.capture.model_args, self._targets, self._loss,
                                      self.capture.model_autocast)

    def _after_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Levenberg-Marquardt update of the damping from the reduction ratio (Sec. 6.5)."""
        if self._adaptive is None:
            return
        adaptive, self._adaptive = self._adaptive, None
        with torch.no_grad():
            deltas = {p: (p.detach() - before).float() for p, before in adaptive.before.items()}
            predicted = torch.zeros((), device=self._damping.device)
            for param, delta in deltas.items():
                predicted += (adaptive.raw_grads[param].float() * delta).sum()
                predicted += 0.5 * self._damping * delta.square().sum()
            for layer in self.layers:
                weight = layer.weight
                if layer.name not in self.state or weight not in deltas:
                    continue
                bias = layer.bias
                bias_delta = None if bias is None else deltas.get(bias, torch.zeros_like(bias))
                delta = layer.matrix(deltas[weight], bias_delta)
                predicted += 0.5 * self._curvature_quadratic(self.state[layer.name], delta)
            buffers = [buffer.clone() for buffer in self.model.buffers()]
            with autocast_like(self._damping.device.type, adaptive.autocast):
                outputs = self.model(*adaptive.args)
                loss_after = self.task.loss(outputs, adaptive.targets).float()
            for buffer, saved in zip(self.model.buffers(), buffers, strict=True):
                buffer.copy_(saved)
            loss_before = adaptive.loss.float()
            if self._kaisa.distributed:  # the global batch's losses
                loss_after, loss_before = self._kaisa.mean([loss_after, loss_before])
            self._rho = (loss_after - loss_before) / predicted
            damping = levenberg_marquardt(self._damping, self._rho, predicted,
                                          (19 / 20) ** self.adapt_interval)
            self._damping.copy_(damping.clamp(self.damping_min, self.damping_max))
        self._damping_changed = True
