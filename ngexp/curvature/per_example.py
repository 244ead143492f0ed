"""Per-example gradient norms and the gradient noise scale, estimated from a :class:`Capture`.

For one recorded backward pass of a batch of ``B`` examples, the gradient of a layer's ``[W |
b]`` decomposes over the examples: ``dL/dW = sum_n u_n`` with ``u_n = sum_{calls c, positions
p} g_ncp a_ncp^T`` (the rows of :meth:`LayerIO.input_rows` and :meth:`LayerIO.grad_rows`: conv
output positions, the extra dims of a ``(B, *, D)`` Linear input and every call of a module
applied several times in one forward). With a loss that averages over the ``B`` examples (every
:class:`~ngexp.curvature.tasks.Task` here), the gradient of example ``n``'s own loss is ``G_n =
B u_n``; ``scale`` is that factor (1 for a summed loss). With BatchNorm in training mode the
``G_n`` are each example's share of the batch gradient, not gradients of independent losses.

Squared norms ``|u_n|_F^2`` per layer, the cheaper of (Rochette, Manoel & Tramel 2019, Sec. 3):

- Gram trick: ``|sum_p g_p a_p^T|^2 = sum_{p,q} (g_p . g_q)(a_p . a_q)``, ``P^2 (d_in + d_out)``
  per example and group for ``P`` rows per example (``|g|^2 |a|^2`` for one row);
- explicit: ``u_n`` formed, ``P d_in d_out``;

in chunks of examples of at most :data:`CHUNK_ELEMENTS` intermediate elements. The layers are
the capture's covered kinds (:mod:`ngexp.curvature.layers`: Linear, Conv, Embedding, attention
projections, norm scale and shift; before this version Linear and Conv2d only); other
parameters (a raw ``nn.Parameter``, ...) are excluded from every norm and counted.

Noise scale (McCandlish et al. 2018, App. A): with per-example gradients ``G_n`` and their mean
``G = (1/B) sum_n G_n``, the unbiased estimates of ``tr(Sigma)`` and ``|G_true|^2`` are

    S   = (1/(B-1)) sum_n |G_n - G|^2 = (sum_n |G_n|^2 - B |G|^2) / (B-1),
    |G|^2_unbiased = |G|^2 - S / B = (B |G|^2 - (1/B) sum_n |G_n|^2) / (B-1),

which are App. A's two-batch-size estimators ``|G_small|^2``/``|G_big|^2`` with ``B_small = 1``
(the mean per-example squared norm) and ``B_big = B``; ``B_simple = S / |G|^2_unbiased``. The
ratio of the two is biased: average ``S`` and ``|G|^2_unbiased`` over many batches (as App. A
does) before dividing.

Cost on the CPU (2 threads of a shared machine, batch 128, Fashion-MNIST shapes, median of 30
steps), as a multiple of one plain SGD step (forward, backward, update; 4.2 ms for the MLP
784-512-256-10, 13.5 ms for LeNet-5): the norms and noise-scale terms of an armed training step
(capture + :func:`example_gradients` + metrics) add 1.0x (MLP) and 0.7-0.8x (LeNet-5); a
standalone measurement with its own forward and backward costs 1.5x and 1.3-1.4x.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ngexp.curvature.capture import TRAINING, Capture, LayerIO
from ngexp.curvature.coverage import Coverage
from ngexp.curvature.diagonal import squared_example_gradients
from ngexp.curvature.kronecker import CHUNK_ELEMENTS


def gram_is_cheaper(positions: int, d_in: int, d_out: int) -> bool:
    """Whether the Gram trick (``P^2 (d_in + d_out)``) beats forming ``u_n`` (``P d_in
    d_out``) for ``P = positions`` rows per example."""
    return positions * (d_in + d_out) < d_in * d_out


def layer_example_norms(layer: LayerIO, pass_index: int) -> tuple[Tensor, Tensor]:
    """``(|u_n|^2 (B,), |sum_n u_n|^2 ())`` of ``layer`` in recorded pass ``pass_index``
    (module docstring), float32; calls without a gradient in that pass contribute nothing.

    The bias column is handled without appending the homogeneous coordinate: with features
    ``f`` (``a = [f; 1]``), ``u_n = [sum_p g f^T | sum_p g]`` and ``a_p . a_q = f_p . f_q + 1``.
    """
    grads = layer.grads[pass_index]
    calls = sorted(grads)
    device = layer.weight.device
    if not calls:
        batch = layer.inputs[0].shape[0] if layer.inputs else 0
        return torch.zeros(batch, device=device), torch.zeros((), device=device)
    inputs, outputs = [layer.inputs[c] for c in calls], [grads[c] for c in calls]
    batch, groups, fan_in, d_out = outputs[0].shape[0], layer.groups, layer.fan_in, layer.out_dim
    positions = sum(g[0].numel() // (groups * d_out) for g in outputs)
    gram = gram_is_cheaper(positions, layer.in_dim, d_out)
    per_example = groups * (positions * (fan_in + d_out)
                            + (2 * positions**2 if gram else d_out * fan_in))
    chunk = max(1, CHUNK_ELEMENTS // per_example)
    norms = torch.empty(batch, device=device)
    weight_sum = torch.zeros(groups, d_out, fan_in, device=device)
    bias_sum = torch.zeros(groups, d_out, device=device)
    for begin in range(0, batch, chunk):
        part = slice(begin, begin + chunk)
        # (b, groups, P, d) views: conv gradients keep their (b, groups, d_out, P) memory layout
        f = _rows([layer.features(x[part]).transpose(1, 2) for x in inputs])
        g = _rows([layer.grad_rows(d[part]).transpose(1, 2) for d in outputs])
        bias_grads = g.sum(2)  # (b, groups, d_out)
        if gram and positions == 1:
            f_sq, g_sq = f.square().sum(-1) + int(layer.has_bias), g.square().sum(-1)
            norms[part] = (f_sq * g_sq).sum((1, 2))
        elif gram:
            norms[part] = ((f @ f.mT + int(layer.has_bias)) * (g @ g.mT)).sum((1, 2, 3))
        if gram:
            weight_sum += torch.einsum("bgpo,bgpi->goi", g, f)
        else:
            example_grads = g.mT @ f  # (b, groups, d_out, fan_in)
            norms[part] = example_grads.square().sum((1, 2, 3))
            if layer.has_bias:
                norms[part] += bias_grads.square().sum((1, 2))
            weight_sum += example_grads.sum(0)
        bias_sum += bias_grads.sum(0)
    total = weight_sum.square().sum() + (bias_sum.square().sum() if layer.has_bias else 0.0)
    return norms, total


def _rows(calls: list[Tensor]) -> Tensor:
    """Rows of all calls of one example side by side: ``(b, groups, P_total, d)``."""
    return calls[0] if len(calls) == 1 else torch.cat(calls, dim=2)


def last_training_pass(capture: Capture, caller: str) -> int:
    """The index of the latest forward's last ``training`` pass (``caller`` names the function
    in the error when there is none)."""
    training = capture.passes(TRAINING)
    if not training or not capture.captured_inputs:
        raise ValueError(f"{caller} needs a capturing forward and a recorded training backward "
                         f"pass")
    return training[-1]


@dataclass
class ExampleGradients:
    """Per-example gradient norms of one batch, per Linear/Conv2d layer (nothing else).

    ``sq_norms[l, n] = |G_n^l|^2`` (``(layers, B)``) and ``mean_sq_norms[l] = |G^l|^2`` of the
    batch-mean gradient (``(layers,)``), for the layers ``names``; the whole-model values are
    sums over layers (the layers own disjoint coordinates). ``excluded_params`` counts the
    model's trainable parameters outside these layers (raw ``nn.Parameter`` s, ...), which no
    norm here includes.
    """

    names: list[str]
    sq_norms: Tensor
    mean_sq_norms: Tensor
    excluded_params: int

    @property
    def batch_size(self) -> int:
        return self.sq_norms.shape[1]

    def total(self) -> tuple[Tensor, Tensor]:
        """Whole-model ``(|G_n|^2 (B,), |G|^2 ())``."""
        return self.sq_norms.sum(0), self.mean_sq_norms.sum()


def example_gradients(capture: Capture, pass_index: int | None = None,
                      scale: float | None = None) -> ExampleGradients:
    """Per-example gradient norms of every layer of ``capture`` in one recorded pass (default:
    the last ``training`` pass), with ``G_n = scale * u_n`` (default ``scale = B``, for a loss
    averaged over the batch). Tensors stay on the model's device (no host sync)."""
    if pass_index is None:
        pass_index = last_training_pass(capture, "example_gradients")
    results = [layer_example_norms(layer, pass_index) for layer in capture.layers]
    batch = max(norms.shape[0] for norms, _ in results)
    factor = float(batch) if scale is None else scale
    sq_norms = torch.stack([n if n.shape[0] == batch else n.new_zeros(batch)
                            for n, _ in results]) * factor**2
    mean_sq_norms = torch.stack([t for _, t in results]) * (factor / batch) ** 2
    coverage = Coverage.of(capture.model, [p for layer in capture.layers for p in layer.params])
    return ExampleGradients([layer.name for layer in capture.layers], sq_norms, mean_sq_norms,
                            coverage.plain_count)


