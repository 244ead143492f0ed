"""Natural gradient by conjugate gradient on exact curvature-vector products ("Hessian-free").

Each step solves ``(C + damping I) d = grad`` by conjugate gradient (Hestenes & Stiefel 1952)
and moves the weights along ``-lr d`` (Martens 2010, "Deep learning via Hessian-free
optimization"). ``C`` is never formed: CG only needs products ``C v``, computed with ``torch.func``
on the current batch (or its first ``curvature_batch_size`` examples) as

    C v = J^T M (J v),        J = d outputs / d params  (outputs: (B, ...) of the model),

with ``J v`` from one forward-mode pass (``torch.func.jvp``) and ``J^T u`` from reverse mode (the
``vjp`` of one forward pass per step). The output-space matrix ``M`` picks the curvature:

- ``ggn``: M = Hessian of the batch loss w.r.t. the outputs = H_L / N
  (``Task.hessian_vector_product``, N terms averaged in the loss), so C is the generalized
  Gauss-Newton matrix G = (1/N) sum_n J_n^T H_n J_n (Schraudolph 2002).
- ``fisher`` (``fisher_type: exact``): M = Fisher of the predictive distribution in output space,
  which equals H_L for both losses here because the outputs are its natural parameters (Martens
  2014, "New insights and perspectives on the natural gradient method"), so the products are the
  GGN's, computed by the same path.
- ``fisher`` with ``fisher_type: empirical``: C = (1/B) sum_b g_b g_b^T with g_b the gradient of
  example b's loss (training labels), i.e. M = blockdiag(e_b e_b^T) / B with e_b = B dL/dz_b taken
  from the backward pass; an example is one row of the batch (a whole sequence for a language
  model).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.func import functional_call

from ngexp.config import check, check_choice, schema
from ngexp.optim.base import ModelOptimizer
from ngexp.optim.first_order import check_common
from ngexp.train.tasks import Task

#: ``(outputs, u) -> M u`` for the output-space matrix M of a curvature; shapes of ``outputs``.
OutputProduct = Callable[[Tensor, Tensor], Tensor]


class CGResult(NamedTuple):
    """Solution ``x`` (P,), iterations that changed it and final ``|r| / |b|`` (0-dim tensors)."""

    x: Tensor
    iterations: Tensor
    residual: Tensor


def conjugate_gradient(matvec: Callable[[Tensor], Tensor], b: Tensor, x0: Tensor | None,
                       iters: int, tol: float, early_exit: bool | None = None) -> CGResult:
    """Solve ``A x = b`` for symmetric positive definite ``A`` by conjugate gradient (Hestenes &
    Stiefel 1952; Nocedal & Wright 2006, Alg. 5.2) from ``x0`` (``None``: zero, saving a product).

    Stops when ``|b - A x| <= tol |b|`` (or at a direction of non-positive curvature, which only
    rounding produces for a damped Fisher) without host/device syncs: the stop is a tensor mask
    that freezes ``x`` for the rest of the ``iters`` iterations. With ``early_exit`` (default: on
    the CPU, where reading the mask costs nothing) the loop also ends there; the result is the
    same either way.
    """
    if early_exit is None:
        early_exit = b.device.type == "cpu"
    if x0 is None:
        x, r = torch.zeros_like(b), b.clone()
    else:
        x, r = x0.clone(), b - matvec(x0)
    p = r.clone()
    rr = torch.dot(r, r)
    norm_b = torch.linalg.vector_norm(b)
    threshold = (tol * norm_b).square().clamp_min(torch.finfo(b.dtype).tiny)
    active = rr > threshold
    iterations = torch.zeros((), dtype=torch.long, device=b.device)
    for _ in range(iters):
        if early_exit and not active:
            break
        ap = matvec(p)
        curvature = torch.dot(p, ap)
        active = active & (curvature > 0)
        alpha = torch.where(active, rr / curvature, 0.0)
        x.add_(alpha * p)
        r.sub_(alpha * ap)
        rr_next = torch.dot(r, r)
        p = r + torch.where(active, rr_next / rr, 0.0) * p
        iterations += active
        rr = rr_next
        active = active & (rr > threshold)
    residual = rr.sqrt() / norm_b.clamp_min(torch.finfo(b.dtype).tiny)
    return CGResult(x, iterations, residual)


def flatten(tensors: Iterator[Tensor] | list[Tensor]) -> Tensor:
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
    engine's forward pass already updated them once for this step, and each CG iteration runs
    another forward. Dropout is switched off, so every product sees the same function and the
    operator CG inverts is fixed and symmetric (the curvature of the mean network).
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

    Construction runs one forward pass (the ``vjp``); each product runs one ``jvp`` (a forward
    pass carrying tangents, about two forwards) and one backward through the saved graph. Call
    inside :func:`curvature_mode`.
    """

    def __init__(self, model: nn.Module, params: dict[str, Tensor], inputs: Tensor,
                 output_product: OutputProduct) -> None:
        self.params = {name: p.detach() for name, p in params.items()}
        seed = int(torch.randint(2**62, (), device="cpu"))
        devices = [inputs.device] if inputs.device.type == "cuda" else []

        def forward(p: dict[str, Tensor]) -> Tensor:
            # Same random draws (e.g. the BN-LSTM's h0 noise) in every product: a fixed operator.
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(seed)
                return functional_call(model, p, (inputs,))

        self._forward = forward
        self._output_product = output_product
        self.outputs, self._vjp = torch.func.vjp(self._forward, self.params)

    def __call__(self, vector: Tensor) -> Tensor:
        tangents = unflatten(vector, self.params)
        _, jv = torch.func.jvp(self._forward, (self.params,), (tangents,))
        (jt_mjv,) = self._vjp(self._output_product(self.outputs, jv))
        return flatten(list(jt_mjv.values()))


