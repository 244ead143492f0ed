"""The gates of variational pruning: their variational family, its closed forms, and the gated
forward (equations and papers: ``docs/pruning_variational.md``).

Every unit ``j`` of a gated layer is multiplied by a gate ``z_j`` with variational posterior
``q(z_j) = Bern(pi_j)``, ``pi_j = sigmoid(l_j)`` (:class:`LayerGates`). Training samples ``z``
per example from the binary concrete relaxation (Maddison et al. 2017; Jang et al. 2017) ``z =
sigmoid((l + log u - log(1 - u)) / tau)``, ``u ~ U(0, 1)``; evaluation uses the posterior mean
``pi``. A gate is random or fixed to 0 or 1 (:meth:`LayerGates.fix`); a fixed gate is its value
and gets no gradient and no KL. Spike-and-slab adds Gaussian slabs ``q(w | z=1) = N(mu,
sigma^2)`` on the layer's weights, sampled by local reparameterization (Kingma et al. 2015):
``b = mu^T a + sqrt((sigma^2)^T a^2) eps`` per example.

:class:`Gating` applies them by forward hooks: the gates multiply the layer's output after its
batch norm, if one follows it; the slab noise is added to the layer's own output.

Closed forms of the KL terms (:func:`bernoulli_kl`, :func:`gaussian_kl`) and of the priors
(:func:`beta_log_prob_logit`, :func:`scale_mixture_log_prob`) are here too.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.dropout import _DropoutNd

from ngexp.callbacks import Trainer
from ngexp.prune.shrink import along_units, num_units, take

#: Gate state: random (``-1``) or fixed to 0 or 1.
RANDOM = -1.0


# --------------------------------------------------------------------------- closed forms
def bernoulli_kl(logit: Tensor, prior: float) -> Tensor:
    """``KL(Bern(pi) || Bern(prior))`` elementwise for ``pi = sigmoid(logit)``, with ``log pi =
    logsigmoid(logit)`` and ``log(1 - pi) = logsigmoid(-logit)``: finite, with finite
    gradients, where ``pi`` rounds to 0 or 1."""
    pi = torch.sigmoid(logit)
    return (pi * (F.logsigmoid(logit) - math.log(prior))
            + (1 - pi) * (F.logsigmoid(-logit) - math.log1p(-prior)))


def beta_log_prob_logit(logit: Tensor, a: float, b: float) -> Tensor:
    """``log Beta(sigmoid(logit); a, b)``, with ``log pi = logsigmoid(logit)``."""
    log_norm = math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)
    return (a - 1) * F.logsigmoid(logit) + (b - 1) * F.logsigmoid(-logit) - log_norm


def scale_mixture_log_prob(w: Tensor, mixture: float, sigma1: float, sigma2: float) -> Tensor:
    """``log(m N(w; 0, s1^2) + (1-m) N(w; 0, s2^2))`` elementwise (log-sum-exp)."""
    parts = torch.stack([
        math.log(mixture) - math.log(sigma1) - 0.5 * (w / sigma1) ** 2,
        math.log1p(-mixture) - math.log(sigma2) - 0.5 * (w / sigma2) ** 2])
    return torch.logsumexp(parts, 0) - 0.5 * math.log(2 * math.pi)


def gaussian_kl(mu: Tensor, log_var: Tensor, prior_std: float) -> Tensor:
    """``KL(N(mu, exp(log_var)) || N(0, prior_std^2))`` elementwise."""
    prior_var = prior_std ** 2
    return 0.5 * ((log_var.exp() + mu ** 2) / prior_var - 1 - log_var + math.log(prior_var))


def concrete(logit: Tensor, uniform: Tensor, temperature: float) -> Tensor:
    """Binary concrete sample ``sigmoid((logit + log u - log(1-u)) / tau)``."""
    return torch.sigmoid((logit + torch.logit(uniform)) / temperature)


# --------------------------------------------------------------------------- parameters
class LayerGates(_DropoutNd):
    """Variational parameters of one gated layer of ``units`` units: ``logit (units,)``, the
    gate ``state (units,)`` (:data:`RANDOM`, 0 or 1) and, for slabs, ``log_var`` shaped like
    the layer's weight. An adaptive dropout (Ba & Frey 2013): as a dropout module it samples
    only in training mode, and curvature products (the natural gradient's
    :func:`ngexp.curvature.products.curvature_mode`) switch it off like any dropout, so they
    see one deterministic network (the mean gates, the mean slabs)."""

    def __init__(self, layer: nn.Module, init_pi: float, init_log_var: float | None) -> None:
        super().__init__(p=1 - init_pi)
        weight = layer.weight
        units = num_units(layer)
        self.logit = nn.Parameter(torch.full((units,), math.log(init_pi / (1 - init_pi)),
                                             device=weight.device))
        self.register_buffer("state", torch.full((units,), RANDOM, device=weight.device))
        self.log_var = None if init_log_var is None else nn.Parameter(
            torch.full_like(weight, init_log_var))

    def pi(self) -> Tensor:
        return torch.sigmoid(self.logit)

    def mean(self) -> Tensor:
        """``E[z] (units,)``: ``pi`` for random gates, the fixed value for the others."""
        return torch.where(self.state < 0, self.pi(), self.state)

    def sample(self, batch: int, generator: torch.Generator, temperature: float) -> Tensor:
        """Relaxed gates ``(batch, units)``, fixed ones at their value (no gradient)."""
        uniform = torch.rand((batch, len(self.logit)), device=self.logit.device,
                             generator=generator).clamp_(1e-6, 1 - 1e-6)
        return torch.where(self.state < 0, concrete(self.logit, uniform, temperature),
                           self.state)

    def kl(self, prior: float) -> Tensor:
        """``sum_j KL(Bern(pi_j) || Bern(prior))`` over the random gates."""
        return torch.where(self.state < 0, bernoulli_kl(self.logit, prior), 0.0).sum()

    @torch.no_grad()
    def fix(self, below: float, above: float) -> bool:
        """Fix random gates with ``pi < below`` to 0 and ``pi > above`` (``>=`` when ``below ==
        above``) to 1; whether some gate was fixed to 0."""
        pi, random = self.pi(), self.state < 0
        on = pi >= above if below == above else pi > above
        off = random & (pi < below)
        self.state[off] = 0.0
        self.state[random & on] = 1.0
        return bool(off.any())

    def take_units(self, rows: Tensor) -> None:
        """Keep units ``rows`` (their logits, states and slab rows) after a removal."""
        for tensor in (self.logit, self.state, self.log_var):
            take(tensor, rows)


class Gating:
    """The forward hooks of the gated network (module docstring): on the module
    ``targets[name]`` (the layer ``name`` or its batch norm) the gates of ``bank[name]``, on
    slab layers the local reparameterization noise; samples are drawn from the trainer's
    generator at the relaxation's ``temperature``."""

    def __init__(self, model: nn.Module, layers: dict[str, nn.Module], targets: dict[str, str],
                 bank: dict[str, LayerGates], temperature: float, trainer: Trainer) -> None:
        self.model, self.layers, self.targets, self.bank = model, layers, targets, bank
        self.temperature, self.trainer = temperature, trainer
        self._handles: list[Any] = []

    def attach(self) -> None:
        """Register the forward hooks (once; after the preconditioner's, so its curvature
        sees the ungated layer outputs)."""
        if self._handles:
            return
        modules = dict(self.model.named_modules())
        for name, layer in self.layers.items():
            if self.bank[name].log_var is not None:
                self._handles.append(layer.register_forward_hook(self._noise_hook(name)))
            self._handles.append(modules[self.targets[name]].register_forward_hook(
                self._gate_hook(name)))

    def _gate_hook(self, name: str):
        def hook(module: nn.Module, _: tuple[Any, ...], output: Tensor) -> Tensor:
            gates = self.bank[name]
            z = (gates.sample(output.shape[0], self.trainer.generator, self.temperature)
                 if gates.training else gates.mean())
            return output * along_units(module, z, output)
        return hook

    def _noise_hook(self, name: str):
        """Local reparameterization: ``b = mu^T a + sqrt((sigma^2)^T a^2) eps`` per example."""
        def hook(module: nn.Module, args: tuple[Any, ...], output: Tensor) -> Tensor:
            if not self.bank[name].training:
                return output
            log_var = self.bank[name].log_var
            x = args[0]
            if isinstance(module, nn.Linear):
                variance = F.linear(x * x, log_var.exp())
            else:
                variance = module._conv_forward(x * x, log_var.exp(), None)
            noise = torch.randn(output.shape, device=output.device, dtype=output.dtype,
                                generator=self.trainer.generator)
            return output + variance.clamp_min(1e-16).sqrt() * noise
        return hook
