"""Kronecker-factored curvature of Linear and Conv2d layers, captured with hooks.

Each supported module is seen as ``groups`` independent affine maps ``s = [W | b] [a; 1]`` from
input rows ``a`` to output rows ``s``: for ``nn.Linear`` a row is the last dimension of a
``(B, *, D)`` input; for ``nn.Conv2d`` it is the input patch of one output position, extracted
with ``unfold`` (KFC, Grosse & Martens 2016), one block per channel group. With ``N`` the number of
terms the batch loss averages (:meth:`ngexp.train.tasks.Task.num_terms`) and ``g = N dL/ds`` the
per-term output gradient, the Kronecker factors of one batch are (Martens & Grosse 2015, Sec. 3)

    A = (1/R) sum_rows a a^T,        G = (1/N) sum_rows g g^T,        F_layer ~= G (x) A,

for ``[W | b]`` flattened row-major (``(d_out, d_in)``, bias last, ``a`` ends with 1 -- the
homogeneous coordinate). ``R`` counts the rows. How weight sharing enters (Eschenhagen et al.
2023) is the ``kfac_approx`` choice:

- ``expand`` (default): every convolution output position, every position of the extra dims of
  a ``(B, *, D)`` Linear input, and every call of a module applied several times in one forward
  (the BN-LSTM's ``W_x``/``W_h`` maps, once per time step) gives a row. ``A`` averages over all
  rows and ``G`` sums over the positions/calls of an example, so ``G (x) A`` is the sum over
  time steps (positions) of per-step Kronecker terms whose statistics are assumed not to depend on
  the step: the independence approximation across time of Martens, Ba & Johnson (2018). A module
  called ``T`` times on ``(B, D)`` and once on ``(B, T, D)`` gets the same factors.
- ``reduce``: within one call, ``a`` is averaged and ``g`` summed over the shared positions first
  (one row per example and call).

Grouped convolutions get one ``(A, G)`` pair per group, stored stacked: ``A: (groups, d_in,
d_in)``, ``G: (groups, d_out, d_out)``; a Linear layer has ``groups = 1``.

EKFAC's diagonal scaling needs per-example gradients ``dW_n = sum_{calls, positions of n} g a^T``.
A tensor hook on each call's output knows that call's index, so each input is paired with its own
output gradient whatever the order gradients arrive in (the reverse of the calls).

Fisher types (Martens & Grosse 2015, Sec. 5): ``empirical`` records ``g`` in the backward pass of
the training loss (the pass that fills ``.grad``); ``mc`` draws targets from the model's
predictive distribution (:meth:`Task.sample_targets`) ``mc_samples`` times and back-propagates
each sampled loss in an extra pass that records only ``g`` (the parameter gradients of that pass
are discarded); ``G`` and the EKFAC scaling are averaged over the samples.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ngexp.config import check_choice
from ngexp.optim.linalg import neutral_eigen, robust_eigh
from ngexp.train.tasks import Task

SUPPORTED_MODULES = (nn.Linear, nn.Conv2d)
FISHER_TYPES = ("empirical", "mc")
KFAC_APPROXIMATIONS = ("expand", "reduce")
CURVATURE_KINDS = ("kfac", "ekfac")

#: Per-example gradients are formed for chunks of examples of at most this many elements.
CHUNK_ELEMENTS = 2**25


def _gram(rows: Tensor) -> Tensor:
    """``sum_rows r r^T`` per group: ``(B, P, groups, d) -> (groups, d, d)``."""
    flat = rows.flatten(0, 1).transpose(0, 1)  # (groups, B*P, d)
    return flat.mT @ flat


class KroneckerLayer:
    """One Linear/Conv2d module as ``groups`` affine maps, and what one forward captured of it.

    ``inputs[c]`` is the input of the module's ``c``-th call in the current forward pass;
    ``grads[k][c]`` the gradient of that call's output in the ``k``-th recorded backward pass.
    """

    def __init__(self, name: str, module: nn.Linear | nn.Conv2d) -> None:
        self.name = name
        self.module = module
        if isinstance(module, nn.Conv2d):
            self.groups = module.groups
            height, width = module.kernel_size
            self.fan_in = module.in_channels // module.groups * height * width
            self.out_dim = module.out_channels // module.groups
        else:
            self.groups = 1
            self.fan_in = module.in_features
            self.out_dim = module.out_features
        self.has_bias = module.bias is not None
        self.in_dim = self.fan_in + int(self.has_bias)
        self.inputs: list[Tensor] = []
        self.grads: list[dict[int, Tensor]] = []

    @property
    def params(self) -> list[nn.Parameter]:
        return [self.module.weight] + ([self.module.bias] if self.has_bias else [])

    @property
    def weight_name(self) -> str:
        return f"{self.name}.weight" if self.name else "weight"

    def clear(self) -> None:
        self.inputs.clear()
        self.grads.clear()

    # ------------------------------------------------------------------ layouts
    def matrix(self, weight: Tensor, bias: Tensor | None) -> Tensor:
        """``[W | b]`` from weight- and bias-shaped tensors: ``(groups, out_dim, in_dim)``."""
        matrix = weight.reshape(self.groups, self.out_dim, self.fan_in)
        if self.has_bias:
            assert bias is not None
            matrix = torch.cat([matrix, bias.reshape(self.groups, self.out_dim, 1)], dim=-1)
        return matrix

    def split(self, matrix: Tensor) -> tuple[Tensor, Tensor | None]:
        """Inverse of :meth:`matrix`: weight-shaped and bias-shaped (or ``None``) tensors."""
        weight = matrix[..., : self.fan_in].reshape(self.module.weight.shape)
        bias = matrix[..., self.fan_in].reshape(self.module.bias.shape) if self.has_bias else None
        return weight, bias

    def input_rows(self, x: Tensor) -> Tensor:
        """Rows ``[a; 1]`` of one call's input, float32: ``(B, P, groups, in_dim)``, ``P`` the
        weight-sharing positions (conv output positions, extra Linear dims; 1 for ``(B, D)``)."""
        if isinstance(self.module, nn.Conv2d):
            rows = self._patches(x)
        else:
            rows = x.reshape(x.shape[0], -1, 1, x.shape[-1])
        rows = rows.float()
        if self.has_bias:
            rows = torch.cat([rows, rows.new_ones(*rows.shape[:-1], 1)], dim=-1)
        return rows

    def grad_rows(self, grad: Tensor) -> Tensor:
        """Rows of one call's output gradient, float32: ``(B, P, groups, out_dim)``."""
        batch = grad.shape[0]
        if isinstance(self.module, nn.Conv2d):
            return grad.reshape(batch, self.groups, self.out_dim, -1).permute(0, 3, 1, 2).float()
        return grad.reshape(batch, -1, 1, grad.shape[-1]).float()

    def _patches(self, x: Tensor) -> Tensor:
        """Unfolded conv input ``(B, L, groups, fan_in)``, channel-major like the weight."""
        conv = self.module
        assert isinstance(conv, nn.Conv2d)
        padding: Any = conv.padding
        if conv.padding_mode != "zeros" or isinstance(padding, str):  # pad as Conv2d.forward does
            mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
            x = F.pad(x, conv._reversed_padding_repeated_twice, mode=mode)
            padding = 0
        cols = F.unfold(x, conv.kernel_size, dilation=conv.dilation, padding=padding,
                        stride=conv.stride)  # (B, C_in * kh * kw, L)
        return cols.view(x.shape[0], self.groups, self.fan_in, -1).permute(0, 3, 1, 2)

    # ------------------------------------------------------------------ statistics
    def factors(self, num_terms: int, kfac_approx: str = "expand") -> tuple[Tensor, Tensor]:
        """Batch estimates ``A (groups, in_dim, in_dim)`` and ``G (groups, out_dim, out_dim)``
        of the captured forward (see the module docstring); ``G`` averages the recorded passes."""
        reduce = kfac_approx == "reduce"
        device = self.module.weight.device
        a_gram = torch.zeros(self.groups, self.in_dim, self.in_dim, device=device)
        rows = 0
        for x in self.inputs:
            a = self.input_rows(x)
            if reduce:
                a = a.mean(1, keepdim=True)
            a_gram += _gram(a)
            rows += a.shape[0] * a.shape[1]
        g_gram = torch.zeros(self.groups, self.out_dim, self.out_dim, device=device)
        for grads in self.grads:
            for grad in grads.values():
                g = self.grad_rows(grad)
                g_gram += _gram(g.sum(1, keepdim=True) if reduce else g)
        # g = N * grad, so (1/N) sum g g^T = N sum grad grad^T
        return a_gram / max(rows, 1), g_gram * (num_terms / max(len(self.grads), 1))

    def eigenbasis_moments(self, basis_a: Tensor, basis_g: Tensor, num_terms: int) -> Tensor:
        """EKFAC scaling ``s = (1/N) sum_n (U_G^T dW_n U_A)^2`` (George et al. 2018, Eq. 10):
        ``(groups, out_dim, in_dim)`` for eigenbases ``basis_a (groups, in_dim, in_dim)`` and
        ``basis_g (groups, out_dim, out_dim)``, averaged over the recorded passes."""
        inputs = [self.input_rows(x) for x in self.inputs]
        total = torch.zeros(self.groups, self.out_dim, self.in_dim, device=basis_a.device)
        for grads in self.grads:
            pairs = [(inputs[call], self.grad_rows(grad)) for call, grad in grads.items()]
            if pairs:
                total += _sum_squared_example_gradients(pairs, basis_a, basis_g)
        # the grad rows are dL/ds = g / N: squares carry 1 / N^2, so multiply by N^2 / N
        return total * (num_terms / max(len(self.grads), 1))


