"""The deep autoencoder benchmark of the second-order optimization papers.

Hinton & Salakhutdinov (2006) MNIST autoencoder, trained without pre-training by Hessian-free
optimization (Martens 2010) and K-FAC (Martens & Grosse 2015, Sec. 13): encoder
784-1000-500-250-30 with logistic hidden units and a linear 30-unit code layer, and the mirrored
decoder 30-250-500-1000-784 whose outputs are the logits of Bernoulli means; the loss is the
binary cross-entropy summed over pixels (:class:`ngexp.curvature.tasks.Reconstruction`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from torch import Tensor, nn

from ngexp.data.spec import DataSpec
from ngexp.models.layers import (
    Activation,
    dense_stack,
    init_weights,
    require_data,
    sparse_init_,
)
from ngexp.options import check, checked, configurable


def check_autoencoder(encoder_widths: Sequence[int], **_: object) -> None:
    check(len(encoder_widths) >= 1 and all(isinstance(w, int) and w >= 1
                                           for w in encoder_widths),
          "encoder_widths", list(encoder_widths), "a non-empty list of integers >= 1")


@configurable("model", "autoencoder")
@checked(check_autoencoder)
class Autoencoder(nn.Module):
    """Deep autoencoder on flattened inputs.

    Input ``(N, C, H, W)`` or ``(N, D)`` with values in [0, 1], output logits ``(N, D)``,
    ``D = C*H*W``. ``encoder_widths`` ends with the code size; the decoder mirrors the hidden
    widths. The input is *not* standardized: the targets are the raw inputs, and the original
    benchmark feeds raw pixel intensities.

    ``init="sparse"`` is the sparse initialization of Martens (2010) used by the HF and K-FAC
    papers (15 nonzero N(0, 1) incoming weights per unit, zero biases); ``"xavier"`` the
    Glorot-Bengio rule with the activation's gain.
    """

    task = "reconstruction"

    def __init__(
        self,
        spec: DataSpec,
        encoder_widths: Sequence[int] = (1000, 500, 250, 30),
        activation: Activation = "sigmoid",
        init: Literal["sparse", "xavier"] = "sparse",
    ) -> None:
        super().__init__()
        require_data(spec, "the autoencoder", ("image", "sequence", "vector"))
        *hidden, code = encoder_widths
        self.encoder = dense_stack(spec.input_dim, hidden, code, activation)
        self.decoder = dense_stack(code, hidden[::-1], spec.input_dim, activation)
        if init == "sparse":
            for module in self.modules():
                if isinstance(module, nn.Linear):
                    sparse_init_(module.weight)
                    nn.init.zeros_(module.bias)
        else:
            init_weights(self, activation)

    def encode(self, x: Tensor) -> Tensor:
        """Code ``(N, code size)`` of inputs ``x``."""
        return self.encoder(x.flatten(1))

    def forward(self, x: Tensor) -> Tensor:
        return self.decoder(self.encode(x))

