"""Batch-normalized LSTM (Cooijmans et al. 2016, "Recurrent Batch Normalization").

One LSTM layer over sequences ``x_1 .. x_T`` with gate pre-activations (Eqs. 6-8)::

    (f, i, o, g) = BN(W_h h_{t-1}; gamma_h) + BN(W_x x_t; gamma_x) + b
    c_t = sigmoid(f) * c_{t-1} + sigmoid(i) * tanh(g)
    h_t = sigmoid(o) * tanh(BN(c_t; gamma_c, beta_c))

The recurrent and input terms are normalized separately and without shift (``b`` is the only
bias). Every BN keeps separate statistics per time step (Sec. 3): batch statistics of that step
in training, per-step population statistics in evaluation (moving averages, or averages of the
minibatch statistics over training batches, :meth:`BNLSTM.estimate_population_statistics`),
and steps past the longest training sequence reuse the statistics of its last step;
``gamma``/``beta`` are shared across time. ``bn="input"`` normalizes only ``W_x x_t`` (Laurent
et al. 2016), ``bn="none"`` is a plain LSTM (Eqs. 2-4) with the same initialization.

``W_x`` and ``W_h`` are bias-free ``nn.Linear`` modules so the curvature hooks of
:mod:`ngexp.optim` see them: ``W_x`` is applied once to the whole ``(B, T, D)`` input, ``W_h``
once per step (curvature statistics are summed over its calls).

Cost is linear in ``T``: the steps of the input term come from one ``unbind`` (indexing
``inputs[:, t]`` would back-propagate a whole ``(B, T, 4H)`` gradient per step), the per-step
population statistics are views of the buffers' rows, and one step is a product, a batch norm
per normalized term and seven element-wise kernels.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ngexp.data.spec import DataSpec
from ngexp.models.layers import Standardize, require_data
from ngexp.options import (
    check,
    check_integer,
    check_nonnegative,
    check_positive,
    check_range,
    checked,
    configurable,
)


class StepwiseBatchNorm(nn.Module):
    """Batch normalization of ``F`` features with separate statistics per time step.

    ``BN(z; gamma, beta) = beta + gamma * (z - E[z]) / sqrt(Var[z] + eps)`` (Eq. 5). In training,
    ``E``/``Var`` are the (biased) batch statistics of the step, and the population statistics
    of that step move towards them: ``running <- (1 - momentum) * running + momentum * batch``
    (unbiased variance, as ``nn.BatchNorm1d``; both done by one fused ``F.batch_norm`` on a view
    of the step's row of the ``(max_steps, F)`` buffers). In evaluation step ``t`` uses the
    population statistics of step ``min(t, trained_steps - 1)``, ``trained_steps`` being the
    longest training sequence seen. ``gamma`` and ``beta`` are shared over time; ``shift=False``
    drops ``beta``. Setting ``track_running_stats = False`` (as for ``nn.BatchNorm1d``) keeps
    batch statistics in training but stops the updates, e.g. for repeated curvature forwards.

    ``shared=True`` is the ablation of Sec. 3 (statistics shared across time): one ``(1, F)``
    row of population statistics for all steps, moved once per forward towards the batch
    statistics pooled over batch and time. A whole sequence is then normalized in training with
    its pooled batch statistics; a recurrence's steps, which depend on the normalization of the
    steps before them, keep the batch statistics of their step.

    Whole sequences ``(B, T, F)`` go through :meth:`forward`; a recurrence normalizes its steps
    one at a time through a :class:`StepNorm` from :meth:`steps`.
    """

    def __init__(self, num_features: int, max_steps: int, gamma_init: float = 0.1,
                 shift: bool = True, momentum: float = 0.1, eps: float = 1e-5,
                 shared: bool = False) -> None:
        super().__init__()
        self.max_steps, self.momentum, self.eps, self.shared = max_steps, momentum, eps, shared
        self.track_running_stats = True
        self.weight = nn.Parameter(torch.full((num_features,), gamma_init))
        self.bias = nn.Parameter(torch.zeros(num_features)) if shift else None
        rows = 1 if shared else max_steps
        self.register_buffer("running_mean", torch.zeros(rows, num_features))
        self.register_buffer("running_var", torch.ones(rows, num_features))
        self.register_buffer("trained_steps", torch.zeros((), dtype=torch.long))

    @property
    def updating(self) -> bool:
        """Whether a training forward moves the population statistics."""
        return self.training and self.track_running_stats

    def statistics(self, steps: int) -> tuple[Tensor, Tensor] | None:
        """Per-step population mean and variance ``(steps, F)``: in training the buffer rows
        themselves (updated in place; ``None`` when ``track_running_stats`` is off, as
        ``nn.BatchNorm1d``), in evaluation rows where steps past the longest training sequence
        repeat its last step (the one row, expanded, when shared)."""
        if self.training:
            if not self.track_running_stats:
                return None
            if steps > self.max_steps and not self.shared:
                raise ValueError(f"a training sequence of {steps} steps is longer than the "
                                 f"{self.max_steps} steps this model keeps statistics for")
            self.trained_steps.clamp_(min=steps)
            return self.running_mean[:steps], self.running_var[:steps]
        if self.shared:
            return self.running_mean.expand(steps, -1), self.running_var.expand(steps, -1)
        last = (self.trained_steps - 1).clamp(min=0)
        index = torch.minimum(torch.arange(steps, device=last.device), last)
        return self.running_mean[index], self.running_var[index]

    def normalize(self, z: Tensor, mean: Tensor | None, var: Tensor | None, weight: Tensor,
                  bias: Tensor | None) -> Tensor:
        """Eq. 5 on ``(B, F')``: batch statistics in training (moving ``mean``/``var`` towards
        them in place unless ``None``), the given statistics in evaluation."""
        return F.batch_norm(z, mean, var, weight, bias, self.training, self.momentum, self.eps)

    def forward(self, z: Tensor) -> Tensor:
        """Normalize a whole sequence ``(B, T, F)``, each step with its own statistics (or all
        steps with pooled ones, when shared)."""
        steps = z.shape[1]
        stats = self.statistics(steps)
        if self.shared:
            mean, var = (None, None) if stats is None else (stats[0][0], stats[1][0])
            return self.normalize(z.flatten(0, 1), mean, var, self.weight, self.bias).view_as(z)
        mean, var = (None, None) if stats is None else (stats[0].view(-1), stats[1].view(-1))
        bias = self.bias.repeat(steps) if self.bias is not None else None
        out = self.normalize(z.flatten(1), mean, var, self.weight.repeat(steps), bias)
        return out.view_as(z)

    def steps(self, num_steps: int) -> StepNorm:
        """The normalizer of the ``num_steps`` steps of one recurrence."""
        return StepNorm(self, num_steps)

    def extra_repr(self) -> str:
        return (f"{self.weight.shape[0]}, max_steps={self.max_steps}, "
                f"shift={self.bias is not None}, momentum={self.momentum}, eps={self.eps}, "
                f"shared={self.shared}")


class StepNorm:
    """``norm(z_t, t)``: Eq. 5 on step ``t`` (0-based) ``(B, F)`` of one recurrence.

    Per-step statistics are views of the rows of :meth:`StepwiseBatchNorm.statistics`, split
    once. With shared statistics in training each step uses its batch statistics and
    :meth:`close` (after the last step) moves the one population row towards the statistics of
    all steps pooled."""

    def __init__(self, bn: StepwiseBatchNorm, num_steps: int) -> None:
        self.bn = bn
        self.pooled: list[Tensor] | None = [] if bn.shared and bn.updating else None
        stats = None if self.pooled is not None else bn.statistics(num_steps)
        none = (None,) * num_steps
        self.means, self.vars = (none, none) if stats is None else (stats[0].unbind(0),
                                                                    stats[1].unbind(0))

    def __call__(self, z: Tensor, step: int) -> Tensor:
        bn = self.bn
        if self.pooled is not None:
            self.pooled.append(z.detach())
        return bn.normalize(z, self.means[step], self.vars[step], bn.weight, bn.bias)

    @torch.no_grad()
    def close(self) -> None:
        """With shared statistics in training: one update by the pooled batch statistics."""
        if self.pooled:
            bn = self.bn
            bn.trained_steps.clamp_(min=len(self.pooled))
            F.batch_norm(torch.cat(self.pooled), bn.running_mean[0], bn.running_var[0],
                         training=True, momentum=bn.momentum, eps=bn.eps)


def check_bnlstm(hidden_size: int, bn: str, gamma_init: float, h0_noise_std: float,
                 cell_shift: bool, bn_momentum: float, bn_eps: float, population_examples: int,
                 **_: object) -> None:
    check_integer("hidden_size", hidden_size, 1)
    check_positive("gamma_init", gamma_init)
    check_nonnegative("h0_noise_std", h0_noise_std)
    check(not cell_shift or bn != "all", "cell_shift", cell_shift,
          "false with bn=all (BN(c) has its own shift beta_c)")
    check_range("bn_momentum", bn_momentum, 0, 1, closed="(]")
    check_positive("bn_eps", bn_eps)
    check_integer("population_examples", population_examples, 1)


@configurable("model", "bnlstm")
@checked(check_bnlstm)
class BNLSTM(nn.Module):
    """One (batch-normalized) LSTM layer and a linear head; see the module docstring.

    Sequence classification (``spec.input_shape = (T, D)``, inputs standardized with
    ``spec.mean``/``spec.std``): logits ``(B, num_classes)`` from the last hidden state.
    Language model (``spec.task == "language_model"``, inputs ``(B, T)`` token ids, one-hot
    encoded so ``W_x`` acts as the embedding): logits ``(B, T, vocab)`` at every step.

    Initialization (Cooijmans et al. 2016, Sec. 5 and the authors' code): ``W_x`` and the
    ``f, i, o`` blocks of ``W_h`` orthogonal; the ``g`` block of ``W_h`` the identity
    (``recurrent_init="identity"``, used for sequential MNIST) or orthogonal; ``b = 0`` except
    the forget-gate block, 1; every BN ``gamma = gamma_init`` (0.1, Sec. 4), ``beta = 0``.
    The initial state is ``h_0 = c_0 = 0``; ``h_0`` gets Gaussian noise of std
    ``h0_noise_std`` in training (``h0_noise="train"``) or in evaluation too (``"always"``),
    which gives the first steps' recurrent term a nonzero batch variance to normalize
    (Sec. 5.1). ``cell_shift=True`` (unnormalized cell only) adds a learnable ``beta_c`` before
    the output tanh, ``h_t = sigmoid(o) * tanh(c_t + beta_c)``, as the authors' baseline.

    Evaluation uses the population statistics: moving averages kept in training
    (``population_stats="moving_average"``), or, with ``"training_set"``, the averages of the
    minibatch statistics over up to ``population_examples`` training examples that
    :meth:`estimate_population_statistics` computes before an evaluation. ``shared_statistics``
    shares them across time (see :class:`StepwiseBatchNorm`).
    """

    def __init__(self, spec: DataSpec, hidden_size: int = 100,
                 bn: Literal["all", "input", "none"] = "all", gamma_init: float = 0.1,
                 recurrent_init: Literal["identity", "orthogonal"] = "identity",
                 h0_noise_std: float = 0.1, h0_noise: Literal["train", "always"] = "train",
                 cell_shift: bool = False, bn_momentum: float = 0.1, bn_eps: float = 1e-5,
                 population_stats: Literal["moving_average", "training_set"] = "moving_average",
                 population_examples: int = 10_000, shared_statistics: bool = False) -> None:
        super().__init__()
        require_data(spec, "the BN-LSTM", ("sequence", "tokens"))
        self.language_model = spec.kind == "tokens"
        if self.language_model:
            self.standardize, input_size = None, spec.num_classes
        else:
            self.standardize, input_size = Standardize(spec), spec.input_shape[1]
        steps, gates = spec.input_shape[0], 4 * hidden_size
        self.hidden_size, self.recurrent_init = hidden_size, recurrent_init
        self.h0_noise_std, self.h0_noise = h0_noise_std, h0_noise
        self.population_stats, self.population_examples = population_stats, population_examples
        self.estimated = False  # population statistics estimated since the last training forward
        self.input_map = nn.Linear(input_size, gates, bias=False)  # W_x
        self.recurrent_map = nn.Linear(hidden_size, gates, bias=False)  # W_h
        self.bias = nn.Parameter(torch.zeros(gates))  # b, gate order (f, i, o, g)
        self.cell_bias = nn.Parameter(torch.zeros(hidden_size)) if cell_shift else None

        def norm(features: int, shift: bool) -> StepwiseBatchNorm:
            return StepwiseBatchNorm(features, steps, gamma_init, shift, bn_momentum, bn_eps,
                                     shared_statistics)

        self.bn_x = norm(gates, shift=False) if bn in ("all", "input") else None
        self.bn_h = norm(gates, shift=False) if bn == "all" else None
        self.bn_c = norm(hidden_size, shift=True) if bn == "all" else None
        self.head = nn.Linear(hidden_size, spec.num_classes)
        self.reset_parameters()

    @property
    def norms(self) -> list[StepwiseBatchNorm]:
        return [bn for bn in (self.bn_x, self.bn_h, self.bn_c) if bn is not None]

    @torch.no_grad()
    def reset_parameters(self) -> None:
        hidden = self.hidden_size
        nn.init.orthogonal_(self.input_map.weight)
        recurrent = self.recurrent_map.weight  # (4H, H), row blocks f, i, o, g
        nn.init.orthogonal_(recurrent[:3 * hidden])
        if self.recurrent_init == "identity":
            nn.init.eye_(recurrent[3 * hidden:])
        else:
            nn.init.orthogonal_(recurrent[3 * hidden:])
        self.bias.zero_()
        self.bias[:hidden] = 1.0  # forget gate
        if self.cell_bias is not None:
            self.cell_bias.zero_()
        nn.init.orthogonal_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(B, num_classes)``, or ``(B, T, vocab)`` for a language model."""
        if self.training:
            self.estimated = False
        elif self.population_stats == "training_set" and not self.estimated and self.norms:
            warnings.warn("model.population_stats=training_set: evaluating with the moving "
                          "averages, as estimate_population_statistics was not called since "
                          "training", stacklevel=2)
        return self.run(x, noise=self.training or self.h0_noise == "always")

    def run(self, x: Tensor, noise: bool,
            on_state: Callable[[int, Tensor], Tensor] | None = None) -> Tensor:
        """:meth:`forward` with the ``h_0`` noise on or off (batch norms as their mode says);
        ``on_state(t, h_t)`` (``t = 1..T``), when given, sees each hidden state ``(B, H)`` and
        returns the one the recurrence continues with (an instrument records or perturbs it)."""
        if self.standardize is None:
            x = F.one_hot(x, self.input_map.in_features).to(self.input_map.weight.dtype)
        else:
            x = self.standardize(x)
        batch, steps, hidden = x.shape[0], x.shape[1], self.hidden_size
        inputs = self.input_map(x)  # (B, T, 4H): one product for all steps
        if self.bn_x is not None:
            inputs = self.bn_x(inputs)
        inputs = inputs + self.bias
        h = inputs.new_zeros(batch, hidden)
        c = inputs.new_zeros(batch, hidden)
        if noise and self.h0_noise_std > 0:
            h = h + self.h0_noise_std * torch.randn_like(h)
        norm_h = self.bn_h.steps(steps) if self.bn_h is not None else None
        norm_c = self.bn_c.steps(steps) if self.bn_c is not None else None
        cell_bias, split = self.cell_bias, [3 * hidden, hidden]
        states = []
        for t, inputs_t in enumerate(inputs.unbind(1)):  # one backward node for all steps
            recurrent = self.recurrent_map(h)
            if norm_h is not None:
                recurrent = norm_h(recurrent, t)
            sigmoid_gates, cell_gate = (inputs_t + recurrent).split(split, dim=1)
            forget, input_, output = sigmoid_gates.sigmoid().chunk(3, dim=1)
            c = torch.addcmul(forget * c, input_, cell_gate.tanh())
            if norm_c is not None:
                h = output * norm_c(c, t).tanh()
            elif cell_bias is not None:
                h = output * (c + cell_bias).tanh()
            else:
                h = output * c.tanh()
            if on_state is not None:
                h = on_state(t + 1, h)
            if self.language_model:
                states.append(h)
        for step_norm in (norm_h, norm_c):
            if step_norm is not None:
                step_norm.close()
        if self.language_model:
            return self.head(torch.stack(states, dim=1))
        return self.head(h)

    @torch.no_grad()
    def estimate_population_statistics(self, batches: Iterable[Tensor]) -> int:
        """With ``population_stats="training_set"``: set every BN's population statistics to the
        average of its minibatch statistics (unbiased variances) over input batches from the
        training set (the paper, Sec. 3; Ioffe & Szegedy 2015, Alg. 2), reading batches until
        ``population_examples`` examples are seen. The batch norms run as in training, the
        initial state as in evaluation. Returns the number of batches used (0 with moving
        averages, which are left as they are)."""
        norms = self.norms
        if self.population_stats != "training_set" or not norms:
            return 0
        was_training, momentum = self.training, [bn.momentum for bn in norms]
        self.train()
        used = seen = 0
        try:
            for inputs in batches:
                for bn in norms:  # a cumulative average: momentum 1 / (k + 1) for batch k
                    bn.momentum = 1.0 / (used + 1)
                self.run(inputs, noise=self.h0_noise == "always")
                used, seen = used + 1, seen + len(inputs)
                if seen >= self.population_examples:
                    break
            self.estimated = used > 0
        finally:
            for bn, value in zip(norms, momentum, strict=True):
                bn.momentum = value
            self.train(was_training)
        return used
