"""Exact curvature-vector products ``C v = J^T M (J v)`` with ``torch.func`` (no matrix formed).

``J = d outputs / d params`` on one batch (outputs ``(B, ...)`` of the model): ``J v`` from one
forward-mode pass (``torch.func.jvp``) and ``J^T u`` from reverse mode (the ``vjp`` of one
forward pass). The output-space matrix ``M`` picks the curvature:

- ``ggn``: M = Hessian of the batch loss w.r.t. the outputs = H_L / N
  (:meth:`Task.hessian_vector_product`, N terms averaged in the loss), so C is the generalized
  Gauss-Newton matrix G = (1/N) sum_n J_n^T H_n J_n (Schraudolph 2002). For the losses here the
  outputs are natural parameters, so this is also the exact Fisher (Martens 2014, "New insights
  and perspectives on the natural gradient method").
- empirical Fisher: C = (1/B) sum_b g_b g_b^T with g_b the gradient of example b's loss
  (training labels), i.e. M = blockdiag(e_b e_b^T) / B with e_b = B dL/dz_b from the backward
  pass; an example is one row of the batch (a whole sequence for a language model).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from ngexp.curvature.tasks import Task

#: ``(outputs, u) -> M u`` for the output-space matrix M of a curvature; shapes of ``outputs``.
OutputProduct = Callable[[Tensor, Tensor], Tensor]


def flatten(tensors: Sequence[Tensor]) -> Tensor:
    """Concatenate tensors into one vector (P,)."""
    return torch.cat([t.reshape(-1) for t in tensors])


def unflatten(vector: Tensor, like: dict[str, Tensor]) -> dict[str, Tensor]:
    """Views of ``vector`` (P,) shaped like the values of ``like``, under the same names."""
    chunks = vector.split([t.numel() for t in like.values()])
    return {name: chunk.view_as(t) for (name, t), chunk in zip(like.items(), chunks, strict=True)}


@contextmanager
def curvature_mode(model: nn.Module) -> Iterator[None]:
    """Make the model one deterministic function of (params, batch) for curvature products.

    Batch norm layers in train mode keep normalizing with batch statistics but stop updating
    their running statistics (``track_running_stats=False`` selects exactly that path): the
    training forward pass already updated them once for this step, and each product runs
    another forward. Dropout is switched off, so every product sees the same function and the
    operator is fixed and symmetric (the curvature of the mean network).
    """
    norms = [m for m in model.modules()  # nn.BatchNorm*d and e.g. the BN-LSTM's per-step BN
             if getattr(m, "track_running_stats", False) and m.training]
    dropouts = [m for m in model.modules()
                if isinstance(m, nn.modules.dropout._DropoutNd) and m.training]
    try:
        for module in norms:
            module.track_running_stats = False
        for module in dropouts:
            module.train(False)
        yield
    finally:
        for module in norms:
            module.track_running_stats = True
        for module in dropouts:
            module.train(True)


class CurvatureProduct:
    """``v -> J^T M J v`` (P,) -> (P,) for the model on one batch; see the module docstring.

    ``params`` are the differentiated parameters by name (the others stay as they are);
    ``args`` the model's positional arguments. Construction runs one forward pass (the
    ``vjp``); each product runs one ``jvp`` (a forward pass carrying tangents, about two
    forwards) and one backward through the saved graph. Call inside :func:`curvature_mode`.
    """

    def __init__(self, model: nn.Module, params: dict[str, Tensor], args: tuple[Any, ...],
                 output_product: OutputProduct) -> None:
        self.params = {name: p.detach() for name, p in params.items()}
        seed = int(torch.randint(2**62, (), device="cpu"))
        devices = [arg.device for arg in args[:1]
                   if isinstance(arg, Tensor) and arg.device.type == "cuda"]

        def forward(p: dict[str, Tensor]) -> Tensor:
            # Same random draws (e.g. the BN-LSTM's h0 noise) in every product: a fixed operator;
            # attention by the math kernel, the one with forward-mode AD (jvp)
            with torch.random.fork_rng(devices=devices), sdpa_kernel(SDPBackend.MATH):
                torch.manual_seed(seed)
                return functional_call(model, p, args)

        self._forward = forward
        self._output_product = output_product
        self.outputs, self._vjp = torch.func.vjp(self._forward, self.params)

    def outputs_at(self, delta: Tensor) -> Tensor:
        """The model's outputs on the batch at ``params + delta`` (``delta`` (P,)), with the same
        random draws as the products; no graph is kept."""
        shifted = {name: p + d for (name, p), d in
                   zip(self.params.items(), unflatten(delta, self.params).values(), strict=True)}
        with torch.no_grad():
            return self._forward(shifted)

    def __call__(self, vector: Tensor) -> Tensor:
        tangents = unflatten(vector, self.params)
        _, jv = torch.func.jvp(self._forward, (self.params,), (tangents,))
        (jt_mjv,) = self._vjp(self._output_product(self.outputs, jv))
        return flatten(list(jt_mjv.values()))


def ggn_output_product(task: Task) -> OutputProduct:
    """M u = H_L u / N: the Hessian of the batch-mean loss w.r.t. the outputs."""

    def product(outputs: Tensor, u: Tensor) -> Tensor:
        return task.hessian_vector_product(outputs, u) / task.output_terms(outputs)

    return product


def empirical_output_product(example_grads: Tensor) -> OutputProduct:
    """M u = blockdiag(e_b e_b^T) u / B for per-example output gradients ``e`` (B, ...)."""
    sum_dims = tuple(range(1, example_grads.dim()))

    def product(outputs: Tensor, u: Tensor) -> Tensor:
        dots = (example_grads * u).sum(sum_dims, keepdim=True)
        return example_grads * dots / example_grads.shape[0]

    return product
