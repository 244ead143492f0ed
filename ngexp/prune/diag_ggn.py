"""Exact diagonal of the generalized Gauss-Newton matrix for Linear/Conv2d weights.

For a mean loss over ``M`` terms, G = (1/M) sum_n J_n^T H_n J_n, with J_n the Jacobian of the
outputs of example n and H_n the Hessian of its loss with respect to those outputs. Factor
H_n = S_n S_n^T (``hessian_factor_blocks``); then

    diag(G)_i = (1/M) sum_n sum_k ((J_n^T S_n[:, k])_i)^2,

so one backward pass per column k of S (the C classes of a softmax, the D outputs of a
Bernoulli model; ``COLUMNS_PER_PASS`` of them batched into one pass) gives, at each layer, the
per-example gradient g_kn a_n^T of the weights whose elementwise squares are summed (the
DiagGGN of BackPACK, Dangel et al. 2020). The layers must treat examples independently
(BatchNorm in eval mode), and there must be one output vector per example, ``(B, C)``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ngexp.prune.masks import param_key
from ngexp.train.tasks import Classification, Reconstruction, Task

#: Per-example gradients of at most this many floats are formed at once.
CHUNK_FLOATS = 2**25
#: Columns of the output-Hessian factor back-propagated together (one batched backward pass).
COLUMNS_PER_PASS = 16


def at_least_float32(tensor: Tensor) -> Tensor:
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


def hessian_factor_blocks(task: Task, outputs: Tensor,
                          block: int = COLUMNS_PER_PASS) -> Iterator[Tensor]:
    """The columns of a factor S of the output Hessian, H_n = S_n S_n^T, ``block`` at a time as
    ``(k, B, C)`` tensors (``[j, n]`` is column j of S_n); ``outputs (B, C)``.

    Softmax cross-entropy: H = diag(p) - p p^T = S S^T with S = diag(sqrt p) - p sqrt(p)^T,
    because sqrt(p)^T sqrt(p) = 1; column c is sqrt(p_c) (e_c - p). Bernoulli: H = diag(p(1-p)),
    column d is sqrt(p_d (1 - p_d)) e_d.
    """
    softmax = isinstance(task, Classification)
    if softmax:
        probs = torch.softmax(at_least_float32(outputs), dim=-1)
        diagonal = probs.sqrt()
    elif isinstance(task, Reconstruction):
        probs = torch.sigmoid(at_least_float32(outputs))
        diagonal = (probs * (1 - probs)).sqrt()
    else:
        raise TypeError(f"no output Hessian factor for task {type(task).__name__}")
    for begin in range(0, outputs.shape[-1], block):
        columns = torch.arange(begin, min(begin + block, outputs.shape[-1]),
                               device=outputs.device)
        if softmax:  # -sqrt(p_c) p for each column c
            factor = -probs[None] * diagonal.T[columns][:, :, None]
        else:
            factor = probs.new_zeros(len(columns), *probs.shape)
        factor[torch.arange(len(columns)), :, columns] += diagonal[:, columns].T
        yield factor


def layer_patches(module: nn.Module, inputs: Tensor) -> Tensor:
    """Inputs of a Linear/Conv2d weight as ``(B, positions, fan_in)``; for Conv2d the unfolded
    patches (channel-major, as the weight's ``(C_in/groups, kh, kw)``) at each output pixel."""
    if isinstance(module, nn.Linear):
        return inputs.reshape(inputs.shape[0], -1, inputs.shape[-1])
    assert isinstance(module, nn.Conv2d)
    padding = module.padding
    if isinstance(padding, str) or module.padding_mode != "zeros":
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        inputs = F.pad(inputs, module._reversed_padding_repeated_twice, mode=mode)
        padding = 0
    patches = F.unfold(inputs, module.kernel_size, dilation=module.dilation, padding=padding,
                       stride=module.stride)
    return patches.transpose(1, 2)


def output_gradients(module: nn.Module, grads: Tensor) -> Tensor:
    """Gradients ``(K, B, *output)`` of a Linear/Conv2d output for K back-propagated vectors as
    ``(K, B, positions, out_features)``."""
    if isinstance(module, nn.Linear):
        return grads.reshape(*grads.shape[:2], -1, grads.shape[-1])
    return grads.flatten(3).transpose(2, 3)


def squared_example_gradients(module: nn.Module, patches: Tensor, grads: Tensor) -> Tensor:
    """sum_{k,n} (g_kn^T a_n)^2, shaped like the weight, for the output gradients
    ``grads (K, B, L, out)`` of K back-propagated vectors and the inputs ``patches (B, L,
    fan_in)``; grouped convolutions pair each group's inputs and outputs."""
    weight = module.weight
    groups = getattr(module, "groups", 1)
    positions = patches.shape[1]
    if positions == 1 and groups == 1:  # sum_n (sum_k g_kn^2) (a_n^2)^T, no per-example tensors
        return (grads[:, :, 0].square().sum(0).T @ patches[:, 0].square()).view_as(weight)
    patches = patches.unflatten(2, (groups, -1))
    grads = grads.unflatten(3, (groups, -1))
    chunk = max(1, CHUNK_FLOATS // (weight.numel() * grads.shape[0]))
    total = grads.new_zeros(groups, grads.shape[-1], patches.shape[-1])
    for begin in range(0, patches.shape[0], chunk):
        per_example = torch.einsum("kblgo,blgi->kbgoi", grads[:, begin:begin + chunk],
                                   patches[begin:begin + chunk])
        total += per_example.square().sum((0, 1))
    return total.reshape(weight.shape)


def diagonal_ggn(model: nn.Module, task: Task, batches: Iterable[tuple[Tensor, Tensor]],
                 layers: dict[str, nn.Module]) -> dict[str, Tensor]:
    """Exact diag(G) of the mean training loss over ``batches`` for the weight of each layer in
    ``layers`` (name -> Linear/Conv2d of ``model``), keyed by parameter name
    (``"<name>.weight"``). Run it with the model in eval mode so that examples are independent."""
    diagonal = {name: at_least_float32(torch.zeros_like(m.weight)) for name, m in layers.items()}
    captured: dict[str, list[tuple[Tensor, Tensor]]] = {name: [] for name in layers}

    def hook(name: str):
        def record(module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> None:
            captured[name].append((args[0].detach(), output))
        return record

    handles = [m.register_forward_hook(hook(name)) for name, m in layers.items()]
    terms = 0
    try:
        for inputs, targets in batches:
            for calls in captured.values():
                calls.clear()
            with torch.enable_grad():
                outputs = model(inputs)
            if outputs.dim() != 2:
                raise ValueError(f"the exact diagonal GGN needs outputs (batch, classes), got "
                                 f"{tuple(outputs.shape)}; use prune.criterion=kfac or ekfac")
            terms += task.num_terms(targets)
            used = {name: calls for name, calls in captured.items() if calls}
            layer_outputs = [out for calls in used.values() for _, out in calls]
            patches = {name: at_least_float32(torch.cat([layer_patches(layers[name], a)
                                                         for a, _ in calls], 1))
                       for name, calls in used.items()}
            for block in hessian_factor_blocks(task, outputs.detach()):
                grads = iter(torch.autograd.grad(outputs, layer_outputs, block.to(outputs.dtype),
                                                 retain_graph=True, is_grads_batched=True))
                for name, calls in used.items():
                    module = layers[name]
                    g = torch.cat([output_gradients(module, next(grads)) for _ in calls], 2)
                    diagonal[name] += squared_example_gradients(module, patches[name],
                                                                at_least_float32(g))
    finally:
        for handle in handles:
            handle.remove()
    return {param_key(name): value / terms for name, value in diagonal.items()}
