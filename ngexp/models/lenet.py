"""LeNet-5 (LeCun et al. 1998) with the usual modern simplifications."""

from __future__ import annotations

from typing import Literal

from torch import Tensor, nn

from ngexp.data.spec import DataSpec
from ngexp.models.layers import (
    Activation,
    choose,
    dense_stack,
    init_weights,
    input_layers,
    make_activation,
    require_data,
)
from ngexp.options import checked, configurable

POOLS: dict[str, type[nn.Module]] = {"max": nn.MaxPool2d, "avg": nn.AvgPool2d}


@configurable("model", "lenet5")
@checked()
class LeNet5(nn.Module):
    """conv5x5(6) -> pool -> conv5x5(16) -> pool -> 120 -> 84 -> classes on 32x32 inputs.

    Input ``(N, C, H, W)``, 28x28 images zero-padded to 32x32 as in the paper; output logits
    ``(N, num_classes)``. Departures from the 1998 network: ``activation`` (default ReLU instead
    of the scaled tanh), ``pool`` (default max pooling instead of trainable average
    subsampling), C3 connected to all six S2 maps instead of the sparse connection table, and a
    linear output layer with softmax cross-entropy instead of the Euclidean RBF units.
    """

    def __init__(self, spec: DataSpec, activation: Activation = "relu",
                 pool: Literal["max", "avg"] = "max") -> None:
        super().__init__()
        require_data(spec, "LeNet-5", ("image",))
        pool_layer = choose(POOLS, "model.pool", pool)
        self.input = input_layers(spec, min_size=32)
        self.features = nn.Sequential(
            nn.Conv2d(spec.in_channels, 6, kernel_size=5),
            make_activation(activation),
            pool_layer(2),
            nn.Conv2d(6, 16, kernel_size=5),
            make_activation(activation),
            pool_layer(2),
        )
        height, width = (((max(size, 32) - 4) // 2 - 4) // 2 for size in spec.input_shape[-2:])
        self.classifier = dense_stack(16 * height * width, [120, 84], spec.num_classes, activation)
        init_weights(self, activation)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(self.input(x)).flatten(1))

