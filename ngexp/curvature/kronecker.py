"""Kronecker factors and EKFAC's eigenbasis scaling, estimated from a :class:`Capture`.

With ``N`` the number of terms the batch loss averages (:meth:`Task.num_terms`) and ``g = N
dL/ds`` the per-term output gradient, the Kronecker factors of one layer on one batch are
(Martens & Grosse 2015, Sec. 3)

    A = (1/R) sum_rows a a^T,        G = (1/N) sum_rows g g^T,        F_layer ~= G (x) A,

for ``[W | b]`` flattened row-major (``(d_out, d_in)``, bias last, ``a`` ends with 1 -- the
homogeneous coordinate, handled without materializing it). ``R`` counts the rows. How weight
sharing enters (Eschenhagen et al. 2023) is the ``kfac_approx`` choice (the choice names of
``kfac_approx``, ``fisher_type`` and ``kind``: :mod:`ngexp.curvature.choices`):

- ``expand`` (default): every convolution output position, every position of the extra dims of
  a ``(B, *, D)`` Linear input, and every call of a module applied several times in one forward
  (the LSTM's ``W_x``/``W_h`` maps, once per time step) gives a row. ``A`` averages over all
  rows and ``G`` sums over the positions/calls of an example, so ``G (x) A`` is the sum over
  time steps (positions) of per-step Kronecker terms whose statistics are assumed not to depend on
  the step: the independence approximation across time of Martens, Ba & Johnson (2018). A module
  called ``T`` times on ``(B, D)`` and once on ``(B, T, D)`` gets the same factors.
- ``reduce``: within one call, ``a`` is averaged and ``g`` summed over the shared positions first
  (one row per example and call).

Grouped convolutions get one ``(A, G)`` pair per group, stored stacked: ``A: (groups, d_in,
d_in)``, ``G: (groups, d_out, d_out)``; a Linear layer has ``groups = 1``. ``G`` and the EKFAC
scaling average the recorded passes of one forward they are given (several Monte-Carlo
samples).

Gradient accumulation: the estimates read every kept forward of the capture (a
:class:`PassGroup` each) as one batch of ``N = sum_f N_f`` terms: the rows of all forwards
enter ``A``, and the output gradients of forward ``f``'s passes, whose loss averaged ``T_f``
terms, are per-term gradients ``T_f dL/ds``. A training pass differentiates the user's loss,
which for k micro-batches is the mean over all ``N`` terms (``loss_f * N_f / N``, ``loss / k``
for equal micro-batches), so ``T_f = N``; a sampled pass differentiates the forward's own mean
loss, ``T_f = N_f``. So k micro-batches give the factors of their concatenation.

Layers are batched: the factors of all layers go through one decomposition or collective as
one list (:func:`flat_pairs`) and come back per layer (:func:`paired`).

EKFAC's diagonal scaling needs per-example gradients ``dW_n = sum_{calls, positions of n} g a^T``
(George et al. 2018, Eq. 10), formed in chunks or, when cheaper, as squares of rotated rows.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import Tensor, nn

from ngexp.curvature.capture import (
    CONVOLUTIONS,
    SAMPLED,
    TRAINING,
    Capture,
    LayerIO,
    backward_sampled,
)
from ngexp.curvature.choices import KRONECKER_FISHER_TYPES, FisherType, KFACApprox, KroneckerType
from ngexp.curvature.linalg import neutral_eigen, robust_eigh
from ngexp.curvature.tasks import Task

#: The pass kind each Fisher type of a Kronecker estimate is read from.
PASS_KIND = {FisherType.EMPIRICAL: TRAINING, FisherType.MC: SAMPLED}

#: Per-example gradients are formed for chunks of examples of at most this many elements.
CHUNK_ELEMENTS = 2**25


T = TypeVar("T")


def flat_pairs(pairs: Iterable[tuple[T, T]]) -> list[T]:
    """``[(a0, g0), (a1, g1), ...] -> [a0, g0, a1, g1, ...]``: the factors of several layers as
    one list, for one batched decomposition or collective over all of them."""
    return [item for pair in pairs for item in pair]


def paired(flat: Sequence[T]) -> list[tuple[T, T]]:
    """The inverse of :func:`flat_pairs`: per-layer ``(A-side, G-side)`` pairs back."""
    return list(zip(flat[0::2], flat[1::2], strict=True))


@dataclass(frozen=True)
class PassGroup:
    """The passes of one kept forward that an estimate reads: the layer record index
    ``record``, the pass indices ``passes`` and ``terms``, the number of terms their loss
    averaged (a per-term output gradient is ``terms`` times the recorded one)."""

    record: int
    passes: list[int]
    terms: int

    @property
    def weight(self) -> float:
        """``T^2 / passes``: squares of per-term gradients carry ``T^2``; passes are averaged."""
        return self.terms**2 / len(self.passes)


def pass_groups(capture: Capture, fisher_type: str, task: Task) -> tuple[list[PassGroup], int]:
    """The :class:`PassGroup` of each kept forward with passes of the Fisher type (module
    docstring), and the number of terms ``N`` of all of them (the forwards' outputs are
    needed: :attr:`Capture.watch_model`)."""
    kind = PASS_KIND[fisher_type]
    kept = [(index, forward.passes(kind), task.output_terms(forward.model_output))
            for index, forward in enumerate(capture.forwards)
            if forward.passes(kind) and forward.model_output is not None]
    total = sum(terms for _, _, terms in kept)
    return [PassGroup(index, passes, total if kind == TRAINING else terms)
            for index, passes, terms in kept], total


def _gram(rows: Tensor) -> Tensor:
    """``sum_rows r r^T`` per group: ``(B, P, groups, d) -> (groups, d, d)`` (one 2-D product
    for a single group)."""
    if rows.shape[2] == 1:
        flat = rows.reshape(-1, rows.shape[-1])
        return (flat.T @ flat)[None]
    flat = rows.flatten(0, 1).transpose(0, 1)  # (groups, B*P, d)
    return flat.mT @ flat


def _conv_gram(layer: LayerIO, x: Tensor) -> tuple[Tensor, Tensor, int] | None:
    """``(sum_patches f f^T (groups, fan_in, fan_in), sum_patches f (groups, fan_in), R)`` of
    a Conv2d input ``x (B, C, H, W)`` without forming its ``R`` patches ``f``, or ``None`` when
    that is not cheaper than the patches' Gram matrix.

    The patch of output position ``(p, q)`` is made of the kernel rows ``i``, each a *row
    segment* ``s[r, q] = x[:, :, r, q sw + j dw]_(c, j)`` of input row ``r = p sh + i dh``. So
    the ``(i, i')`` block of the Gram matrix is ``sum_p C_(i' - i)[p sh + i dh]`` with the
    cross-Gram ``C_d[r] = sum_(b, q) s[r] s[r + d dh]^T`` of rows ``d`` kernel rows apart,
    computed once per ``d`` for all rows: ``kh H`` instead of ``kh^2 H_out`` segment Gram
    matrices (about ``H / (kh H_out)`` of the work; 1/5 for LeNet-5's 5x5 convolutions)."""
    conv = layer.module
    assert isinstance(conv, nn.Conv2d)
    x = layer.padded(x)
    (kh, kw), (sh, sw), (dh, dw) = conv.kernel_size, conv.stride, conv.dilation
    batch, channels, height = x.shape[:3]
    out_height = (height - dh * (kh - 1) - 1) // sh + 1
    if height >= kh * out_height:
        return None
    windows = x.unfold(3, dw * (kw - 1) + 1, sw)[..., ::dw]  # (B, C, H, W_out, kw)
    out_width = windows.shape[3]
    per_group = channels // layer.groups
    width = per_group * kw
    # row segments (H, groups, (c, j), (b, q)), one copy
    segments = windows.permute(2, 1, 4, 0, 3).reshape(height, layer.groups, width,
                                                      batch * out_width).float()
    gram = segments.new_empty(layer.groups, per_group, kh, kw, per_group, kh, kw)
    span = slice(0, sh * (out_height - 1) + 1, sh)  # rows p sh of the output rows p
    for d in range(kh):
        cross = segments[:height - d * dh] @ segments[d * dh:].mT  # (rows, groups, w, w)
        for i in range(kh - d):
            block = cross[i * dh:][span].sum(0).view(layer.groups, per_group, kw, per_group,
                                                     kw)
            gram[:, :, i, :, :, i + d] = block
            if d:
                gram[:, :, i + d, :, :, i] = block.permute(0, 3, 4, 1, 2)
    row_sums = segments.sum(-1).view(height, layer.groups, per_group, kw)
    sums = torch.stack([row_sums[i * dh:][span].sum(0) for i in range(kh)], 2)  # (g, c, i, j)
    fan_in = layer.fan_in
    return (gram.view(layer.groups, fan_in, fan_in), sums.view(layer.groups, fan_in),
            batch * out_height * out_width)


def input_moment(layer: LayerIO, x: Tensor, reduce: bool) -> tuple[Tensor, int]:
    """``(sum_rows a a^T (groups, in_dim, in_dim), R)`` of one call's input ``x``, ``a = [f;
    1]`` with the homogeneous coordinate added to the Gram matrix of the features ``f`` (a
    convolution's from its row segments when cheaper, :func:`_conv_gram`)."""
    found = (_conv_gram(layer, x) if isinstance(layer.module, nn.Conv2d) and not reduce
             else None)
    if found is not None:
        gram, sums, rows = found
    else:
        features = layer.features(x)
        if reduce:
            features = features.mean(1, keepdim=True)
        rows = features.shape[0] * features.shape[1]
        gram = _gram(features)
        if not layer.has_bias:
            return gram, rows
        sums = features.sum((0, 1))  # (groups, fan_in)
    if not layer.has_bias:
        return gram, rows
    moment = gram.new_empty(layer.groups, layer.in_dim, layer.in_dim)
    moment[:, :-1, :-1] = gram
    moment[:, :-1, -1] = sums
    moment[:, -1, :-1] = sums
    moment[:, -1, -1] = rows
    return moment, rows


def output_moment(layer: LayerIO, grad: Tensor, reduce: bool) -> Tensor:
    """``sum_rows g g^T (groups, out_dim, out_dim)`` of one call's output gradient; a
    convolution's as a sum of per-example products over its positions (no transposed copy)."""
    if isinstance(layer.module, CONVOLUTIONS) and not reduce:
        batch, out = grad.shape[0], layer.out_dim
        per_example = grad.reshape(batch * layer.groups, out, -1).float()
        return (per_example @ per_example.mT).view(batch, layer.groups, out, out).sum(0)
    rows = layer.grad_rows(grad)
    return _gram(rows.sum(1, keepdim=True) if reduce else rows)


def kronecker_factors(layer: LayerIO, groups: list[PassGroup], num_terms: int,
                      kfac_approx: str = "expand") -> tuple[Tensor, Tensor]:
    """Batch estimates ``A (groups, in_dim, in_dim)`` and ``G (groups, out_dim, out_dim)`` of
    the kept forwards ``groups`` of ``num_terms`` terms in all (module docstring)."""
    reduce = kfac_approx == KFACApprox.REDUCE
    device = layer.weight.device
    a_sum = torch.zeros(layer.groups, layer.in_dim, layer.in_dim, device=device)
    rows = 0
    g_sum = torch.zeros(layer.groups, layer.out_dim, layer.out_dim, device=device)
    for group in groups:
        record = layer.records[group.record]
        for x in record.inputs:
            moment, count = input_moment(layer, x, reduce)
            a_sum += moment
            rows += count
        g_forward = torch.zeros_like(g_sum)
        for index in group.passes:
            for grad in record.grads[index].values():
                g_forward += output_moment(layer, grad, reduce)
        # g = T * grad, so (1/N) sum g g^T = (T^2 / N) sum grad grad^T
        g_sum += g_forward * group.weight
    return a_sum / max(rows, 1), g_sum / max(num_terms, 1)


def eigenbasis_moments(layer: LayerIO, groups: list[PassGroup], basis_a: Tensor,
                       basis_g: Tensor, num_terms: int) -> Tensor:
    """EKFAC scaling ``s = (1/N) sum_n (U_G^T dW_n U_A)^2`` (George et al. 2018, Eq. 10):
    ``(groups, out_dim, in_dim)`` for eigenbases ``basis_a (groups, in_dim, in_dim)`` and
    ``basis_g (groups, out_dim, out_dim)``, over the kept forwards ``groups`` (each averaged
    over its passes) of ``num_terms`` terms in all."""
    total = torch.zeros(layer.groups, layer.out_dim, layer.in_dim, device=basis_a.device)
    for group in groups:
        record = layer.records[group.record]
        inputs = [layer.input_rows(x) for x in record.inputs]
        for index in group.passes:
            pairs = [(inputs[call], layer.grad_rows(grad))
                     for call, grad in record.grads[index].items()]
            if pairs:
                # the grad rows are dL/ds = g / T: squares carry 1 / T^2
                total += sum_squared_example_gradients(pairs, basis_a, basis_g) * group.weight
    return total / max(num_terms, 1)


def sum_squared_example_gradients(pairs: list[tuple[Tensor, Tensor]], basis_a: Tensor,
                                  basis_g: Tensor) -> Tensor:
    """``sum_n (U_G^T dW_n U_A)^2`` over examples ``n`` with ``dW_n = sum_{calls, p} g_np a_np^T``,
    from ``(a, g)`` rows of each call, ``(B, P, groups, d_in)`` and ``(B, P, groups, d_out)``:
    ``(groups, d_out, d_in)``. The rows are rotated into the eigenbasis first when that is the
    cheaper order (few shared positions), else the per-example gradients are."""
    d_in, d_out = basis_a.shape[-1], basis_g.shape[-1]
    positions = sum(a.shape[1] for a, _ in pairs)
    rotate_rows = positions * (d_in**2 + d_out**2) <= d_in * d_out * (d_in + d_out)
    if rotate_rows:
        pairs = [(torch.einsum("bpgi,gij->bpgj", a, basis_a),
                  torch.einsum("bpgi,gij->bpgj", g, basis_g)) for a, g in pairs]
        if positions == 1:  # one row per example: squares of outer products
            a, g = pairs[0]
            return torch.einsum("bgi,bgj->gij", g[:, 0].square(), a[:, 0].square())
    batch, groups = pairs[0][0].shape[0], basis_a.shape[0]
    chunk = max(1, CHUNK_ELEMENTS // (groups * d_out * d_in))
    total = basis_a.new_zeros(groups, d_out, d_in)
    for begin in range(0, batch, chunk):
        part = slice(begin, begin + chunk)
        example_grads = sum(torch.einsum("bpgi,bpgj->bgij", g[part], a[part]) for a, g in pairs)
        if not rotate_rows:
            example_grads = basis_g.mT @ example_grads @ basis_a
        total += example_grads.square().sum(0)
    return total


def kronecker_diagonal(
    model: nn.Module,
    task: Task,
    batches: Iterable[tuple[Tensor, Tensor]],
    fisher_type: str = "empirical",
    kind: str = "kfac",
    *,
    kfac_approx: str = "expand",
    mc_samples: int = 1,
    generator: torch.Generator | None = None,
    reduce: Callable[[list[Tensor]], list[Tensor]] | None = None,
) -> dict[str, Tensor]:
    """Diagonal of the K-FAC or EKFAC curvature of every supported layer's weight.

    Estimated on ``batches`` of ``(inputs, targets)`` with ``model`` in whatever mode it is in:
    ``A`` and ``G`` are averaged over the batches; ``kfac`` gives ``diag(G) (x) diag(A)``,
    ``ekfac`` eigendecomposes the averages and averages the scaling ``s`` over a second pass,
    giving ``diag(U diag(s) U^T) = (U_G o U_G) s (U_A o U_A)^T``. Returns ``{"fc1.weight": tensor
    shaped like the weight, ...}`` (biases are left out). Parameter ``.grad`` is not touched.
    With ``reduce`` (a sum over data-parallel ranks, each with its share of the batches, which
    may be none) the factor and scaling sums and the batch counts are reduced before they are
    averaged, so every rank gets the diagonal of all the ranks' batches.
    """
    for key, value, choices in (("fisher_type", fisher_type, KRONECKER_FISHER_TYPES),
                                ("kind", kind, tuple(KroneckerType)),
                                ("kfac_approx", kfac_approx, tuple(KFACApprox))):
        if value not in choices:
            raise ValueError(f"{key}={value!r} is invalid: expected one of {', '.join(choices)}")
    data = list(batches)
    if not data and reduce is None:
        raise ValueError("kronecker_diagonal needs at least one batch")
    capture = Capture(model, training_only=False)
    capture.active = True

    def each_batch() -> Iterator[tuple[int, list[PassGroup]]]:
        """Forward and backward passes over ``data``; yields the loss's number of terms and
        the passes of the Fisher type."""
        for inputs, targets in data:
            with torch.enable_grad():
                outputs = model(inputs)
                if fisher_type == FisherType.MC:
                    backward_sampled(capture, outputs, task, mc_samples, generator, False)
                else:
                    torch.autograd.grad(task.loss(outputs, targets), capture.layer_outputs(),
                                        allow_unused=True)
            terms = task.num_terms(targets)
            yield terms, [PassGroup(-1, capture.passes(PASS_KIND[fisher_type]), terms)]

    try:
        device = capture.layers[0].weight.device
        totals = [(torch.zeros(layer.groups, layer.in_dim, layer.in_dim, device=device),
                   torch.zeros(layer.groups, layer.out_dim, layer.out_dim, device=device))
                  for layer in capture.layers]
        for num_terms, groups in each_batch():
            batch = [kronecker_factors(layer, groups, num_terms, kfac_approx)
                     for layer in capture.layers]
            totals = [(a0 + a, g0 + g) for (a0, g0), (a, g) in zip(totals, batch, strict=True)]
        count: Tensor | int = len(data)
        if reduce is not None:
            *flat, count = reduce([*flat_pairs(totals),
                                   torch.tensor(float(len(data)), device=device)])
            totals = paired(flat)
        factors = [(a / count, g / count) for a, g in totals]
        if kind == KroneckerType.KFAC:
            diagonals = [g.diagonal(dim1=-2, dim2=-1)[..., :, None]
                         * a.diagonal(dim1=-2, dim2=-1)[..., None, :] for a, g in factors]
        else:
            diagonals = _ekfac_diagonals(capture, factors, each_batch, count, reduce)
        weights: dict[str, Tensor] = {}  # blocks of one weight (attention q/k/v) fill its rows
        for layer, diagonal in zip(capture.layers, diagonals, strict=True):
            target = weights.setdefault(layer.weight_name,
                                        torch.zeros_like(layer.weight, dtype=diagonal.dtype))
            layer.write_weight(target, diagonal[..., :layer.fan_in])
        return weights
    finally:
        capture.remove()


def _ekfac_diagonals(capture: Capture, factors: list[tuple[Tensor, Tensor]],
                     each_batch: Callable[[], Iterator[tuple[int, list[PassGroup]]]],
                     num_batches: Tensor | int,
                     reduce: Callable[[list[Tensor]], list[Tensor]] | None) -> list[Tensor]:
    """EKFAC weight diagonals from batch-averaged ``factors``; ``each_batch`` reruns the passes
    (the scaling sums reduced over ranks with ``reduce``)."""
    matrices = flat_pairs(factors)
    names = flat_pairs((f"{layer.name}.A", f"{layer.name}.G") for layer in capture.layers)
    eigens, _ = robust_eigh(matrices, [neutral_eigen(m) for m in matrices], names)
    bases = [(basis_a, basis_g) for (_, basis_a), (_, basis_g) in paired(eigens)]
    scales = [torch.zeros(layer.groups, layer.out_dim, layer.in_dim, device=basis_a.device)
              for layer, (basis_a, _) in zip(capture.layers, bases, strict=True)]
    for num_terms, groups in each_batch():
        for scale, layer, (basis_a, basis_g) in zip(scales, capture.layers, bases, strict=True):
            scale += eigenbasis_moments(layer, groups, basis_a, basis_g, num_terms)
    if reduce is not None:
        scales = reduce(scales)
    return [basis_g.square() @ (scale / num_batches) @ basis_a.square().mT
            for scale, (basis_a, basis_g) in zip(scales, bases, strict=True)]
