"""Choosing the units to remove: the lowest scores, globally or with one sparsity per layer.

Counts are exact: a target sparsity ``s`` over ``N`` units prunes ``round(s * N)`` units, also
in layerwise scope, where each layer gets ``s`` of its own units up to rounding (largest
remainder apportionment). Pruned units stay pruned, and no layer loses its last unit (a layer
without any unit would cut the network).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def target_count(sparsity: float, total: int) -> int:
    """Units pruned at ``sparsity`` out of ``total``."""
    return round(sparsity * total)


def layerwise_counts(sparsity: float, sizes: list[int], pruned: list[int]) -> list[int]:
    """Pruned units per layer: ``sparsity * size`` each, rounded so that they sum to
    ``round(sparsity * sum(sizes))``, at least the ``pruned`` counts, at most ``size - 1``
    (a layer already pruned past its share keeps its count and the others give way)."""
    caps = [size - 1 for size in sizes]
    counts = [min(max(math.floor(sparsity * size), done), cap)
              for size, done, cap in zip(sizes, pruned, caps, strict=True)]
    remainder = target_count(sparsity, sum(sizes)) - sum(counts)
    order = sorted(range(len(sizes)), key=lambda i: counts[i] - sparsity * sizes[i])
    for i in order:  # short of the target: one more in the layers furthest below their share
        if remainder <= 0:
            break
        if counts[i] < caps[i]:
            counts[i] += 1
            remainder -= 1
    while remainder < 0:  # layers already pruned past their share: take back from the others
        above = [i for i in range(len(sizes)) if counts[i] > pruned[i]]
        if not above:
            break
        i = max(above, key=lambda j: counts[j] - sparsity * sizes[j])
        counts[i] -= 1
        remainder += 1
    return counts


def _masked(scores: list[Tensor], alive: list[Tensor]) -> list[Tensor]:
    """Scores with pruned units at -inf (pruned first) and each layer's best alive unit at
    +inf (never pruned)."""
    out = []
    for score, keep in zip(scores, alive, strict=True):
        score = torch.where(keep, score, -math.inf)
        if keep.any():
            score[score.argmax()] = math.inf
        out.append(score)
    return out


def select_global(scores: list[Tensor], alive: list[Tensor], count: int) -> list[Tensor]:
    """New ``alive`` masks after pruning the ``count`` lowest-scored units over all layers."""
    flat = torch.cat(_masked(scores, alive))
    count = min(count, flat.numel() - len(scores))
    keep = torch.ones_like(flat, dtype=torch.bool)
    keep[torch.topk(flat, count, largest=False, sorted=False).indices] = False
    return list(keep.split([s.numel() for s in scores]))


def select_layerwise(scores: list[Tensor], alive: list[Tensor], counts: list[int]) -> list[Tensor]:
    """New ``alive`` masks after pruning the ``counts[l]`` lowest-scored units of each layer."""
    out = []
    for score, count in zip(_masked(scores, alive), counts, strict=True):
        keep = torch.ones_like(score, dtype=torch.bool)
        keep[torch.topk(score, count, largest=False, sorted=False).indices] = False
        out.append(keep)
    return out
