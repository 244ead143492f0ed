"""Pruning while training by variational inference: ``prune=variational_bernoulli`` and
``prune=spike_and_slab`` (equations and papers: ``docs/pruning_variational.md``).

Every unit ``j`` (Linear output neuron, Conv2d filter) of the gated layers -- the prunable
layers of :func:`ngexp.prune.masks.prunable_layers` without the output layer -- is multiplied
by a gate ``z_j`` with variational posterior ``q(z_j) = Bern(pi_j)``, ``pi_j = sigmoid(l_j)``,
sampled from its binary concrete relaxation in training and at its mean ``pi`` in evaluation
(the family and the gated forward: :mod:`ngexp.prune.gates`).

The loss per example is the negative ELBO divided by the number of training examples ``N``:
``-ELBO / N = E_q[NLL] + KL / N`` (the task's mean loss is the first term,
:meth:`VariationalPruner.loss_term` the second; ``kl_weight`` tempers it). Each family is a
subclass with its KL terms, in closed form:

- gates: ``KL(Bern(pi) || Bern(pi_0)) = pi log(pi/pi_0) + (1-pi) log((1-pi)/(1-pi_0))``;
- :class:`VariationalBernoulli`: the hyper-prior ``Beta(a, b)`` on ``pi`` (``-log Beta(pi; a,
  b)``, U-shaped for ``a, b < 1``) and the Gaussian scale-mixture prior (Blundell et al. 2015)
  ``p(w) = m N(0, s1^2) + (1-m) N(0, s2^2)`` on point-estimated weights (``-log p(w)``);
- :class:`SpikeAndSlab`: Gaussian slabs ``q(w | z=1) = N(mu, sigma^2)`` with the local
  reparameterization trick (Kingma et al. 2015), prior ``N(0, s0^2)`` and layer-wise prior
  inclusion ``pi_0``: ``sum_j KL(Bern(pi_j) || Bern(pi_0)) + pi_j KL(N(mu_j, sigma_j^2) ||
  N(0, s0^2))`` (the spikes at 0 of posterior and prior cancel).

The fixing schedule (:meth:`VariationalPruner.fix`): every ``fix_every`` steps, gates with ``pi
< fix_below`` are fixed to 0 and gates with ``pi > fix_above`` to 1: they stop being random
(their ``pi`` gets no gradient and no KL). After the last step the remaining gates are fixed at
1/2. Units fixed to 0 are removed from the network (:func:`units_to_keep`,
:func:`remove_gated_units`, on :mod:`ngexp.prune.shrink`) where the model is a plain chain;
elsewhere (residual connections) they stay, gated to 0, and a warning says so.

The variational parameters (gate logits, slab log-variances) live in a ``variational_gates``
submodule of each gated layer, added before the optimizer is built, so every optimizer trains
them and every checkpoint holds them; K-FAC/EKFAC leave them their plain gradient (the
coverage report names them). Data-parallel training is refused: DDP cannot follow parameters
that shrink.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ngexp.callbacks import Callback, Trainer
from ngexp.distributed.world import current
from ngexp.errors import UserError
from ngexp.options import (
    check,
    check_integer,
    check_nonnegative,
    check_positive,
    check_range,
    checked,
    configurable,
)
from ngexp.prune.gates import (
    Gating,
    LayerGates,
    beta_log_prob_logit,
    gaussian_kl,
    scale_mixture_log_prob,
)
from ngexp.prune.masks import PRUNABLE_TYPES, Masks, prunable_layers, unwrap
from ngexp.prune.report import output_positions, sparsity_report
from ngexp.prune.shrink import (
    Link,
    call_order,
    chain_links,
    norms_after,
    num_units,
    remove_units,
    take,
)


def check_variational(temperature: float, init_pi: float, prior_pi: float, kl_weight: float,
                      fix_below: float, fix_above: float, fix_every: int, fix_start: int,
                      gate_grad_scale: float, kl_warmup_steps: int, exclude: Sequence[str],
                      **_: Any) -> None:
    check_positive("gate_grad_scale", gate_grad_scale)
    check_integer("kl_warmup_steps", kl_warmup_steps, 0)
    check_positive("temperature", temperature)
    check_range("init_pi", init_pi, 0, 1, closed="()")
    check_range("prior_pi", prior_pi, 0, 1, closed="()")
    check_nonnegative("kl_weight", kl_weight)
    check_range("fix_below", fix_below, 0, 0.5, closed="[)")
    check_range("fix_above", fix_above, 0.5, 1, closed="(]")
    check_integer("fix_every", fix_every, 1)
    check_integer("fix_start", fix_start, 0)
    check(all(isinstance(p, str) for p in exclude), "exclude", list(exclude),
          "a list of layer-name patterns")


@checked(check_variational)
class VariationalPruner(Callback):
    """Base of the variational pruners (module docstring). Options: the relaxation's
    ``temperature``, the initial ``init_pi`` and prior ``prior_pi`` inclusion probabilities,
    ``kl_weight`` (1: the ELBO) reached linearly over ``kl_warmup_steps`` (Sønderby et al.
    2016's warm-up), the fixing schedule (``fix_below``, ``fix_above`` every
    ``fix_every`` steps from ``fix_start``; ``final_fix``: fix the rest at 1/2 after the last
    step), ``gate_grad_scale`` (multiplies the gate logits' gradient: their learning rate
    relative to the weights' under SGD-like optimizers; Adam is invariant to it) and
    ``exclude`` (layer-name patterns left ungated)."""

    name = "pruner"
    #: ``log_var`` initial value of the slabs (``None``: point-estimated weights).
    init_log_var: float | None = None

    def __init__(self, temperature: float = 2 / 3, init_pi: float = 0.9,
                 prior_pi: float = 0.1, kl_weight: float = 1.0, fix_below: float = 0.05,
                 fix_above: float = 0.95, fix_every: int = 50, fix_start: int = 0,
                 final_fix: bool = True, gate_grad_scale: float = 100.0,
                 kl_warmup_steps: int = 0, exclude: Sequence[str] = ()) -> None:
        self.temperature, self.init_pi, self.prior_pi = temperature, init_pi, prior_pi
        self.kl_weight, self.fix_below, self.fix_above = kl_weight, fix_below, fix_above
        self.fix_every, self.fix_start, self.final_fix = fix_every, fix_start, final_fix
        self.gate_grad_scale, self.exclude = gate_grad_scale, list(exclude)
        self.kl_warmup_steps = kl_warmup_steps
        self.model: nn.Module | None = None
        self.trainer: Trainer | None = None
        #: The variational parameters of each gated layer (a submodule of the layer).
        self.bank: dict[str, LayerGates] = {}
        self.layers: dict[str, nn.Module] = {}
        self.links: dict[str, Link] | None = None
        #: Original indices of the units still in each gated layer.
        self.kept: dict[str, Tensor] = {}
        self.targets: dict[str, str] = {}
        self.positions: dict[str, int] = {}
        self.dense: dict[str, float] = {}
        self.examples = 1
        self.finished = False
        self.gating: Gating | None = None
        self._last_kl: Tensor | None = None

    # ------------------------------------------------------------------ engine hooks
    def on_model_built(self, trainer: Trainer) -> None:
        """Gate the layers: add the variational parameters to the model (before the optimizer
        is built, so it trains them) and find out whether pruned units can be removed."""
        if current().distributed:
            raise UserError(f"prune={self.option}: data-parallel training is not supported "
                            f"(DDP cannot follow parameters whose shape changes when units are "
                            f"removed); run one process")
        model = self.model = unwrap(trainer.model)
        self.trainer = trainer
        layers = prunable_layers(model, keep_last_dense=True, exclude=self.exclude)
        if not layers:
            raise UserError(f"prune={self.option}: the model has no Linear/Conv2d layer to gate "
                            f"but its output layer (check prune.exclude)")
        self.layers = layers
        for name, layer in layers.items():
            gates = self.bank[name] = LayerGates(layer, self.init_pi, self.init_log_var)
            layer.add_module("variational_gates", gates)
            gates.logit.register_hook(lambda grad, scale=self.gate_grad_scale: grad * scale)
            self.kept[name] = torch.arange(num_units(layer), device="cpu")  # indices, saved
        example = trainer.data.train.inputs[:4]
        self.positions = output_positions(model, example[:1])
        norms = norms_after(model, call_order(model, example[:1]), list(layers))
        #: The module whose output each gate multiplies: the layer or its batch norm.
        self.targets = {name: norm or name for name, norm in norms.items()}
        self.gating = Gating(model, layers, self.targets, self.bank, self.temperature, trainer)
        links = chain_links(model, list(layers), example)
        self.links = None if links is None else {link.layer: link for link in links}
        if links is None:
            warnings.warn(f"prune={self.option}: {type(model).__name__} is not a plain chain "
                          f"of layers (e.g. residual connections): units whose gate is fixed "
                          f"to 0 stay in the network, gated to zero, instead of being removed",
                          stacklevel=2)
        self.dense = gate_counts(model, layers, self.bank, self.positions)
        targets = trainer.data.train.targets
        self.examples = len(targets) * trainer.task.num_terms(targets[:1])

    def on_train_start(self, trainer: Trainer) -> None:
        self.gating.attach()

    def loss_term(self, trainer: Trainer) -> Tensor:
        """``kl_weight * KL / N`` (differentiable, on the device), during the first
        ``kl_warmup_steps`` steps times ``(step + 1) / (kl_warmup_steps + 1)``."""
        warmup = min(1.0, (trainer.step + 1) / (self.kl_warmup_steps + 1))
        term = self.kl() * (warmup * self.kl_weight / self.examples)
        self._last_kl = term.detach()
        return term

    def on_step_start(self, trainer: Trainer) -> None:
        self.gating.attach()  # also when a loop calls the step without on_train_start
        step = trainer.step
        if step > 0 and step >= self.fix_start and step % self.fix_every == 0:
            self.fix(trainer, self.fix_below, self.fix_above)

    def on_epoch_end(self, trainer: Trainer) -> None:
        """After the last step: fix every random gate at 1/2 (before the final evaluation
        and checkpoint)."""
        if self.final_fix and not self.finished and trainer.step >= trainer.total_steps:
            self.fix(trainer, 0.5, 0.5)
            self.finished = True

    def metrics(self, trainer: Trainer) -> dict[str, float]:
        return self.report()

    def state_dict(self) -> dict[str, Any]:
        return {"kept": {name: kept.clone() for name, kept in self.kept.items()},
                "finished": self.finished}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Shrink the model to the saved sizes (the engine loads the callbacks' states before
        the model's, which then fills in the values)."""
        if not state:
            return
        self.finished = bool(state["finished"])
        for name, kept in state["kept"].items():
            if len(kept) < len(self.kept[name]):
                keep = torch.arange(len(kept), device=self.bank[name].logit.device)
                remove_gated_units(self.model, self.links[name], keep, self.bank)
            self.kept[name] = kept.clone()
        refresh_optimizer(self.trainer, reset=False)

    # ------------------------------------------------------------------ the ELBO
    def gates(self, name: str) -> LayerGates:
        return self.bank[name]

    def kl(self) -> Tensor:
        """The KL terms of the negative ELBO (a 0-dim tensor)."""
        raise NotImplementedError

    @property
    def option(self) -> str:
        return type(self).__name__

    # ------------------------------------------------------------------ fixing and removal
    @torch.no_grad()
    def fix(self, trainer: Trainer, below: float, above: float) -> None:
        """Fix random gates with ``pi < below`` to 0 and ``pi > above`` (``>=`` when ``below ==
        above``) to 1; remove the units fixed to 0 where the model allows (then the optimizer
        state and curvature are reset)."""
        changed = False
        for gates in self.bank.values():
            changed |= gates.fix(below, above)
        removals = units_to_keep(self.bank) if self.links is not None else {}
        if changed or removals:  # first: the curvature's records hold graphs of the old shapes
            refresh_optimizer(self.trainer, reset=True)
        for name, keep in removals.items():
            self.kept[name] = self.kept[name][keep.cpu()]
            remove_gated_units(self.model, self.links[name], keep, self.bank)
        if removals:
            refresh_optimizer(self.trainer, reset=False)
        changed |= bool(removals)
        if changed or below == above:
            report = self.report()
            trainer.log(report)
            trainer.console.print(
                f"{self.option}: fixed gates at step {trainer.step}: "
                f"{report['prune/units_alive']:.0f} units left of "
                f"{self.dense['prune/units']:.0f}, {report['prune/params']:.0f} parameters, "
                f"{report['prune/flops']:.4g} FLOPs per example")

    # ------------------------------------------------------------------ report
    def report(self) -> dict[str, float]:
        """``prune/`` scalars: parameters and FLOPs per example now (removed units gone,
        units gated to zero not counted as nonzero) and before pruning (``*_dense``),
        ``sparsity`` (removed or zero-gated fraction of the original parameters),
        ``channel_sparsity`` (of the gated units), the fraction of gates still random, per
        layer ``<layer>/channels``, and ``kl`` (the last ``kl_weight * KL / N``)."""
        now = gate_counts(self.model, self.layers, self.bank, self.positions)
        dense = self.dense
        units = dense["prune/units"]
        random = sum(int((self.gates(n).state < 0).sum()) for n in self.layers)
        metrics = {**now, "prune/params_dense": dense["prune/params"],
                   "prune/flops_dense": dense["prune/flops"],
                   "prune/sparsity": 1 - now["prune/nonzero_params"] / dense["prune/params"],
                   "prune/channel_sparsity": 1 - now["prune/units_alive"] / units,
                   "prune/random_gates": random / units}
        metrics.pop("prune/units")
        for name in self.layers:
            metrics[f"prune/{name}/channels"] = int((self.gates(name).state != 0).sum())
        if self._last_kl is not None:
            metrics["prune/kl"] = float(self._last_kl)
        return metrics


def units_to_keep(bank: dict[str, LayerGates]) -> dict[str, Tensor]:
    """Sorted indices ``(k,)`` of the units to keep in each gated layer that has gates fixed
    to 0: the others (one, gated to zero, where all are: a layer needs a width)."""
    removals = {}
    for name, gates in bank.items():
        keep = (gates.state != 0).nonzero().flatten()
        if len(keep) == 0:
            keep = gates.logit.argmax().reshape(1)
        if len(keep) < len(gates.state):
            removals[name] = keep
    return removals


def remove_gated_units(model: nn.Module, link: Link, keep: Tensor,
                       bank: dict[str, LayerGates]) -> None:
    """Keep units ``keep`` of ``link.layer`` (:func:`ngexp.prune.shrink.remove_units`), with
    their gates and the columns of the consumer's slabs."""
    def extra(layer: str, rows: Tensor, columns: Tensor) -> None:
        bank[layer].take_units(rows)
        if link.consumer in bank:
            take(bank[link.consumer].log_var, columns, dim=1)

    remove_units(model, link, keep, extra)


def refresh_optimizer(trainer: Trainer | None, reset: bool) -> None:
    """The preconditioner's layers read their new shapes; ``reset``: optimizer state and
    curvature are forgotten (their shapes changed)."""
    optimizer = getattr(trainer, "optimizer", None)
    if optimizer is None:
        return
    if optimizer.preconditioner is not None:  # every kind: batch norms shrink too
        for layer in optimizer.preconditioner.capture.layers:
            layer.read_shape()
    if reset:
        optimizer.reset_state()


def gate_counts(model: nn.Module, layers: dict[str, nn.Module], bank: dict[str, LayerGates],
                positions: dict[str, int]) -> dict[str, float]:
    """Parameters (without the variational ones), FLOPs and units of the model now."""
    own = {id(p) for gates in bank.values() for p in gates.parameters()}
    params = sum(p.numel() for p in model.parameters() if id(p) not in own)
    masks = Masks(layers, "filter")
    for name in layers:
        masks.set_alive(name, bank[name].state != 0)
    report = sparsity_report(model, masks, positions)
    gated = sum(int((mask == 0).sum()) for mask in masks.tensors)
    return {"prune/params": params, "prune/nonzero_params": params - gated,
            "prune/flops": report["prune/flops"],
            "prune/units": sum(num_units(layer) for layer in layers.values()),
            "prune/units_alive": sum(int((bank[n].state != 0).sum()) for n in layers)}


def check_bernoulli(hyper_a: float, hyper_b: float, mixture: float, sigma1: float,
                    sigma2: float, **_: Any) -> None:
    check_positive("hyper_a", hyper_a)
    check_positive("hyper_b", hyper_b)
    check_range("mixture", mixture, 0, 1, closed="()")
    check_positive("sigma1", sigma1)
    check_positive("sigma2", sigma2)


@configurable("prune", "variational_bernoulli")
@checked(check_bernoulli)
class VariationalBernoulli(VariationalPruner):
    """Bernoulli gates with a ``Beta(hyper_a, hyper_b)`` hyper-prior on their probabilities and
    the scale-mixture prior ``mixture N(0, sigma1^2) + (1-mixture) N(0, sigma2^2)`` on every
    Linear/Conv2d weight (point estimates: its term is ``-log p(w)``). The gates start at
    ``init_pi = 1/2``, where the U-shaped hyper-prior favours neither 0 nor 1 (from 0.9 it held
    almost every gate at 1: 0.4% of LeNet-5's channels pruned in 5 epochs on 10k images,
    against 40% at 1/2; ``docs/pruning_variational.md``)."""

    def __init__(self, hyper_a: float = 0.5, hyper_b: float = 0.5, mixture: float = 0.5,
                 sigma1: float = 1.0, sigma2: float = 0.02, init_pi: float = 0.5,
                 **options: Any) -> None:
        super().__init__(init_pi=init_pi, **options)
        self.hyper_a, self.hyper_b = hyper_a, hyper_b
        self.mixture, self.sigma1, self.sigma2 = mixture, sigma1, sigma2

    @property
    def option(self) -> str:
        return "variational_bernoulli"

    def kl(self) -> Tensor:
        terms = []
        for name in self.layers:
            gates = self.gates(name)
            hyper = beta_log_prob_logit(gates.logit, self.hyper_a, self.hyper_b)
            terms.append(gates.kl(self.prior_pi)
                         - torch.where(gates.state < 0, hyper, 0.0).sum())
        weights = [m.weight for m in self.model.modules() if isinstance(m, PRUNABLE_TYPES)]
        terms += [-scale_mixture_log_prob(w, self.mixture, self.sigma1, self.sigma2).sum()
                  for w in weights]
        return torch.stack(terms).sum()


def check_slab(prior_std: float, init_log_var: float, layer_prior_pi: Sequence[float],
               **_: Any) -> None:
    check_positive("prior_std", prior_std)
    check(isinstance(init_log_var, (int, float)) and math.isfinite(init_log_var),
          "init_log_var", init_log_var, "a finite number")
    check(all(isinstance(p, (int, float)) and 0 < p < 1 for p in layer_prior_pi),
          "layer_prior_pi", list(layer_prior_pi),
          "a list of numbers in (0, 1), one per gated layer (empty: prior_pi for all)")


@configurable("prune", "spike_and_slab")
@checked(check_slab)
class SpikeAndSlab(VariationalPruner):
    """Spike-and-slab node selection: Gaussian slabs ``N(mu, sigma^2)`` (``mu`` the layer's
    weight, ``log sigma^2`` initialized to ``init_log_var``) sampled by local
    reparameterization, prior ``N(0, prior_std^2)``, inclusion priors per gated layer
    (``layer_prior_pi``, in forward order; empty: ``prior_pi`` everywhere). The KL is warmed up
    over ``kl_warmup_steps = 300``: at full weight from the first step the slabs' KL (about 2
    nats per weight at ``init_log_var``) left 1 of LeNet-5's 225 units before the data term
    could hold the useful ones (``docs/pruning_variational.md``)."""

    def __init__(self, prior_std: float = 0.1, init_log_var: float = -10.0,
                 layer_prior_pi: Sequence[float] = (), kl_warmup_steps: int = 300,
                 **options: Any) -> None:
        super().__init__(kl_warmup_steps=kl_warmup_steps, **options)
        self.prior_std, self.init_log_var = prior_std, init_log_var
        self.layer_prior_pi = list(layer_prior_pi)

    @property
    def option(self) -> str:
        return "spike_and_slab"

    def on_model_built(self, trainer: Trainer) -> None:
        super().on_model_built(trainer)
        if self.layer_prior_pi and len(self.layer_prior_pi) != len(self.layers):
            raise UserError(f"prune.layer_prior_pi={self.layer_prior_pi} has "
                            f"{len(self.layer_prior_pi)} values but the model has "
                            f"{len(self.layers)} gated layers ({', '.join(self.layers)})")

    def priors(self) -> list[float]:
        return self.layer_prior_pi or [self.prior_pi] * len(self.layers)

    def kl(self) -> Tensor:
        terms = []
        for (name, layer), prior in zip(self.layers.items(), self.priors(), strict=True):
            gates = self.gates(name)
            slab = gaussian_kl(layer.weight, gates.log_var, self.prior_std)
            per_unit = slab.reshape(len(gates.logit), -1).sum(1)
            terms.append(gates.kl(prior) + (gates.mean() * per_unit).sum())
        return torch.stack(terms).sum()
