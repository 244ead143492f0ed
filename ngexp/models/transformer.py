"""Pre-norm transformer blocks shared by the ViT and the GPT (Vaswani et al. 2017; pre-norm as
Xiong et al. 2020 and GPT-2, Radford et al. 2019).

Every weight is a standard module the curvature capture of :mod:`ngexp.curvature` knows:
``nn.LayerNorm``, ``nn.MultiheadAttention`` (its ``in_proj_weight``/``in_proj_bias`` and
``out_proj``), ``nn.Linear`` and ``nn.Embedding``; no raw ``nn.Parameter``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ngexp.options import check, check_integer, check_positive, check_range


def check_transformer(dim: int, depth: int, heads: int, mlp_ratio: float, dropout: float,
                      **_: object) -> None:
    check_integer("depth", depth, 1)
    check_integer("heads", heads, 1)
    check_integer("dim", dim, 1)
    check(dim % heads == 0, "dim", dim, f"a multiple of heads={heads}")
    check_positive("mlp_ratio", mlp_ratio)
    check_range("dropout", dropout, 0, 1, closed="[)")


class Block(nn.Module):
    """``x + Attention(LN(x))``, then ``x + MLP(LN(x))`` with ``MLP = Linear -> GELU -> Linear``
    of hidden width ``round(mlp_ratio * dim)``. Input and output ``(B, T, dim)``; ``mask``
    ``(T, T)`` boolean, ``True`` where a query may not attend to a key."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, dropout: float) -> None:
        super().__init__()
        hidden = max(1, round(mlp_ratio * dim))
        self.norm1 = nn.LayerNorm(dim)
        self.attention = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim),
                                 nn.Dropout(dropout))

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        h = self.norm1(x)
        x = x + self.attention(h, h, h, attn_mask=mask, need_weights=False,
                               is_causal=mask is not None)[0]
        return x + self.mlp(self.norm2(x))


class Encoder(nn.Module):
    """``depth`` :class:`Block` s and a final ``nn.LayerNorm``: ``(B, T, dim) -> (B, T, dim)``;
    ``causal=True`` lets position ``t`` attend to positions ``<= t`` only."""

    def __init__(self, dim: int, depth: int, heads: int, mlp_ratio: float, dropout: float,
                 causal: bool = False) -> None:
        super().__init__()
        self.causal = causal
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio, dropout) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        steps = x.shape[1]
        mask = (torch.ones(steps, steps, dtype=torch.bool, device=x.device).triu(1)
                if self.causal else None)
        for block in self.blocks:
            x = block(x, mask)
        return self.norm(x)


def init_transformer(model: nn.Module, std: float = 0.02) -> None:
    """GPT-2/ViT initialization: Linear weights and embeddings ``N(0, std^2)`` (truncated at
    2 std for Linear), the attention's input projection too, biases zero, LayerNorms the
    identity; a Conv2d patch embedding Xavier-uniform on its ``(out, C*p*p)`` matrix (as MAE,
    He et al. 2022). The residual output projections (attention ``out_proj``, the MLP's second
    Linear) get ``std / sqrt(2 * depth)`` (GPT-2, Radford et al. 2019, Sec. 2.3)."""
    depth = sum(isinstance(m, Block) for m in model.modules())
    residual = std / math.sqrt(2 * max(depth, 1))
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=std, a=-2 * std, b=2 * std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)
        elif isinstance(module, nn.Conv2d):
            nn.init.xavier_uniform_(module.weight.view(module.weight.shape[0], -1))
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.MultiheadAttention):
            nn.init.trunc_normal_(module.in_proj_weight, std=std, a=-2 * std, b=2 * std)
            nn.init.zeros_(module.in_proj_bias)
    for module in model.modules():
        if isinstance(module, Block):
            for out in (module.attention.out_proj, module.mlp[2]):
                nn.init.trunc_normal_(out.weight, std=residual, a=-2 * residual, b=2 * residual)