def ggn_output_product(task: Task) -> OutputProduct:
    """M u = H_L u / N: the Hessian of the batch-mean loss w.r.t. the outputs.

    ``Task.num_terms`` reads only the leading shape of the targets, which ``outputs[..., 0]``
    shares (class labels: the outputs without the class axis; reconstruction targets: the
    outputs' own shape), so N comes from the outputs alone.
    """

    def product(outputs: Tensor, u: Tensor) -> Tensor:
        return task.hessian_vector_product(outputs, u) / task.num_terms(outputs[..., 0])

    return product


def empirical_output_product(example_grads: Tensor) -> OutputProduct:
    """M u = blockdiag(e_b e_b^T) u / B for per-example output gradients ``e`` (B, ...)."""
    sum_dims = tuple(range(1, example_grads.dim()))

    def product(outputs: Tensor, u: Tensor) -> Tensor:
        dots = (example_grads * u).sum(sum_dims, keepdim=True)
        return example_grads * dots / example_grads.shape[0]

    return product


class _Batch(NamedTuple):
    inputs: Tensor
    task: Task
    example_grads: Tensor | None  # (B, ...) e_b = B dL/dz_b, for the empirical Fisher


class NaturalGradient(ModelOptimizer):
    """Truncated-Newton natural gradient: ``d`` = CG solution of ``(C + damping I) d = grad``;
    KL clipping ``d <- nu d``, ``nu = min(1, sqrt(kl_clip / (lr^2 <d, grad>)))`` (Ba et al. 2017,
    Sec. 5, as in K-FAC: a trust region in the damped Fisher norm, since ``<d, grad> = d^T (C +
    damping I) d`` at the solution); then ``u = d + weight_decay w``, momentum ``m = momentum m
    + u`` (the first ``m = u``) and ``w -= lr m`` (``u`` when momentum is 0). CG starts from
    ``warm_start_decay`` times the previous (unclipped) solution (Martens 2010, Sec. 4.5; 0
    starts from zero).

    KL clipping matters: where the predictions saturate, C vanishes while the gradient does not,
    and the damped solution ``~ grad / damping`` explodes (LeNet-5 on Fashion-MNIST diverges at
    step 2 with ``lr=0.1, damping=0.01`` and no clipping).

    Cost per step on the curvature batch (``curvature_batch_size`` examples, default all):
    one forward pass, plus one product for the warm start's residual, plus ``cg_iters`` products
    of a ``jvp`` and a backward pass each, i.e. about 2-3 backward passes per CG iteration (CG
    stops early on the CPU when ``|r| <= cg_tol |grad|``; on a GPU it always runs ``cg_iters``
    to avoid a host sync). Measured on CPU: one product costs about two SGD forward+backward
    passes, a step with ``cg_iters=20`` 35-50 SGD steps (``results/bench_optim_cpu.md``). Meant
    for small models (MLP, autoencoder, LeNet): the products re-run the whole network, unlike
    K-FAC's amortized factors.

    Parameter gradients come from ``loss.backward()`` in :meth:`backward`, which also keeps
    the batch's inputs (and, for the empirical Fisher, the per-example output gradients) for
    :meth:`step`. Products use :func:`curvature_mode`: batch norm in train mode uses batch
    statistics without updating its running statistics again, and dropout is off.
    """

    def __init__(self, model: nn.Module, lr: float = 0.1, damping: float = 1e-2,
                 curvature: str = "fisher", fisher_type: str = "exact", cg_iters: int = 20,
                 cg_tol: float = 1e-3, warm_start_decay: float = 0.95,
                 curvature_batch_size: int | None = None, kl_clip: float | None = 1e-2,
                 momentum: float = 0.0, weight_decay: float = 0.0) -> None:
        NaturalGradientConfig(lr=lr, damping=damping, curvature=curvature,
                              fisher_type=fisher_type, cg_iters=cg_iters, cg_tol=cg_tol,
                              warm_start_decay=warm_start_decay,
                              curvature_batch_size=curvature_batch_size, kl_clip=kl_clip,
                              momentum=momentum, weight_decay=weight_decay)
        defaults = dict(lr=lr, damping=damping, momentum=momentum, weight_decay=weight_decay)
        super().__init__(model, defaults)
        self.curvature, self.fisher_type = curvature, fisher_type
        self.cg_iters, self.cg_tol, self.warm_start_decay = cg_iters, cg_tol, warm_start_decay
        self.curvature_batch_size = curvature_batch_size
        self._names = {p: name for name, p in model.named_parameters() if p.requires_grad}
        self.kl_clip = kl_clip
        self._batch: _Batch | None = None
        self._cg: CGResult | None = None
        self._kl_scale: Tensor | None = None

    @property
    def _empirical(self) -> bool:
        return self.curvature == "fisher" and self.fisher_type == "empirical"

    def backward(self, loss: Tensor, *, outputs: Tensor, inputs: Tensor, task: Task) -> None:
        if self._empirical:
            outputs.retain_grad()
        loss.backward()
        example_grads = None
        if self._empirical:
            assert outputs.grad is not None
            example_grads = outputs.grad.detach().float() * outputs.shape[0]
        self._batch = _Batch(inputs.detach(), task, example_grads)

    def _params(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def _solve(self, params: list[Tensor], grad: Tensor, batch: _Batch) -> CGResult:
        """CG solution (P,) of (C + damping I) d = grad (P,) on ``batch``."""
        count = self.curvature_batch_size or len(batch.inputs)
        if batch.example_grads is not None:
            output_product = empirical_output_product(batch.example_grads[:count])
        else:
            output_product = ggn_output_product(batch.task)
        previous = [self.state[p].get("cg_solution") for p in params]
        x0 = None
        if self.warm_start_decay > 0 and all(s is not None for s in previous):
            x0 = self.warm_start_decay * flatten(previous)
            x0 = torch.where(torch.isfinite(x0).all(), x0, 0.0)  # a bad step does not persist
        damping = self.param_groups[0]["damping"]
        with curvature_mode(self.model), torch.enable_grad():
            product = CurvatureProduct(self.model, {self._names[p]: p for p in params},
                                       batch.inputs[:count], output_product)
            # Held coordinates (mask 0) removed: CG on K (C + damping I) K with K = diag(keep),
            # from K grad and K x0, stays in the free subspace and solves (C_FF + damping I)
            # d_F = grad_F there, with d = 0 on the held coordinates.
            keep = (flatten([self.keep_masks.get(p, torch.ones_like(p)) for p in params])
                    if self.keep_masks else None)
            if keep is not None:
                grad, x0 = keep * grad, None if x0 is None else keep * x0

            def operator(v: Tensor) -> Tensor:
                curvature = product(v) if keep is None else keep * product(v)
                return curvature + damping * v

            return conjugate_gradient(operator, grad, x0, self.cg_iters, self.cg_tol)

    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One update from the gradients and batch of the last :meth:`backward`."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._batch is None:
            raise RuntimeError("NaturalGradient.step() needs backward(loss, outputs=, inputs=, "
                               "task=) first")
        params = self._params()
        grad = flatten([p.grad if p.grad is not None else torch.zeros_like(p) for p in params])
        self._cg = self._solve(params, grad, self._batch)
        self._batch = None
        if self.kl_clip is not None:
            lr = self.param_groups[0]["lr"]
            quadratic = torch.dot(self._cg.x, grad).clamp_min(torch.finfo(grad.dtype).tiny)
            self._kl_scale = (self.kl_clip / (lr**2 * quadratic)).sqrt().clamp(max=1.0)
        solution = self._cg.x.split([p.numel() for p in params])
        with torch.no_grad():
            offset = 0
            for group in self.param_groups:
                group_solution = solution[offset:offset + len(group["params"])]
                offset += len(group["params"])
                for p, d in zip(group["params"], group_solution, strict=True):
                    state = self.state[p]
                    state["cg_solution"] = d.view_as(p).clone()
                    if p.grad is None:
                        continue
                    update = state["cg_solution"]
                    if self._kl_scale is not None:
                        update = self._kl_scale * update
                    if group["weight_decay"]:
                        update = update + group["weight_decay"] * p
                    if group["momentum"]:
                        buffer = state.get("momentum_buffer")
                        if buffer is None:
                            buffer = state["momentum_buffer"] = update.clone()
                        else:
                            buffer.mul_(group["momentum"]).add_(update)
                        update = buffer
                    p.sub_(group["lr"] * update)
        return loss

    def reset_state(self) -> None:
        super().reset_state()
        self._cg = self._kl_scale = None

    def log_metrics(self) -> dict[str, float]:
        """CG iterations and relative residual of the last step, and the damping (syncs)."""
        metrics = {"damping": float(self.param_groups[0]["damping"])}
        if self._cg is not None:
            metrics["cg_iters"] = float(self._cg.iterations)
            metrics["cg_residual"] = float(self._cg.residual)
        if self._kl_scale is not None:
            metrics["kl_scale"] = float(self._kl_scale)
        return metrics


@schema("optimizer", "natural_gradient")
@dataclass
class NaturalGradientConfig:
    """Natural gradient / Gauss-Newton by CG with exact products (:class:`NaturalGradient`)."""

    _target_: str = "ngexp.optim.natural_gradient.NaturalGradient"
    lr: float = 0.1
    damping: float = 1e-2
    curvature: str = "fisher"  # fisher | ggn (identical for the losses here)
    fisher_type: str = "exact"  # exact (J^T H_L J) | empirical (training-label gradients)
    cg_iters: int = 20
    cg_tol: float = 1e-3
    warm_start_decay: float = 0.95
    curvature_batch_size: int | None = None  # first k examples of the batch; null = all
    kl_clip: float | None = 1e-2  # trust region lr^2 <d, grad> <= kl_clip; null = off
    momentum: float = 0.0
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        check_common(self.lr, self.weight_decay, self.momentum)
        check(self.damping > 0, "optimizer.damping", self.damping, "a number > 0")
        check_choice("optimizer.curvature", self.curvature, ("fisher", "ggn"))
        check_choice("optimizer.fisher_type", self.fisher_type, ("exact", "empirical"))
        check(self.curvature == "fisher" or self.fisher_type == "exact", "optimizer.fisher_type",
              self.fisher_type, "exact when optimizer.curvature=ggn")
        check(self.cg_iters >= 1, "optimizer.cg_iters", self.cg_iters, "an integer >= 1")
        check(self.cg_tol >= 0, "optimizer.cg_tol", self.cg_tol, "a number >= 0")
        check(0 <= self.warm_start_decay <= 1, "optimizer.warm_start_decay",
              self.warm_start_decay, "a number in [0, 1]")
        check(self.curvature_batch_size is None or self.curvature_batch_size >= 1,
              "optimizer.curvature_batch_size", self.curvature_batch_size,
              "null or an integer >= 1")
        check(self.kl_clip is None or self.kl_clip > 0, "optimizer.kl_clip", self.kl_clip,
              "null or a number > 0")
