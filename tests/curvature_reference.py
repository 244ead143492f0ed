"""Independent references for the curvature tests: per-example gradients with ``torch.func`` and
dense Fisher blocks in the ``[W | b]`` row-major layout of :class:`LayerIO`, and the batch
factors of one captured forward."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from ngexp.curvature.capture import Capture, LayerIO, backward_sampled
from ngexp.curvature.kronecker import PASS_KIND, PassGroup, kronecker_factors
from ngexp.curvature.tasks import Task


def per_example_matrices(model: nn.Module, task: Task, inputs: Tensor, targets: Tensor,
                         layer: LayerIO, prefix: str) -> Tensor:
    """Gradients of each example's loss w.r.t. ``[W | b]`` of ``layer``: ``(B, groups, d_out,
    d_in)``; ``prefix`` is the layer's parameter-name prefix in ``model``."""
    params = {name: p.detach() for name, p in model.named_parameters()}

    def example_loss(p: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        return task.loss(functional_call(model, p, (x[None],)), y[None])

    grads = vmap(grad(example_loss), in_dims=(None, 0, 0))(params, inputs, targets)
    weight = grads[f"{prefix}weight"]
    bias = grads.get(f"{prefix}bias")
    return torch.stack([layer.matrix(w, None if bias is None else bias[n])
                        for n, w in enumerate(weight)])


def empirical_fisher_block(example_matrices: Tensor) -> Tensor:
    """``(1/B) sum_n vec(dW_n) vec(dW_n)^T`` of one group: ``example_matrices (B, d_out, d_in)``."""
    flat = example_matrices.flatten(1).double()
    return flat.T @ flat / len(flat)


def captured(model: nn.Module, task: Task, inputs: Tensor, targets: Tensor,
             fisher_type: str = "empirical", mc_samples: int = 1, seed: int = 0) -> Capture:
    """A capture holding one forward of ``inputs`` and the backward passes of the Fisher type
    (parameter ``.grad`` untouched); remove it after use."""
    capture = Capture(model)
    capture.active = True
    outputs = model(inputs)
    if fisher_type == "mc":
        backward_sampled(capture, outputs, task, mc_samples,
                         torch.Generator().manual_seed(seed), retain_last=False)
    else:
        torch.autograd.grad(task.loss(outputs, targets), capture.layer_outputs(), allow_unused=True)
    return capture


def capture_factors(model: nn.Module, task: Task, inputs: Tensor, targets: Tensor,
                    fisher_type: str = "empirical", kfac_approx: str = "expand",
                    mc_samples: int = 1, seed: int = 0) -> dict[str, tuple[Tensor, Tensor]]:
    """Batch factors ``(A, G)`` of every hooked layer, by module name, from one forward."""
    capture = captured(model, task, inputs, targets, fisher_type, mc_samples, seed)
    terms = task.num_terms(targets)
    groups = [PassGroup(-1, capture.passes(PASS_KIND[fisher_type]), terms)]
    factors = {layer.name: kronecker_factors(layer, groups, terms, kfac_approx)
               for layer in capture.layers}
    capture.remove()
    return factors
