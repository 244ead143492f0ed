"""The instruments as training callbacks (config group ``callbacks``), e.g.
``ngexp train callbacks=[tangent_alignment,filter_sparsity,gradient_noise]``.

Every scalar goes through :meth:`Trainer.log <ngexp.callbacks.Trainer.log>` (so to
``metrics.jsonl``, TensorBoard and every configured logger) under ``dynamics/``:
``dynamics/tangent/...`` (:class:`TangentAlignment`), ``dynamics/filters/...``
(:class:`FilterSparsity`), ``dynamics/grad/...`` (:class:`GradientNoise`), ``dynamics/flow/...``
(:class:`GradientFlow`). Each record also has
``.../seconds``, the wall time of that measurement.

When they measure, with ``every_n_steps = N``:

- the probe-set instruments (tangent kernels, dead filters) measure the weights after ``t``
  optimizer steps and log them at step ``t``: at ``t = 0`` (the initialization) and then at
  every evaluation (``N = 0``) or at every multiple of ``N`` (and never twice at one step);
- the gradient noise reads the per-example gradients of a training step and logs them at the
  step that step ends, like ``optim/grad_norm``: every step ending at a multiple of ``N``, or
  (``N = 0``) the first step and the first step after every evaluation (so the gradient is
  taken at the weights the evaluation saw, and logged one step later).

The probe set (:func:`~ngexp.instruments.tangent.probe_indices`: ``probe_size`` training
examples stratified by class) is drawn once from the run's seed (the seed of the trainer's data
generator, whose stream it does not touch) and its indices are kept in checkpoints, so a resumed
run measures the same examples. Measurements never change training: the model is measured in
eval mode without gradients (BatchNorm statistics untouched), or from hooks that only copy a
training step's layer inputs and output gradients; no random number is drawn.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ngexp.callbacks import Callback, Trainer
from ngexp.data.bundle import Split
from ngexp.errors import UserError
from ngexp.instruments.filters import (
    dead_filter_masks,
    dead_flops,
    dense_flops,
    filter_metrics,
    filter_sparsity,
)
from ngexp.instruments.flow import flow_metrics, hidden_gradient_norms
from ngexp.instruments.gradients import GradientProbe, gradient_metrics
from ngexp.instruments.tangent import probe_indices, tangent_alignment
from ngexp.options import (
    check_integer,
    check_positive,
    check_range,
    checked,
    configurable,
)

PREFIX = "dynamics/"


def check_probe_instrument(every_n_steps: int, probe_size: int, **_: Any) -> None:
    check_integer("every_n_steps", every_n_steps, 0)
    check_integer("probe_size", probe_size, 2)


def timed(measure: Callable[[], dict[str, float]], seconds: str) -> dict[str, float]:
    """``measure()``'s scalars and its wall time (key ``seconds``), all under ``dynamics/``."""
    start = time.perf_counter()
    values = measure()
    values[seconds] = time.perf_counter() - start
    return {PREFIX + key: value for key, value in values.items()}