def noise_scale_terms(sq_norms: Tensor, mean_sq_norm: Tensor) -> tuple[Tensor, Tensor]:
    """Unbiased ``(tr(Sigma), |G|^2)`` (module docstring) from per-example squared norms
    ``sq_norms (..., B)``, ``B >= 2``, and the squared norm of their mean ``(...)``."""
    batch = sq_norms.shape[-1]
    if batch < 2:
        raise ValueError(f"the gradient noise scale needs a batch of at least 2, got {batch}")
    trace = (sq_norms.sum(-1) - batch * mean_sq_norm) / (batch - 1)
    return trace, mean_sq_norm - trace / batch


def example_gradient_squares(capture: Capture, pass_index: int | None = None,
                             scale: float | None = None) -> dict[Tensor, Tensor]:
    """``sum_n G_n * G_n`` (elementwise) for the weight and bias of every layer of ``capture``
    with a gradient in one recorded pass of its latest forward (default: the last ``training``
    pass), keyed by the parameter, shaped like it, float32; ``G_n = scale * u_n`` as in
    :func:`example_gradients` (default ``scale = B``). The diagonal of the empirical Fisher is
    this over ``B``."""
    if pass_index is None:
        pass_index = last_training_pass(capture, "example_gradient_squares")
    squares: dict[Tensor, Tensor] = {}
    for layer in capture.layers:
        calls = sorted(layer.grads[pass_index])
        if not calls:
            continue
        features = torch.cat([layer.features(layer.inputs[c]) for c in calls], 1)
        grads = torch.cat([layer.grad_rows(layer.grads[pass_index][c]) for c in calls], 1)
        factor = float(grads.shape[0]) if scale is None else scale
        weight = squared_example_gradients(layer, features, grads[None])
        squares[layer.weight] = weight * factor**2
        if layer.bias is not None:
            bias = grads.sum(1).square().sum(0)  # (groups, out_dim)
            squares[layer.bias] = bias.reshape(layer.bias.shape) * factor**2
    return squares
