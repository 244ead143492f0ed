"""Implicit filter-level sparsity of a CNN (Mehta, Kim & Theobalt, CVPR 2019).

A Conv2d filter (output channel) is *dead*

- by its scale: the BatchNorm2d that normalizes the filter's output has ``|gamma| <
  scale_threshold`` (``1e-3`` absolute, the paper's criterion), so the channel is nearly the
  constant ``beta``;
- by its activation: ``relu(pre-activation) == 0`` at every position of every probe example,
  the pre-activation being the BN output (or the conv output for a conv without BN), i.e. the
  channel's maximum over the probe set is ``<= 0``. This assumes a ReLU reads that tensor: in a
  post-activation residual block the second BN's ReLU comes after the addition of the shortcut,
  so there such a filter only never *raises* the block output.

Pairing (:func:`conv_norm_pairs`): one eval-mode forward with hooks; a BatchNorm2d is paired
with the Conv2d whose output tensor *is* its input (the same object: ``bn(conv(x))`` in VGG-BN
and the ResNet blocks). A conv whose output goes elsewhere first (an addition, a pooling) has
no BN and no scale criterion.

FLOPs follow :mod:`ngexp.prune.report` (``2 * weights * output positions`` per example): a dead
filter costs ``2 * (in_channels / groups) * kh * kw * H_out * W_out``, its own multiply-adds
only (the next layer's weights that read the dead channel are not counted).

:func:`dead_filter_masks` builds the filter :class:`~ngexp.prune.masks.Masks` that zero exactly
the dead filters (weights and bias). The BN channel then outputs ``beta - gamma mu /
sqrt(var + eps)``: for a scale-dead filter that is ``~ beta``, as before, so the network is
nearly unchanged; for an activation-dead one a positive constant may now pass the ReLU, which an
accuracy evaluation before and after shows.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ngexp.prune.masks import Masks, prunable_layers
from ngexp.prune.report import output_positions

CRITERIA = ("scale", "activation", "either")


@dataclass
class FilterState:
    """Dead filters of one Conv2d ``conv``: ``scale_dead`` (``None`` without a paired BN
    ``norm``) and ``activation_dead``, boolean ``(filters,)``; ``filter_flops`` is one filter's
    FLOPs per example."""

    conv: str
    norm: str | None
    scale_dead: Tensor | None
    activation_dead: Tensor
    filter_flops: int

    def dead(self, criterion: str = "either") -> Tensor:
        """Boolean ``(filters,)`` of the filters dead by ``criterion`` (one of :data:`CRITERIA`;
        without a BN the scale criterion marks none)."""
        if criterion not in CRITERIA:
            raise ValueError(f"criterion={criterion!r} is invalid: expected one of "
                             f"{', '.join(CRITERIA)}")
        scale = self.scale_dead if self.scale_dead is not None \
            else torch.zeros_like(self.activation_dead)
        return {"scale": scale, "activation": self.activation_dead,
                "either": scale | self.activation_dead}[criterion]


def _convs_and_norms(model: nn.Module) -> tuple[dict[str, nn.Conv2d], dict[str, nn.BatchNorm2d]]:
    convs = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    norms = {n: m for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    return convs, norms


@torch.no_grad()
def _probe_forward(model: nn.Module, inputs: Tensor, batch_size: int,
                   ) -> tuple[dict[str, str], dict[str, Tensor]]:
    """Eval-mode forward of ``inputs`` in batches: conv -> BN pairs (by tensor identity) and the
    per-channel maximum over examples and positions of every conv's and BN's output."""
    convs, norms = _convs_and_norms(model)
    produced: dict[int, tuple[str, weakref.ref[Tensor]]] = {}  # id(conv output) -> (conv, ref)
    pairs: dict[str, str] = {}
    maxima: dict[str, Tensor] = {}

    def keep_max(name: str, output: Tensor) -> None:
        channel_max = output.amax(dim=(0, *range(2, output.dim())))
        maxima[name] = channel_max if name not in maxima else torch.maximum(maxima[name],
                                                                            channel_max)

    def on_conv(name: str):
        def hook(_: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> None:
            produced[id(output)] = (name, weakref.ref(output))
            keep_max(name, output)
        return hook

    def on_norm(name: str):
        def hook(_: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> None:
            source = produced.get(id(args[0]))
            if source is not None and source[1]() is args[0]:
                pairs.setdefault(source[0], name)
            keep_max(name, output)
        return hook

    handles = [m.register_forward_hook(on_conv(n)) for n, m in convs.items()]
    handles += [m.register_forward_hook(on_norm(n)) for n, m in norms.items()]
    was_training = model.training
    model.eval()
    try:
        for begin in range(0, len(inputs), batch_size):
            model(inputs[begin:begin + batch_size])
            produced.clear()
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return pairs, maxima


def conv_norm_pairs(model: nn.Module, example: Tensor) -> dict[str, str]:
    """Conv2d name -> name of the BatchNorm2d that reads its output, from one eval-mode forward
    of ``example`` (module docstring); convs without one are left out."""
    return _probe_forward(model, example, len(example))[0]


def filter_sparsity(model: nn.Module, inputs: Tensor, *, scale_threshold: float = 1e-3,
                    batch_size: int = 256) -> list[FilterState]:
    """Dead filters of every Conv2d of ``model`` (that ran) on the probe ``inputs (n, C, H,
    W)``, in module order (module docstring)."""
    pairs, maxima = _probe_forward(model, inputs, batch_size)
    positions = output_positions(model, inputs[:1])
    convs, norms = _convs_and_norms(model)
    states = []
    for name, conv in convs.items():
        if name not in maxima:
            continue
        norm = pairs.get(name)
        gamma = norms[norm].weight if norm is not None else None
        scale_dead = gamma.detach().abs() < scale_threshold if gamma is not None else None
        activation_dead = maxima[norm if norm is not None else name] <= 0
        states.append(FilterState(name, norm, scale_dead, activation_dead,
                                  2 * conv.weight[0].numel() * positions[name]))
    return states


def dense_flops(model: nn.Module, example: Tensor) -> int:
    """FLOPs per example of every Linear/Conv2d of ``model`` on ``example (1, ...)``, dense
    (``2 * weights * output positions``, :func:`~ngexp.prune.report.output_positions`)."""
    modules = dict(model.named_modules())
    return sum(2 * modules[name].weight.numel() * count
               for name, count in output_positions(model, example).items())


def dead_flops(states: list[FilterState], criterion: str = "either") -> int:
    """FLOPs per example of the filters of ``states`` dead by ``criterion``."""
    return sum(int(state.dead(criterion).sum()) * state.filter_flops for state in states)


def filter_metrics(model: nn.Module, inputs: Tensor, states: list[FilterState]) -> dict[str, float]:
    """``filters/`` scalars: per conv (``filters/<conv>/...``) and over all convs, the fractions
    of filters dead by ``scale`` (of the convs with a BN), by ``activation`` and ``either``;
    ``dead_flops`` (per example, either criterion) and ``dead_flops_fraction`` of the dense
    Linear/Conv2d FLOPs of :func:`~ngexp.prune.report.output_positions` at ``inputs[:1]``."""
    dense = dense_flops(model, inputs[:1])
    values: dict[str, float] = {}
    totals = {key: 0 for key in ("scale", "scale_filters", "activation", "either", "filters")}
    for state in states:
        filters = len(state.activation_dead)
        counts = {criterion: int(state.dead(criterion).sum()) for criterion in CRITERIA}
        if state.scale_dead is not None:
            values[f"filters/{state.conv}/scale"] = counts["scale"] / filters
            totals["scale"] += counts["scale"]
            totals["scale_filters"] += filters
        values[f"filters/{state.conv}/activation"] = counts["activation"] / filters
        values[f"filters/{state.conv}/either"] = counts["either"] / filters
        totals["activation"] += counts["activation"]
        totals["either"] += counts["either"]
        totals["filters"] += filters
    values["filters/scale"] = totals["scale"] / max(totals["scale_filters"], 1)
    values["filters/activation"] = totals["activation"] / max(totals["filters"], 1)
    values["filters/either"] = totals["either"] / max(totals["filters"], 1)
    flops = dead_flops(states)
    values["filters/dead_flops"] = float(flops)
    values["filters/dead_flops_fraction"] = flops / max(dense, 1)
    return values


def dead_filter_masks(model: nn.Module, states: list[FilterState],
                      criterion: str = "either") -> Masks:
    """Active filter :class:`Masks` over every Linear/Conv2d of ``model`` that prune exactly the
    filters of ``states`` dead by ``criterion``; apply with :meth:`Masks.mask_weights` (keep a
    copy of the weights to evaluate before and after)."""
    masks = Masks(prunable_layers(model), structure="filter")
    for state in states:
        masks.set_alive(state.conv, ~state.dead(criterion))
    masks.active = True
    return masks
