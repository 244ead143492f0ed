"""A small Vision Transformer (Dosovitskiy et al. 2021, "An Image is Worth 16x16 Words")."""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn

from ngexp.data.spec import DataSpec
from ngexp.models.layers import input_layers, require_data
from ngexp.models.transformer import Encoder, check_transformer, init_transformer
from ngexp.options import check_integer, checked, configurable


def check_vit(patch_size: int, **options: object) -> None:
    check_integer("patch_size", patch_size, 1)
    check_transformer(**options)


@configurable("model", "vit")
@checked(check_vit)
class ViT(nn.Module):
    """Patches -> tokens -> pre-norm transformer encoder -> pooled token -> Linear head.

    Input images ``(N, C, H, W)`` (standardized first), output logits ``(N, num_classes)``.
    Eq. 1-4 of the paper: a ``patch_size`` x ``patch_size`` patch embedding (``nn.Conv2d`` with
    stride ``patch_size``: ``(H / p) (W / p)`` tokens of width ``dim``), plus a learned position
    embedding (an ``nn.Embedding`` looked up at ``0 .. tokens - 1``); ``pool="cls"`` prepends a
    class token (an ``nn.Embedding`` of one row) and classifies its final state, ``pool="mean"``
    the mean of the final patch states. ``depth`` pre-norm blocks of ``heads``-head attention and
    a GELU MLP of width ``mlp_ratio * dim``, a final LayerNorm. Every parameter belongs to an
    ``nn.Conv2d``, ``nn.Embedding``, ``nn.LayerNorm``, ``nn.MultiheadAttention`` or
    ``nn.Linear`` (none is a raw ``nn.Parameter``). Images whose sides are not multiples of
    ``patch_size`` are zero-padded symmetrically to square multiples (in pixel space, as
    :class:`~ngexp.models.layers.PadTo`; 32x32 becomes 35x35 with 7x7 patches). Defaults: 16
    tokens of 7x7 on 28x28 images.
    """

    def __init__(self, spec: DataSpec, patch_size: int = 7, dim: int = 64, depth: int = 3,
                 heads: int = 4, mlp_ratio: float = 2.0, pool: Literal["cls", "mean"] = "cls",
                 dropout: float = 0.0) -> None:
        super().__init__()
        require_data(spec, "the ViT", ("image",))
        side = patch_size * math.ceil(max(spec.input_shape[-2:]) / patch_size)
        self.input = input_layers(spec, min_size=side)
        height, width = (max(size, side) for size in spec.input_shape[-2:])
        patches = (height // patch_size) * (width // patch_size)
        self.patch = nn.Conv2d(spec.in_channels, dim, kernel_size=patch_size, stride=patch_size)
        self.cls = nn.Embedding(1, dim) if pool == "cls" else None
        tokens = patches + (pool == "cls")
        self.position = nn.Embedding(tokens, dim)
        self.encoder = Encoder(dim, depth, heads, mlp_ratio, dropout)
        self.head = nn.Linear(dim, spec.num_classes)
        init_transformer(self)

    def forward(self, x: Tensor) -> Tensor:
        tokens = self.patch(self.input(x)).flatten(2).transpose(1, 2)  # (N, patches, dim)
        if self.cls is not None:
            first = self.cls(torch.zeros(1, dtype=torch.long, device=x.device))
            tokens = torch.cat([first.expand(len(tokens), 1, -1), tokens], dim=1)
        positions = torch.arange(tokens.shape[1], device=x.device)
        states = self.encoder(tokens + self.position(positions))
        return self.head(states[:, 0] if self.cls is not None else states.mean(dim=1))
