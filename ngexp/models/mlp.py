"""Fully connected classifiers: the default MLP and LeCun's LeNet-300-100."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from ngexp.data.spec import DataSpec
from ngexp.models.layers import (
    Activation,
    dense_stack,
    init_weights,
    input_layers,
    require_data,
)
from ngexp.options import check, checked, configurable


def check_mlp(widths: Sequence[int], **_: object) -> None:
    check(all(isinstance(w, int) and w >= 1 for w in widths), "widths", list(widths),
          "a list of integers >= 1")


@configurable("model", "mlp")
@checked(check_mlp)
class MLP(nn.Module):
    """Standardize, flatten, ``Linear -> [BatchNorm1d] -> activation`` per hidden width, Linear.

    Input images ``(N, C, H, W)`` (or flattened ``(N, C*H*W)``), output logits
    ``(N, num_classes)``. ``widths=[300, 100]`` with tanh is LeNet-300-100 (LeCun et al. 1998).
    """

    def __init__(
        self,
        spec: DataSpec,
        widths: Sequence[int] = (512, 256),
        activation: Activation = "relu",
        batch_norm: bool = False,
    ) -> None:
        super().__init__()
        require_data(spec, "MLP", ("image", "sequence", "vector"))
        self.input = input_layers(spec)
        self.layers = dense_stack(
            spec.input_dim, list(widths), spec.num_classes, activation, batch_norm
        )
        init_weights(self, activation)

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(self.input(x).flatten(1))

