"""Tangent features on a fixed probe set: kernels, their alignment with the labels, spectra.

Baratin et al., "Implicit Regularization via Neural Feature Alignment" (AISTATS 2021). For a
model ``f(x; theta)`` with ``C`` outputs and a probe set ``x_1..x_n``, the tangent features of
``x`` are the rows of the Jacobian ``J_c(x) = df_c(x)/dtheta`` (``P`` parameters), and

    K[n, m] = sum_c J_c(x_n) . J_c(x_m)               (n, n), summed over outputs (default),
    K_c[n, m] = J_c(x_n) . J_c(x_m)                   (C, n, n) with ``per_output``;

the per-layer kernel ``K^l`` restricts ``theta`` to one Linear/Conv2d module's weight and bias,
so ``K = sum_l K^l + K^rest`` (``rest``: BatchNorm and other parameters, in ``K`` only). The
model is in eval mode (BatchNorm uses its running statistics, examples are independent).

Computation (:func:`tangent_kernels`), never holding the full ``(n C, P)`` Jacobian: the
flattened parameters are cut into blocks of ``max_elements // (n C)`` entries; for each block,
the ``(n, C, block)`` Jacobian is formed by ``torch.func.vmap(jacrev)`` on chunks of
``chunk_size`` examples, differentiating with respect to that block only (a weight gradient is
formed once, except for tensors split across blocks), and contracted per parameter tensor,
``K += J_p J_p^T`` (``(n, C P_p) @ (C P_p, n)``). Cost: ``2 n^2 C P`` flops of products, the
per-example weight gradients once, and one forward and ``n C`` backward passes per block.

Measured on the CPU (2 threads of a shared machine, probe 256, Fashion-MNIST shapes (1, 28,
28), 10 outputs, default ``max_elements = 2**28``: 1 GiB of float32 Jacobian blocks), one call
with the per-layer kernels, quiet to loaded machine: LeNet-5 (62k parameters, 1 block, 0.08
TFLOP of products) 1.1-2.8 s; MLP 784-512-256-10 (536k, 6 blocks, 0.70 TFLOP) 17-70 s;
ResNet-20 (269k, 11 blocks, 0.35 TFLOP) 14-100 s. Peak memory 1.4 / 3.2 / 2.4 GB. Both terms
grow as ``n^2`` (the number of blocks grows with ``n``): probe 128 costs about a quarter.

Quantities (:func:`kernel_metrics`), with ``lambda`` the eigenvalues of ``K`` (uncentered):

- ``cka``: centered kernel alignment with the label kernel ``L = Y Y^T`` (Cortes, Mohri &
  Rostamizadeh 2012, Sec. 2): ``<Kbar, Lbar>_F / (|Kbar|_F |Lbar|_F)``, ``Kbar = H K H``,
  ``H = I - 1 1^T / n``; ``Y (n, classes)`` one-hot labels (its column ``y_c`` for ``K_c``);
- ``effective_rank``: ``exp(-sum_i p_i log p_i)``, ``p = lambda / sum lambda`` (Roy & Vetterli
  2007); ``participation_ratio``: ``(sum lambda)^2 / sum lambda^2``;
- ``top{k}_mass``: fraction of the trace in the ``k`` largest eigenvalues.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev, vmap

from ngexp.data.bundle import Split

#: Layers that get a kernel of their own.
KERNEL_LAYERS = (nn.Linear, nn.Conv2d)


@dataclass
class TangentKernels:
    """``total`` and per-layer (by module name) kernels, float64: ``(n, n)``, or ``(C, n, n)``
    with one kernel per output."""

    total: Tensor
    layers: dict[str, Tensor]


def _layer_of_params(model: nn.Module) -> dict[str, str]:
    """Parameter name -> owning Linear/Conv2d module name."""
    owners = {}
    for name, module in model.named_modules():
        if isinstance(module, KERNEL_LAYERS):
            for kind, param in module.named_parameters(recurse=False):
                if param.requires_grad:
                    owners[f"{name}.{kind}" if name else kind] = name
    return owners


Segment = tuple[str, int, int]  # (parameter name, start, stop) in the flattened parameter


def parameter_blocks(sizes: dict[str, int], width: int) -> list[list[Segment]]:
    """The flattened parameters ``sizes`` (name -> numel, in order) cut into consecutive blocks
    of at most ``width`` elements; a tensor larger than ``width`` spans several blocks."""
    blocks: list[list[Segment]] = [[]]
    room = width
    for name, size in sizes.items():
        start = 0
        while start < size:
            if room == 0:
                blocks.append([])
                room = width
            stop = min(size, start + room)
            blocks[-1].append((name, start, stop))
            room -= stop - start
            start = stop
    return [block for block in blocks if block]


def _block_jacobian(model: nn.Module, block: list[Segment]) -> Callable[[Tensor], tuple[Tensor,
                                                                                      ...]]:
    """``x (b, ...) -> ((b, C, stop - start) per segment)``: per-example Jacobians of the outputs
    with respect to the parameter segments of ``block`` only (the other parameters and the
    buffers are constants, so no other weight gradient is formed)."""
    params = {name: p.detach() for name, p in model.named_parameters()}
    buffers = dict(model.named_buffers())
    parts = tuple(params[name].flatten()[start:stop] for name, start, stop in block)

    def output(parts: tuple[Tensor, ...], x: Tensor) -> Tensor:
        theta = dict(params)
        for (name, start, stop), part in zip(block, parts, strict=True):
            flat = params[name].flatten()
            if stop - start < flat.numel():
                part = torch.cat([flat[:start], part, flat[stop:]])
            theta[name] = part.view(params[name].shape)
        return functional_call(model, (theta, buffers), (x[None],))[0]

    per_example = vmap(jacrev(output), in_dims=(None, 0))
    return lambda x: per_example(parts, x)


def tangent_kernels(model: nn.Module, inputs: Tensor, *, per_output: bool = False,
                    chunk_size: int = 16, max_elements: int = 2**28) -> TangentKernels:
    """Tangent kernels of ``model`` on ``inputs (n, ...)`` (module docstring), the model in eval
    mode for the computation (its mode restored after). The parameters are processed in blocks
    of ``max_elements // (n C)`` entries, whose ``(n, C, block)`` Jacobian is formed
    ``chunk_size`` examples at a time."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            outputs = model(inputs[:1])
        if outputs.dim() != 2:
            raise ValueError(f"tangent kernels need (n, C) model outputs, got shape "
                             f"{tuple(outputs.shape)}")
        n, classes = len(inputs), outputs.shape[1]
        owners = _layer_of_params(model)
        sizes = {name: p.numel() for name, p in model.named_parameters() if p.requires_grad}
        total = inputs.new_zeros((classes, n, n) if per_output else (n, n), dtype=torch.float64)
        layers = {name: torch.zeros_like(total) for name in dict.fromkeys(owners.values())}
        for block in parameter_blocks(sizes, max(1, max_elements // (n * classes))):
            jacobian = _block_jacobian(model, block)
            held = [outputs.new_empty(n, classes, stop - start) for _, start, stop in block]
            for begin in range(0, n, chunk_size):
                rows = slice(begin, begin + chunk_size)
                for buffer, part in zip(held, jacobian(inputs[rows]), strict=True):
                    buffer[rows] = part
            for (name, _, _), jac in zip(block, held, strict=True):
                if per_output:  # (C, n, n)
                    gram = jac.transpose(0, 1) @ jac.permute(1, 2, 0)
                else:
                    flat = jac.flatten(1)
                    gram = flat @ flat.T
                total += gram
                if name in owners:
                    layers[owners[name]] += gram
        return TangentKernels(total, layers)
    finally:
        model.train(was_training)


def centered_alignment(kernel: Tensor, target: Tensor) -> Tensor:
    """CKA ``<HKH, HLH>_F / (|HKH|_F |HLH|_F)`` of two ``(n, n)`` kernels, float64 (0 when a
    centered kernel vanishes)."""
    def center(matrix: Tensor) -> Tensor:
        matrix = matrix.double()
        return matrix - matrix.mean(0, keepdim=True) - matrix.mean(1, keepdim=True) + matrix.mean()

    k, t = center(kernel), center(target)
    denominator = k.norm() * t.norm()
    return torch.where(denominator > 0, (k * t).sum() / denominator, 0.0)


def spectrum_statistics(kernel: Tensor, top_k: int = 10) -> dict[str, Tensor]:
    """``effective_rank``, ``participation_ratio`` and ``top{k}_mass`` of a PSD ``(n, n)``
    kernel (module docstring); eigenvalues clamped at 0 against round-off."""
    eigenvalues = torch.linalg.eigvalsh(kernel.double()).clamp_min(0)
    trace = eigenvalues.sum()
    p = eigenvalues / trace
    entropy = -(p * torch.where(p > 0, p.log(), 0.0)).sum()
    return {"effective_rank": entropy.exp(),
            "participation_ratio": trace.square() / eigenvalues.square().sum(),
            f"top{top_k}_mass": eigenvalues[-top_k:].sum() / trace}


def kernel_metrics(kernel: Tensor, targets: Tensor, top_k: int = 10) -> dict[str, Tensor]:
    """``cka`` with ``targets (n, k)`` (one-hot labels, or any feature matrix: ``L = Y Y^T``)
    and the :func:`spectrum_statistics` of ``kernel (n, n)``."""
    targets = targets.double()
    return {"cka": centered_alignment(kernel, targets @ targets.T),
            **spectrum_statistics(kernel, top_k)}


def tangent_alignment(model: nn.Module, probe: Split, *, top_k: int = 10, per_output: bool = False,
                      chunk_size: int = 16, max_elements: int = 2**28) -> dict[str, float]:
    """``tangent/`` scalars on ``probe`` (class-id targets): :func:`kernel_metrics` of the kernel
    summed over outputs (``tangent/cka``, ...) and of each layer's (``tangent/<layer>/cka``,
    ...); with ``per_output``, also of each output's kernel ``K_c`` against its label column
    (``tangent/out<c>/cka``, ...). One host transfer."""
    kernels = tangent_kernels(model, probe.inputs, per_output=per_output, chunk_size=chunk_size,
                              max_elements=max_elements)
    classes = kernels.total.shape[0] if per_output else None
    labels = nn.functional.one_hot(probe.targets.long(), classes or -1)
    values: dict[str, Tensor] = {}

    def record(prefix: str, kernel: Tensor) -> None:
        summed = kernel.sum(0) if per_output else kernel
        for key, value in kernel_metrics(summed, labels, top_k).items():
            values[f"{prefix}{key}"] = value

    record("tangent/", kernels.total)
    for name, kernel in kernels.layers.items():
        record(f"tangent/{name}/", kernel)
    if per_output:
        for c, kernel in enumerate(kernels.total):
            for key, value in kernel_metrics(kernel, labels[:, c:c + 1], top_k).items():
                values[f"tangent/out{c}/{key}"] = value
    keys = list(values)
    return dict(zip(keys, torch.stack([values[k] for k in keys]).tolist(), strict=True))


def probe_indices(targets: Tensor, size: int = 256, seed: int = 0) -> Tensor:
    """Indices of a class-stratified sample of ``size`` examples of the class ids ``targets``,
    ordered by class then index: every class gets ``size // classes`` or one more (water-filled
    when a class has too few examples; which classes get the extra one is drawn), the examples
    of a class drawn uniformly without replacement; deterministic in ``seed``."""
    targets = targets.detach().cpu().long()
    if size > len(targets):
        raise ValueError(f"probe size {size} exceeds the {len(targets)} examples of the split")
    generator = torch.Generator().manual_seed(seed)
    counts = torch.bincount(targets)
    present = counts.nonzero().flatten()
    level = 0  # the largest per-class quota min(count, level) that fits in size
    while level < int(counts.max()) and int(counts.clamp(max=level + 1).sum()) <= size:
        level += 1
    quotas = counts.clamp(max=level)
    open_classes = present[counts[present] > level]
    extra = open_classes[torch.randperm(len(open_classes), generator=generator)]
    quotas[extra[:size - int(quotas.sum())]] += 1
    chosen = []
    for cls in present.tolist():
        members = (targets == cls).nonzero().flatten()
        picked = members[torch.randperm(len(members), generator=generator)[:int(quotas[cls])]]
        chosen.append(picked.sort().values)
    return torch.cat(chosen)


def probe_set(split: Split, size: int = 256, seed: int = 0) -> Split:
    """The class-stratified probe set of :func:`probe_indices`, on the split's device; draw it
    once and reuse it at every measurement."""
    index = probe_indices(split.targets, size, seed).to(split.targets.device)
    return Split(split.inputs[index], split.targets[index])
