"""Fully connected classifiers: the default MLP and LeCun's LeNet-300-100."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from torch import Tensor, nn

from ngexp.config import check, check_choice, schema
from ngexp.data.spec import DataSpec
from ngexp.models.layers import ACTIVATIONS, dense_stack, init_weights, input_layers


class MLP(nn.Module):
    """Standardize, flatten, ``Linear -> [BatchNorm1d] -> activation`` per hidden width, Linear.

    Input images ``(N, C, H, W)`` (or flattened ``(N, C*H*W)``), output logits
    ``(N, num_classes)``. ``widths=[300, 100]`` with tanh is LeNet-300-100 (LeCun et al. 1998).
    """

    def __init__(
        self,
        spec: DataSpec,
        widths: Sequence[int] = (512, 256),
        activation: str = "relu",
        batch_norm: bool = False,
    ) -> None:
        super().__init__()
        self.input = input_layers(spec)
        self.layers = dense_stack(
            spec.input_dim, list(widths), spec.num_classes, activation, batch_norm
        )
        init_weights(self, activation)

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(self.input(x).flatten(1))


@schema("model", "mlp")
@dataclass
class MLPConfig:
    _target_: str = "ngexp.models.mlp.MLP"
    widths: list[int] = field(default_factory=lambda: [512, 256])
    activation: str = "relu"
    batch_norm: bool = False

    def __post_init__(self) -> None:
        check(all(w >= 1 for w in self.widths), "model.widths", self.widths,
              "a list of integers >= 1")
        check_choice("model.activation", self.activation, tuple(ACTIVATIONS))
