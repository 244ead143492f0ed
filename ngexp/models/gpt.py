"""A small causal transformer language model (GPT-2 style, Radford et al. 2019)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ngexp.data.spec import DataSpec
from ngexp.models.layers import require_data
from ngexp.models.transformer import Encoder, check_transformer, init_transformer
from ngexp.options import checked, configurable


@configurable("model", "gpt")
@checked(check_transformer)
class GPT(nn.Module):
    """Token ids ``(B, T)`` -> next-token logits ``(B, T, V)`` for ``data=text``.

    A token ``nn.Embedding`` (``V`` rows) plus a position ``nn.Embedding`` (one row per step of
    the data's ``bptt``), ``depth`` pre-norm blocks of causal ``heads``-head attention
    (position ``t`` attends to ``<= t`` only) and a GELU MLP of width ``mlp_ratio * dim``, a
    final LayerNorm and a bias-free Linear head. ``tie_weights=True`` makes the head share the
    token embedding's matrix (Press & Wolf 2017); the default keeps them apart so that every
    parameter belongs to one layer of the curvature.
    """

    def __init__(self, spec: DataSpec, dim: int = 128, depth: int = 2, heads: int = 4,
                 mlp_ratio: float = 4.0, dropout: float = 0.0,
                 tie_weights: bool = False) -> None:
        super().__init__()
        require_data(spec, "the GPT", ("tokens",))
        self.token = nn.Embedding(spec.num_classes, dim)
        self.position = nn.Embedding(spec.input_shape[0], dim)
        self.encoder = Encoder(dim, depth, heads, mlp_ratio, dropout, causal=True)
        self.head = nn.Linear(dim, spec.num_classes, bias=False)
        init_transformer(self)
        if tie_weights:
            self.head.weight = self.token.weight

    def forward(self, x: Tensor) -> Tensor:
        steps = x.shape[1]
        if steps > self.position.num_embeddings:
            raise ValueError(f"a sequence of {steps} tokens is longer than the "
                             f"{self.position.num_embeddings} positions of this model (data.bptt)")
        positions = torch.arange(steps, device=x.device)
        return self.head(self.encoder(self.token(x) + self.position(positions)))