def _sum_squared_example_gradients(pairs: list[tuple[Tensor, Tensor]], basis_a: Tensor,
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


class CurvatureCapture:
    """Hooks on every Linear/Conv2d module of ``model`` whose weight requires grad.

    While :attr:`active`, each call of a hooked module (with grad enabled, outside ``torch.func``
    transforms and, when ``training_only``, in training mode) stores its input and puts a tensor
    hook on its output;
    inside :meth:`recording` those tensor hooks store the output gradients of that backward pass.
    A capturing forward pass of ``model`` first drops what an earlier one left behind. Inactive
    hooks return at once (no copies, no unfold).
    """

    def __init__(self, model: nn.Module, training_only: bool = True) -> None:
        self.layers = [KroneckerLayer(name, module) for name, module in model.named_modules()
                       if isinstance(module, SUPPORTED_MODULES) and module.weight.requires_grad]
        self.active = False
        self.training_only = training_only
        self._recording = False
        self._handles = [model.register_forward_pre_hook(self._on_model_forward)]
        self._handles += [layer.module.register_forward_hook(partial(self._on_forward, layer))
                          for layer in self.layers]

    @property
    def captured(self) -> bool:
        """Whether the last forward stored inputs and at least one backward pass was recorded."""
        return any(layer.inputs and layer.grads for layer in self.layers)

    @property
    def captured_inputs(self) -> bool:
        return any(layer.inputs for layer in self.layers)

    def weights(self) -> list[Tensor]:
        return [layer.module.weight for layer in self.layers]

    def clear(self) -> None:
        for layer in self.layers:
            layer.clear()

    def remove(self) -> None:
        """Detach every hook."""
        for handle in self._handles:
            handle.remove()
        self.clear()

    @contextmanager
    def recording(self) -> Iterator[None]:
        """Record the output gradients of the backward pass run inside this block."""
        for layer in self.layers:
            layer.grads.append({})
        self._recording = True
        try:
            yield
        finally:
            self._recording = False

    def _capturing(self, module: nn.Module) -> bool:
        return (self.active and torch.is_grad_enabled()
                and not torch._C._are_functorch_transforms_active()  # e.g. torch.func products
                and (module.training or not self.training_only))

    def _on_model_forward(self, model: nn.Module, args: tuple[Any, ...]) -> None:
        if self._capturing(model):
            self.clear()

    def _on_forward(self, layer: KroneckerLayer, module: nn.Module, args: tuple[Tensor, ...],
                    output: Tensor) -> None:
        if not self._capturing(module):
            return
        call = len(layer.inputs)
        layer.inputs.append(args[0].detach())
        if output.requires_grad:
            output.register_hook(partial(self._on_grad, layer, call))

    def _on_grad(self, layer: KroneckerLayer, call: int, grad: Tensor) -> None:
        if self._recording:
            layer.grads[-1][call] = grad.detach()


def record_backward(
    capture: CurvatureCapture,
    loss: Tensor,
    outputs: Tensor,
    task: Task,
    fisher_type: str,
    mc_samples: int = 1,
    generator: torch.Generator | None = None,
    fill_grad: bool = True,
) -> None:
    """Back-propagate ``loss`` (into ``.grad`` when ``fill_grad``) and record output gradients
    of ``fisher_type`` (see the module docstring) for the forward ``capture`` holds."""
    weights = capture.weights()

    def backward(value: Tensor, retain: bool) -> None:
        torch.autograd.grad(value, weights, retain_graph=retain, allow_unused=True)

    if fisher_type == "empirical":
        with capture.recording():
            loss.backward() if fill_grad else backward(loss, retain=False)
        return
    for sample in range(mc_samples):
        sampled = task.sample_targets(outputs, generator)
        with capture.recording():
            backward(task.loss(outputs, sampled), retain=fill_grad or sample < mc_samples - 1)
    if fill_grad:
        loss.backward()


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
) -> dict[str, Tensor]:
    """Diagonal of the K-FAC or EKFAC curvature of every covered layer's weight.

    Estimated on ``batches`` of ``(inputs, targets)`` with ``model`` in whatever mode it is in:
    ``A`` and ``G`` are averaged over the batches; ``kfac`` gives ``diag(G) (x) diag(A)``,
    ``ekfac`` eigendecomposes the averages and averages the scaling ``s`` over a second pass,
    giving ``diag(U diag(s) U^T) = (U_G o U_G) s (U_A o U_A)^T``. Returns ``{"fc1.weight": tensor
    shaped like the weight, ...}`` (biases are left out). Parameter ``.grad`` is not touched.
    """
    check_choice("fisher_type", fisher_type, FISHER_TYPES)
    check_choice("kind", kind, CURVATURE_KINDS)
    check_choice("kfac_approx", kfac_approx, KFAC_APPROXIMATIONS)
    data = list(batches)
    if not data:
        raise ValueError("kronecker_diagonal needs at least one batch")
    capture = CurvatureCapture(model, training_only=False)
    capture.active = True

    def each_batch() -> Iterator[int]:
        """Forward and backward passes over ``data``; yields the loss's number of terms."""
        for inputs, targets in data:
            with torch.enable_grad():
                outputs = model(inputs)
                loss = task.loss(outputs, targets)
                record_backward(capture, loss, outputs, task, fisher_type, mc_samples, generator,
                                fill_grad=False)
            yield task.num_terms(targets)

    try:
        totals: list[tuple[Tensor, Tensor]] = []
        for num_terms in each_batch():
            batch = [layer.factors(num_terms, kfac_approx) for layer in capture.layers]
            totals = batch if not totals else [
                (a0 + a, g0 + g) for (a0, g0), (a, g) in zip(totals, batch, strict=True)]
        factors = [(a / len(data), g / len(data)) for a, g in totals]
        if kind == "kfac":
            diagonals = [g.diagonal(dim1=-2, dim2=-1)[..., :, None]
                         * a.diagonal(dim1=-2, dim2=-1)[..., None, :] for a, g in factors]
        else:
            diagonals = _ekfac_diagonals(capture, factors, each_batch, len(data))
        return {layer.weight_name: layer.split(diagonal)[0]
                for layer, diagonal in zip(capture.layers, diagonals, strict=True)}
    finally:
        capture.remove()


def _ekfac_diagonals(capture: CurvatureCapture, factors: list[tuple[Tensor, Tensor]],
                     each_batch: Callable[[], Iterator[int]], num_batches: int) -> list[Tensor]:
    """EKFAC weight diagonals from batch-averaged ``factors``; ``each_batch`` reruns the passes."""
    matrices = [f for pair in factors for f in pair]
    names = [f"{layer.name}.{which}" for layer in capture.layers for which in ("A", "G")]
    eigens, _ = robust_eigh(matrices, [neutral_eigen(m) for m in matrices], names)
    bases = [(eigens[2 * i][1], eigens[2 * i + 1][1]) for i in range(len(capture.layers))]
    scales = [torch.zeros(layer.groups, layer.out_dim, layer.in_dim, device=basis_a.device)
              for layer, (basis_a, _) in zip(capture.layers, bases, strict=True)]
    for num_terms in each_batch():
        for scale, layer, (basis_a, basis_g) in zip(scales, capture.layers, bases, strict=True):
            scale += layer.eigenbasis_moments(basis_a, basis_g, num_terms)
    return [basis_g.square() @ (scale / num_batches) @ basis_a.square().mT
            for scale, (basis_a, basis_g) in zip(scales, bases, strict=True)]
