"""Sparsity and FLOPs of a masked network, per layer and for the whole model.

FLOPs count the multiply-adds of the Linear/Conv2d weights that are not pruned, 2 per weight
and output position and example (biases, activations and normalization are left out): a layer
with ``nnz`` remaining weights and ``P`` output positions (``H_out * W_out`` for Conv2d, 1 for
a Linear on vectors) costs ``2 * nnz * P``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ngexp.prune.masks import PRUNABLE_TYPES, Masks, hooked_eval_forward


@torch.no_grad()
def output_positions(model: nn.Module, example: Tensor) -> dict[str, int]:
    """Output positions per example of every Linear/Conv2d of ``model`` (by name), from one
    forward pass of ``example`` (a batch of one) with hooks, in eval mode."""
    positions: dict[str, int] = {}

    def hook(name: str, module: nn.Module):
        channels = module.out_features if isinstance(module, nn.Linear) else module.out_channels

        def record(_: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> None:
            positions[name] = positions.get(name, 0) + output.numel() // (len(output) * channels)
        return record

    hooked_eval_forward(model, example, {m: hook(name, m) for name, m in model.named_modules()
                                         if isinstance(m, PRUNABLE_TYPES)})
    return positions


def sparsity_report(model: nn.Module, masks: Masks, positions: dict[str, int]) -> dict[str, float]:
    """``prune/`` metrics: ``sparsity`` (pruned fraction of the weights in pruning scope),
    ``params``/``nonzero_params`` (all parameters of the model), ``flops``/``flops_dense`` per
    example, and per layer in scope ``<layer>/sparsity``, ``<layer>/flops`` and, for filter
    pruning, ``<layer>/channels`` (remaining output channels) and ``channel_sparsity``."""
    params = sum(p.numel() for p in model.parameters())
    pruned = sum(int((m == 0).sum()) for m in masks.tensors) if masks.active else 0
    metrics: dict[str, float] = {"prune/params": params, "prune/nonzero_params": params - pruned}
    scope_total = scope_pruned = channels_total = channels_alive = 0
    flops = dense_flops = 0
    for name, module in model.named_modules():
        if not isinstance(module, PRUNABLE_TYPES) or name not in positions:
            continue
        size = module.weight.numel()
        in_scope = name in masks.layers
        nonzero = int(masks.weight_mask(name).count_nonzero()) if in_scope and masks.active \
            else size
        layer_flops = 2 * nonzero * positions[name]
        flops += layer_flops
        dense_flops += 2 * size * positions[name]
        if not in_scope:
            continue
        scope_total += size
        scope_pruned += size - nonzero
        metrics[f"prune/{name}/sparsity"] = 1 - nonzero / size
        metrics[f"prune/{name}/flops"] = layer_flops
        if masks.structure == "filter":
            alive = int(masks.alive(name).sum())
            metrics[f"prune/{name}/channels"] = alive
            channels_total += masks.num_units(name)
            channels_alive += alive
    metrics["prune/sparsity"] = scope_pruned / max(scope_total, 1)
    if masks.structure == "filter":
        metrics["prune/channel_sparsity"] = 1 - channels_alive / max(channels_total, 1)
    metrics["prune/flops"] = flops
    metrics["prune/flops_dense"] = dense_flops
    return metrics
