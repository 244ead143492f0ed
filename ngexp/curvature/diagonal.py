"""Exact diagonal of the generalized Gauss-Newton matrix for Linear/Conv2d weights.

For a mean loss over ``M`` terms, G = (1/M) sum_n J_n^T H_n J_n, with J_n the Jacobian of the
outputs of example n and H_n the Hessian of its loss with respect to those outputs. Factor
H_n = S_n S_n^T (:meth:`Task.hessian_factor`); then

    diag(G)_i = (1/M) sum_n sum_k ((J_n^T S_n[:, k])_i)^2,

so one backward pass per column k of S (the C classes of a softmax, the D outputs of a
Bernoulli model; ``COLUMNS_PER_PASS`` of them batched into one pass) gives, at each layer, the
per-example gradient g_kn a_n^T of the weights whose elementwise squares are summed (the
DiagGGN of BackPACK, Dangel et al. 2020). Layer inputs and outputs come from the shared
:class:`~ngexp.curvature.capture.Capture`. The layers must treat examples independently
(BatchNorm in eval mode), and there must be one output vector per example, ``(B, C)``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn

from ngexp.curvature.capture import Capture, LayerIO, supported_layers
from ngexp.curvature.tasks import Task, at_least_float32

#: Per-example gradients of at most this many floats are formed at once.
CHUNK_FLOATS = 2**25
#: Columns of the output-Hessian factor back-propagated together (one batched backward pass).
COLUMNS_PER_PASS = 16


def squared_example_gradients(layer: LayerIO, features: Tensor, grads: Tensor) -> Tensor:
    """``sum_{k,n} (sum_p g_knp a_np^T)^2`` shaped like the weight, for the output gradients
    ``grads (K, B, P, groups, out)`` of K back-propagated vectors and the input features
    ``features (B, P, groups, fan_in)`` (every call's positions concatenated)."""
    weight = layer.weight
    if features.shape[1] == 1:  # sum_n (sum_k g_kn^2) (a_n^2)^T, no per-example tensors
        total = torch.einsum("bgo,bgi->goi", grads[:, :, 0].square().sum(0),
                             features[:, 0].square())
        return layer.weight_like(total)
    chunk = max(1, CHUNK_FLOATS // (weight.numel() * grads.shape[0]))
    total = grads.new_zeros(layer.groups, layer.out_dim, layer.fan_in)
    for begin in range(0, features.shape[0], chunk):
        per_example = torch.einsum("kbpgo,bpgi->kbgoi", grads[:, begin:begin + chunk],
                                   features[begin:begin + chunk])
        total += per_example.square().sum((0, 1))
    return layer.weight_like(total)


def diagonal_ggn(model: nn.Module, task: Task, batches: Iterable[tuple[Tensor, Tensor]],
                 layers: dict[str, nn.Module],
                 reduce: Callable[[list[Tensor]], list[Tensor]] | None = None
                 ) -> dict[str, Tensor]:
    """Exact diag(G) of the mean training loss over ``batches`` for the weight of each layer in
    ``layers`` (name -> Linear/Conv2d of ``model``), keyed by parameter name
    (``"<name>.weight"``). Run it with the model in eval mode so that examples are independent.
    ``reduce`` sums tensors over data-parallel ranks, each with its share of the batches (the
    sums of squares and the term counts are reduced before the division)."""
    wanted = {id(module.weight) for module in layers.values()}
    blocks = [layer for layer in supported_layers(model) if id(layer.weight) in wanted]
    found = {id(layer.weight) for layer in blocks}
    missing = [name for name, module in layers.items() if id(module.weight) not in found]
    if missing:
        raise ValueError(f"the exact diagonal GGN covers Linear/Conv/Embedding layers and "
                         f"attention projections whose weight requires grad; not: "
                         f"{', '.join(missing)}")
    capture = Capture(model, layers=blocks, training_only=False)
    capture.active = True
    diagonal = {layer.name: at_least_float32(torch.zeros_like(layer.weight))
                for layer in capture.layers}
    terms = 0
    try:
        for inputs, targets in batches:
            with torch.enable_grad():
                outputs = model(inputs)
            if outputs.dim() != 2:
                raise ValueError(f"the exact diagonal GGN needs outputs (batch, classes), got "
                                 f"{tuple(outputs.shape)}; use prune.criterion=kfac or ekfac")
            terms += task.num_terms(targets)
            used = [layer for layer in capture.layers if layer.inputs]
            layer_outputs = [out for layer in used for out in layer.record.outputs]
            features = {layer.name: torch.cat([layer.features(x) for x in layer.inputs], 1)
                        for layer in used}
            for block in task.hessian_factor(outputs.detach(), COLUMNS_PER_PASS):
                with capture.ignoring():
                    grads = iter(torch.autograd.grad(outputs, layer_outputs,
                                                     block.to(outputs.dtype), retain_graph=True,
                                                     is_grads_batched=True))
                for layer in used:
                    g = torch.cat([layer.grad_rows(next(grads).flatten(0, 1)).unflatten(
                        0, (len(block), -1)) for _ in layer.inputs], 2)
                    diagonal[layer.name] += squared_example_gradients(layer, features[layer.name],
                                                                      g)
    finally:
        capture.remove()
    if reduce is not None:
        device = capture.layers[0].weight.device
        *sums, all_terms = reduce([*diagonal.values(), torch.tensor(float(terms), device=device)])
        return {layer.weight_name: total / all_terms
                for layer, total in zip(capture.layers, sums, strict=True)}
    return {layer.weight_name: diagonal[layer.name] / terms for layer in capture.layers}