class ProbeInstrument(Callback):
    """A measurement of the model on a probe set of the training split, at the steps of the
    module docstring; subclasses implement :meth:`measure`."""

    #: Prefix of the measurement's scalars (under ``dynamics/``).
    prefix = ""

    def __init__(self, every_n_steps: int, probe_size: int) -> None:
        self.every_n_steps, self.probe_size = every_n_steps, probe_size
        self.probe_index: Tensor | None = None
        self.measured_step: int | None = None
        self.probe: Split | None = None

    def measure(self, trainer: Trainer, probe: Split) -> dict[str, float]:
        """The scalars of one measurement on ``probe`` (keys without ``dynamics/``)."""
        raise NotImplementedError

    def on_train_start(self, trainer: Trainer) -> None:
        train = trainer.data.train
        if self.probe_index is None:
            if self.probe_size > len(train):
                raise UserError(f"callbacks.{self.name}.probe_size={self.probe_size} exceeds "
                                f"the {len(train)} training examples; choose at most that")
            self.probe_index = probe_indices(train.targets, self.probe_size,
                                             trainer.generator.initial_seed())
        index = self.probe_index.to(train.targets.device)
        self.probe = Split(train.inputs[index], train.targets[index])
        self.at_boundary(trainer)

    def due(self, step: int) -> bool:
        return step == 0 or (self.every_n_steps > 0 and step % self.every_n_steps == 0)

    def at_boundary(self, trainer: Trainer) -> None:
        if self.due(trainer.step):
            self.measure_once(trainer)

    def measure_once(self, trainer: Trainer) -> None:
        if self.measured_step != trainer.step and self.probe is not None:
            probe = self.probe
            trainer.log(timed(lambda: self.measure(trainer, probe), f"{self.prefix}seconds"))
            self.measured_step = trainer.step

    def on_step_start(self, trainer: Trainer) -> None:
        self.at_boundary(trainer)

    def on_epoch_end(self, trainer: Trainer) -> None:
        self.at_boundary(trainer)

    def on_evaluation(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        if self.every_n_steps == 0:
            self.measure_once(trainer)
        else:
            self.at_boundary(trainer)

    def on_train_end(self, trainer: Trainer) -> None:
        self.at_boundary(trainer)

    def state_dict(self) -> dict[str, Any]:
        return {"probe_index": self.probe_index, "measured_step": self.measured_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.probe_index = state.get("probe_index")
        self.measured_step = state.get("measured_step")


def check_tangent(every_n_steps: int, probe_size: int, top_k: int, chunk_size: int,
                  **_: Any) -> None:
    check_probe_instrument(every_n_steps, probe_size)
    check_integer("top_k", top_k, 1)
    check_integer("chunk_size", chunk_size, 1)


@configurable("callbacks", "tangent_alignment")
@checked(check_tangent)
class TangentAlignment(ProbeInstrument):
    """``dynamics/tangent/``: the tangent kernel ``K = J J^T (n, n)`` of the probe set (summed
    over outputs), whole network and per Linear/Conv2d layer: ``cka`` with the label kernel
    ``Y Y^T``, ``effective_rank``, ``participation_ratio``, ``top{k}_mass``; with
    ``per_output`` also each output's kernel against its label column (``out<c>/...``).
    :func:`~ngexp.instruments.tangent.tangent_alignment`, in eval mode. Cost: ``n^2`` in the
    probe size, seconds to a minute per call on a CPU (see that module)."""

    name = "tangent_alignment"
    prefix = "tangent/"

    def __init__(self, every_n_steps: int = 0, probe_size: int = 256, top_k: int = 10,
                 per_output: bool = False, chunk_size: int = 16) -> None:
        super().__init__(every_n_steps, probe_size)
        self.top_k, self.per_output, self.chunk_size = top_k, per_output, chunk_size

    def measure(self, trainer: Trainer, probe: Split) -> dict[str, float]:
        return tangent_alignment(trainer.model, probe, top_k=self.top_k,
                                 per_output=self.per_output, chunk_size=self.chunk_size)


@configurable("callbacks", "gradient_flow")
@checked(check_probe_instrument)
class GradientFlow(ProbeInstrument):
    """``dynamics/flow/``: the norm of the mean probe loss's gradient with respect to the
    hidden state at steps ``1, T/4, T/2, 3T/4, T`` of a recurrent model and the ratio of the
    first to the last (:mod:`~ngexp.instruments.flow`; Cooijmans et al. 2016, Sec. 4). Cost:
    about one training step on the probe set."""

    name = "gradient_flow"
    prefix = "flow/"

    def __init__(self, every_n_steps: int = 0, probe_size: int = 256) -> None:
        super().__init__(every_n_steps, probe_size)

    def measure(self, trainer: Trainer, probe: Split) -> dict[str, float]:
        norms = hidden_gradient_norms(trainer.model, trainer.task, probe.inputs, probe.targets)
        return {f"{self.prefix}{key}": value for key, value in flow_metrics(norms).items()}


def check_filters(every_n_steps: int, probe_size: int, scale_threshold: float,
                  **_: Any) -> None:
    check_probe_instrument(every_n_steps, probe_size)
    check_positive("scale_threshold", scale_threshold)


@configurable("callbacks", "filter_sparsity")
@checked(check_filters)
class FilterSparsity(ProbeInstrument):
    """``dynamics/filters/``: per Conv2d (``filters/<conv>/...``) and over all, the fractions
    of filters dead by BatchNorm scale (``|gamma| < scale_threshold``), by activation (zero
    after the ReLU on every probe example and position) and by either, and the FLOPs of the dead
    filters (:func:`~ngexp.instruments.filters.filter_metrics`).

    With ``prune_at_end``, at the end of training the filters dead by ``prune_criterion`` are
    masked (:func:`~ngexp.instruments.filters.dead_filter_masks`), the test split evaluated
    before and after (``filters/test_<metric>_before_prune``, ``..._after_prune``, with
    ``filters/pruned_fraction`` and ``filters/pruned_flops_fraction``) and the weights restored:
    the checkpoints (written before) and the model keep the unpruned weights.
    """

    name = "filter_sparsity"
    prefix = "filters/"

    def __init__(self, every_n_steps: int = 0, probe_size: int = 256,
                 scale_threshold: float = 1e-3, prune_at_end: bool = False,
                 prune_criterion: Literal["scale", "activation", "either"] = "either") -> None:
        super().__init__(every_n_steps, probe_size)
        self.scale_threshold, self.prune_at_end = scale_threshold, prune_at_end
        self.prune_criterion = prune_criterion

    def on_train_start(self, trainer: Trainer) -> None:
        if not any(isinstance(m, nn.Conv2d) for m in trainer.model.modules()):
            raise UserError(f"callbacks=[{self.name}] needs a model with Conv2d layers; "
                            f"{type(trainer.model).__name__} has none")
        super().on_train_start(trainer)

    def measure(self, trainer: Trainer, probe: Split) -> dict[str, float]:
        states = filter_sparsity(trainer.model, probe.inputs, scale_threshold=self.scale_threshold)
        return filter_metrics(trainer.model, probe.inputs, states)

    def on_train_end(self, trainer: Trainer) -> None:
        super().on_train_end(trainer)
        if self.prune_at_end and self.probe is not None:
            probe = self.probe
            trainer.log(timed(lambda: self.prune_and_evaluate(trainer, probe),
                              "filters/prune_seconds"))

    @torch.no_grad()
    def prune_and_evaluate(self, trainer: Trainer, probe: Split) -> dict[str, float]:
        """Test metrics before and after masking the filters dead by ``prune_criterion``, the
        pruned fraction of the filters and of the dense FLOPs; the weights restored after."""
        model = trainer.model
        states = filter_sparsity(model, probe.inputs, scale_threshold=self.scale_threshold)
        masks = dead_filter_masks(model, states, self.prune_criterion)
        values = {f"filters/test_{k}_before_prune": v for k, v in trainer.evaluate().items()}
        saved = [param.detach().clone() for param in masks.params]
        masks.mask_weights()
        try:
            values |= {f"filters/test_{k}_after_prune": v for k, v in trainer.evaluate().items()}
        finally:
            torch._foreach_copy_(masks.params, saved)
        dead = [state.dead(self.prune_criterion) for state in states]
        values["filters/pruned_fraction"] = sum(int(d.sum()) for d in dead) / sum(map(len, dead))
        values["filters/pruned_flops_fraction"] = (dead_flops(states, self.prune_criterion)
                                                   / max(dense_flops(model, probe.inputs[:1]), 1))
        return values


def check_gradient_noise(every_n_steps: int, decay: float, **_: Any) -> None:
    check_integer("every_n_steps", every_n_steps, 0)
    check_range("decay", decay, 0, 1, closed="(]")


@configurable("callbacks", "gradient_noise")
@checked(check_gradient_noise)
class GradientNoise(Callback):
    """``dynamics/grad/``: per-example gradient norms of a training step (quantiles and mean,
    whole model and per Linear/Conv2d layer), the unbiased ``trace_sigma = tr(Sigma)`` and
    ``grad_sq = |G|^2`` and their ratio ``b_simple`` (McCandlish et al. 2018), from
    :class:`~ngexp.instruments.gradients.GradientProbe` (armed in ``on_step_start``, read in
    ``before_optimizer_step``); and ``trace_sigma_avg``, ``grad_sq_avg`` and their ratio
    ``b_simple_avg``, averages over the measurements so far (each weighted ``decay^age``:
    ``decay = 1`` is the plain mean, ``< 1`` an exponential moving average), the low-bias
    estimate McCandlish et al. recommend over the per-batch ratio. Cost: about one SGD step per
    measurement on the CPU (:mod:`ngexp.instruments.gradients`)."""

    name = "gradient_noise"

    def __init__(self, every_n_steps: int = 10, decay: float = 1.0) -> None:
        self.every_n_steps, self.decay = every_n_steps, decay
        self.probe: GradientProbe | None = None
        self.armed = False
        #: For ``every_n_steps = 0``: measure the next step (the first one, or after an eval).
        self.arm_next = True
        #: Scalars of the last measured step, logged once the step has ended.
        self.pending: dict[str, float] = {}
        #: ``decay``-weighted sums of ``<prefix>trace_sigma`` / ``grad_sq``, and the weight.
        self.sums: dict[str, float] = {}
        self.weight = 0.0

    def on_train_start(self, trainer: Trainer) -> None:
        self.probe = GradientProbe(trainer.model)
        self.flush(trainer)

    def flush(self, trainer: Trainer) -> None:
        if self.pending:
            trainer.log(self.pending)
            self.pending = {}

    def on_step_start(self, trainer: Trainer) -> None:
        self.flush(trainer)
        due = self.arm_next if self.every_n_steps == 0 \
            else (trainer.step + 1) % self.every_n_steps == 0
        if due and self.probe is not None:
            self.probe.arm()
            self.armed, self.arm_next = True, False

    def before_optimizer_step(self, trainer: Trainer) -> None:
        if not self.armed or self.probe is None:
            return
        self.armed = False
        if not self.probe.capture.captured_inputs:  # a compiled forward runs no module hooks
            raise UserError(f"callbacks=[{self.name}] saw no layer of the training forward; "
                            f"it needs the eager model: use trainer.compile=false")
        start = time.perf_counter()
        values = gradient_metrics(self.probe.read())
        self.weight = self.decay * self.weight + 1.0
        for key in [k for k in values if k.endswith(("/trace_sigma", "/grad_sq"))]:
            self.sums[key] = self.decay * self.sums.get(key, 0.0) + values[key]
            values[f"{key}_avg"] = self.sums[key] / self.weight
        for key in [k for k in values if k.endswith("/trace_sigma")]:
            prefix = key.removesuffix("trace_sigma")
            values[f"{prefix}b_simple_avg"] = self.sums[key] / self.sums[f"{prefix}grad_sq"]
        values["grad/seconds"] = time.perf_counter() - start
        self.pending = {PREFIX + key: value for key, value in values.items()}

    def on_epoch_end(self, trainer: Trainer) -> None:
        self.flush(trainer)

    def on_evaluation(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        self.flush(trainer)
        self.arm_next = True

    def on_train_end(self, trainer: Trainer) -> None:
        self.flush(trainer)
        if self.probe is not None:
            self.probe.remove()
            self.probe = None

    def state_dict(self) -> dict[str, Any]:
        return {"sums": dict(self.sums), "weight": self.weight, "pending": dict(self.pending),
                "arm_next": self.arm_next}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sums = dict(state.get("sums", {}))
        self.weight = state.get("weight", 0.0)
        self.pending = dict(state.get("pending", {}))
        self.arm_next = state.get("arm_next", True)
