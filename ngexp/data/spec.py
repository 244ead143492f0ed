"""What a model and a task need to know about a data set."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DataSpec:
    """Shapes and kind of a data set.

    ``input_shape`` is the shape of one example without the batch dimension: ``(C, H, W)`` for
    images, ``(T, D)`` for sequences of ``T`` steps of ``D`` features, ``(T,)`` for token ids.
    ``task`` selects the loss (see :mod:`ngexp.curvature.tasks`): ``classification`` (softmax
    cross-entropy), ``reconstruction`` (Bernoulli outputs, summed binary cross-entropy per
    example) or ``language_model`` (next-token cross-entropy at every step).

    Inputs are stored unnormalized (images in [0, 1]); ``mean`` and ``std`` (one value per
    channel, computed on the training split, or 0 and 1 when normalization is off) are applied
    by the model's first layer, so a model that reconstructs its input sees raw values.
    """

    name: str
    input_shape: tuple[int, ...]
    num_classes: int
    task: str = "classification"
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)

    @property
    def kind(self) -> str:
        """What one example is: ``image`` (C, H, W), ``sequence`` (T, D), ``tokens`` (T,) ids of
        a language model, or ``vector`` (D,)."""
        if self.task == "language_model":
            return "tokens"
        return {3: "image", 2: "sequence"}.get(len(self.input_shape), "vector")

    def describe(self) -> str:
        """``images of shape (1, 28, 28)``: the kind and shape of the examples, for messages."""
        noun = {"image": "images", "sequence": "sequences", "tokens": "token ids",
                "vector": "vectors"}[self.kind]
        return f"{noun} of shape {self.input_shape}"

    @property
    def in_channels(self) -> int:
        return self.input_shape[0]

    @property
    def image_size(self) -> int:
        return self.input_shape[-1]

    @property
    def input_dim(self) -> int:
        """Number of input features when an example is flattened."""
        size = 1
        for dim in self.input_shape:
            size *= dim
        return size
