"""A residual MLP: ``model=resmlp``.

Input ``(N, *spec.input_shape)`` (images, sequences or vectors, or already flattened ``(N,
D)``), standardized by ngexp's input layer and flattened to ``x_0 (N, D)``; then::

    h_0     = Linear(D -> width)(x_0)
    h_{k+1} = h_k + Linear(width -> width)(act(Linear(width -> width)(act(h_k))))   k < blocks
    logits  = Linear(width -> num_classes)(act(h_blocks))                        (N, classes)

(pre-activation residual blocks, He et al. 2016). Every weight is a plain ``nn.Linear``, so
K-FAC, the pruners and the instruments cover it like ngexp's own models. Kaiming
initialization, with each block's last layer scaled by ``1 / sqrt(blocks)`` so that the
variance of ``h`` stays O(1) at any depth.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from ngexp.data.spec import DataSpec
from ngexp.models.layers import (
    Activation,
    Standardize,
    init_weights,
    input_layers,
    make_activation,
    require_data,
)
from ngexp.options import check_integer, checked, configurable


def check_resmlp(width: int, blocks: int, **_: Any) -> None:
    check_integer("width", width, 1)
    check_integer("blocks", blocks, 0)


class Block(nn.Module):
    """``h + W_2 act(W_1 act(h))`` for ``h (N, width)``."""

    def __init__(self, width: int, activation: str) -> None:
        super().__init__()
        self.branch = nn.Sequential(make_activation(activation), nn.Linear(width, width),
                                    make_activation(activation), nn.Linear(width, width))

    def forward(self, h: Tensor) -> Tensor:
        return h + self.branch(h)


@configurable("model", "resmlp")
@checked(check_resmlp)
class ResMLP(nn.Module):
    """See the module docstring; ``width`` units per layer, ``blocks`` residual blocks."""

    def __init__(self, spec: DataSpec, width: int = 256, blocks: int = 2,
                 activation: Activation = "relu") -> None:
        super().__init__()
        require_data(spec, "resmlp", ("image", "sequence", "vector"))
        self.input = input_layers(spec) if spec.kind == "image" else Standardize(spec)
        self.stem = nn.Linear(spec.input_dim, width)
        self.blocks = nn.Sequential(*(Block(width, activation) for _ in range(blocks)))
        self.head = nn.Sequential(make_activation(activation), nn.Linear(width, spec.num_classes))
        init_weights(self, activation)
        with torch.no_grad():
            for block in self.blocks:
                block.branch[-1].weight.div_(math.sqrt(blocks))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.blocks(self.stem(self.input(x).flatten(1))))
