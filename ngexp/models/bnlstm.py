"""Batch-normalized LSTM (Cooijmans et al. 2016, "Recurrent Batch Normalization").

One LSTM layer over sequences ``x_1 .. x_T`` with gate pre-activations (Eqs. 6-8)::

    (f, i, o, g) = BN(W_h h_{t-1}; gamma_h) + BN(W_x x_t; gamma_x) + b
    c_t = sigmoid(f) * c_{t-1} + sigmoid(i) * tanh(g)
    h_t = sigmoid(o) * tanh(BN(c_t; gamma_c, beta_c))

The recurrent and input terms are normalized separately and without shift (``b`` is the only
bias). Every BN keeps separate statistics per time step (Sec. 3): batch statistics of that step
in training, per-step population statistics (moving averages) in evaluation, and steps past the
longest training sequence reuse the statistics of its last step; ``gamma``/``beta`` are shared
across time. ``bn="input"`` normalizes only ``W_x x_t`` (Laurent et al. 2016, frame-wise
statistics), ``bn="none"`` is a plain LSTM with the same initialization.

``W_x`` and ``W_h`` are bias-free ``nn.Linear`` modules so the curvature hooks of
:mod:`ngexp.optim` see them: ``W_x`` is applied once to the whole ``(B, T, D)`` input, ``W_h``
once per step (curvature statistics are summed over its calls).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ngexp.data.spec import DataSpec
from ngexp.errors import UserError
from ngexp.models.layers import Standardize
from ngexp.options import (
    check_choice,
    check_integer,
    check_nonnegative,
    check_positive,
    check_range,
    checked,
    configurable,
)

#: Values of ``model.bn``: which terms are batch-normalized.
BN_MODES = ("all", "input", "none")
#: Values of ``model.recurrent_init``: initialization of the ``g`` block of ``W_h``.
RECURRENT_INITS = ("identity", "orthogonal")


class StepwiseBatchNorm(nn.Module):
    """Batch normalization of ``F`` features with separate statistics per time step.

    ``BN(z; gamma, beta) = beta + gamma * (z - E[z]) / sqrt(Var[z] + eps)`` (Eq. 5). In training,
    ``E``/``Var`` are the (biased) batch statistics of the step, and the population statistics
    of that step move towards them: ``running <- (1 - momentum) * running + momentum * batch``
    (unbiased variance, as ``nn.BatchNorm1d``; both done by one fused ``F.batch_norm`` on the
    step's row of the ``(max_steps, F)`` buffers). In evaluation step ``t`` uses the population
    statistics of step ``min(t, trained_steps - 1)``, ``trained_steps`` being the longest
    training sequence seen. ``gamma`` and ``beta`` are shared over time; ``shift=False`` drops
    ``beta``. Setting ``track_running_stats = False`` (as for ``nn.BatchNorm1d``) keeps batch
    statistics in training but stops the updates, e.g. for repeated curvature forwards.

    Whole sequences ``(B, T, F)`` go through :meth:`forward`; a recurrence normalizes its steps
    one at a time through :meth:`steps`.
    """

    def __init__(self, num_features: int, max_steps: int, gamma_init: float = 0.1,
                 shift: bool = True, momentum: float = 0.1, eps: float = 1e-5) -> None:
        super().__init__()
        self.max_steps, self.momentum, self.eps = max_steps, momentum, eps
        self.track_running_stats = True
        self.weight = nn.Parameter(torch.full((num_features,), gamma_init))
        self.bias = nn.Parameter(torch.zeros(num_features)) if shift else None
        self.register_buffer("running_mean", torch.zeros(max_steps, num_features))
        self.register_buffer("running_var", torch.ones(max_steps, num_features))
        self.register_buffer("trained_steps", torch.zeros((), dtype=torch.long))

    def statistics(self, steps: int) -> tuple[Tensor, Tensor] | None:
        """Population mean and variance ``(steps, F)`` for steps ``0 .. steps - 1``: in training
        the buffer rows themselves (updated in place; ``None`` when ``track_running_stats`` is
        off, as ``nn.BatchNorm1d``), in evaluation a copy where steps past the longest training
        sequence repeat its last step."""
        if self.training:
            if not self.track_running_stats:
                return None
            if steps > self.max_steps:
                raise ValueError(f"a training sequence of {steps} steps is longer than the "
                                 f"{self.max_steps} steps this model keeps statistics for")
            self.trained_steps.clamp_(min=steps)
            return self.running_mean[:steps], self.running_var[:steps]
        last = (self.trained_steps - 1).clamp(min=0)
        index = torch.minimum(torch.arange(steps, device=last.device), last)
        return self.running_mean[index], self.running_var[index]

    def normalize(self, z: Tensor, mean: Tensor | None, var: Tensor | None, weight: Tensor,
                  bias: Tensor | None) -> Tensor:
        """Eq. 5 on ``(B, F')``: batch statistics in training (moving ``mean``/``var`` towards
        them in place unless ``None``), the given statistics in evaluation."""
        return F.batch_norm(z, mean, var, weight, bias, self.training, self.momentum, self.eps)

    def forward(self, z: Tensor) -> Tensor:
        """Normalize a whole sequence ``(B, T, F)``, each step with its own statistics."""
        steps = z.shape[1]
        stats = self.statistics(steps)
        mean, var = (None, None) if stats is None else (stats[0].view(-1), stats[1].view(-1))
        bias = self.bias.repeat(steps) if self.bias is not None else None
        out = self.normalize(z.flatten(1), mean, var, self.weight.repeat(steps), bias)
        return out.view_as(z)

    def steps(self, num_steps: int) -> Callable[[Tensor, int], Tensor]:
        """``norm(z_t, t)``: normalizes step ``t`` (0-based) of a ``(B, F)`` recurrence."""
        stats = self.statistics(num_steps)

        def norm(z: Tensor, step: int) -> Tensor:
            mean, var = (None, None) if stats is None else (stats[0][step], stats[1][step])
            return self.normalize(z, mean, var, self.weight, self.bias)

        return norm

    def extra_repr(self) -> str:
        return (f"{self.weight.shape[0]}, max_steps={self.max_steps}, "
                f"shift={self.bias is not None}, momentum={self.momentum}, eps={self.eps}")


def check_bnlstm(hidden_size: int, bn: str, gamma_init: float, recurrent_init: str,
                 h0_noise_std: float, bn_momentum: float, bn_eps: float, **_: object) -> None:
    check_integer("hidden_size", hidden_size, 1)
    check_choice("bn", bn, BN_MODES)
    check_positive("gamma_init", gamma_init)
    check_choice("recurrent_init", recurrent_init, RECURRENT_INITS)
    check_nonnegative("h0_noise_std", h0_noise_std)
    check_range("bn_momentum", bn_momentum, 0, 1, closed="(]")
    check_positive("bn_eps", bn_eps)


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
    The initial state is ``h_0 = c_0 = 0``; in training ``h_0`` gets Gaussian noise of std
    ``h0_noise_std``, which gives the first steps' recurrent term a nonzero batch variance
    to normalize (Sec. 5.1); evaluation uses ``h_0 = 0``.
    """

    def __init__(self, spec: DataSpec, hidden_size: int = 100, bn: str = "all",
                 gamma_init: float = 0.1, recurrent_init: str = "identity",
                 h0_noise_std: float = 0.1, bn_momentum: float = 0.1,
                 bn_eps: float = 1e-5) -> None:
        super().__init__()
        self.language_model = spec.task == "language_model"
        if self.language_model:
            self.standardize, input_size = None, spec.num_classes
        elif len(spec.input_shape) == 2:
            self.standardize, input_size = Standardize(spec), spec.input_shape[1]
        else:
            raise UserError(f"model=bnlstm needs sequences (T, D) or token ids, but data "
                            f"{spec.name!r} has examples of shape {spec.input_shape}; use a "
                            f"sequence data set such as data=row_fashion_mnist or data=text")
        steps, gates = spec.input_shape[0], 4 * hidden_size
        self.hidden_size, self.recurrent_init, self.h0_noise_std = (
            hidden_size, recurrent_init, h0_noise_std)
        self.input_map = nn.Linear(input_size, gates, bias=False)  # W_x
        self.recurrent_map = nn.Linear(hidden_size, gates, bias=False)  # W_h
        self.bias = nn.Parameter(torch.zeros(gates))  # b, gate order (f, i, o, g)

        def norm(features: int, shift: bool) -> StepwiseBatchNorm:
            return StepwiseBatchNorm(features, steps, gamma_init, shift, bn_momentum, bn_eps)

        self.bn_x = norm(gates, shift=False) if bn in ("all", "input") else None
        self.bn_h = norm(gates, shift=False) if bn == "all" else None
        self.bn_c = norm(hidden_size, shift=True) if bn == "all" else None
        self.head = nn.Linear(hidden_size, spec.num_classes)
        self.reset_parameters()

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
        nn.init.orthogonal_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: Tensor) -> Tensor:
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
        if self.training and self.h0_noise_std > 0:
            h = h + self.h0_noise_std * torch.randn_like(h)
        norm_h = self.bn_h.steps(steps) if self.bn_h is not None else None
        norm_c = self.bn_c.steps(steps) if self.bn_c is not None else None
        states = []
        for t in range(steps):
            recurrent = self.recurrent_map(h)
            if norm_h is not None:
                recurrent = norm_h(recurrent, t)
            gates = inputs[:, t] + recurrent
            forget, input_, output = torch.sigmoid(gates[:, :3 * hidden]).chunk(3, dim=1)
            c = forget * c + input_ * torch.tanh(gates[:, 3 * hidden:])
            h = output * torch.tanh(norm_c(c, t) if norm_c is not None else c)
            states.append(h)
        if self.language_model:
            return self.head(torch.stack(states, dim=1))
        return self.head(h)

