"""Natural gradient by conjugate gradient on exact curvature-vector products ("Hessian-free").

Each step solves ``(C + damping I) d = grad`` by conjugate gradient (Hestenes & Stiefel 1952)
and hands ``d`` to the optimizer as the gradient (Martens 2010, "Deep learning via Hessian-free
optimization"). ``C`` is never formed: CG only needs products ``C v``
(:mod:`ngexp.curvature.products`) on the current batch (or its first ``curvature_batch_size``
examples):

- ``fisher_type=exact``: the exact Fisher, which for the losses here (their outputs are natural
  parameters) is the generalized Gauss-Newton matrix;
- ``fisher_type=empirical``: the empirical Fisher of the per-example gradients (training
  labels), from the output gradients of the training backward.

The names are those of every preconditioner (:mod:`ngexp.curvature.choices`).
``curvature=ggn`` is the old spelling of ``fisher_type=exact`` (the GGN is that Fisher): it
still works, with a one-line deprecation warning (``curvature=fisher``, the default, defers to
``fisher_type``).

CG starts from ``warm_start_decay`` times the previous (unclipped) solution (Martens 2010,
Sec. 4.5; 0 starts from zero). KL clipping (the preconditioner's ``kl_clip``) is a trust region
in the damped Fisher norm, since ``<d, grad> = d^T (C + damping I) d`` at the solution. It
matters: where the predictions saturate, C vanishes while the gradient does not, and the damped
solution ``~ grad / damping`` explodes (LeNet-5 on Fashion-MNIST diverges at step 2 with ``lr=0.1,
damping=0.01`` and no clipping).

Cost per step on the curvature batch: one forward pass, plus one product for the warm start's
residual, plus ``cg_iters`` products of a ``jvp`` and a backward pass each, i.e. about 2-3
backward passes per CG iteration (CG stops early on the CPU when ``|r| <= cg_tol |grad|``; on a
GPU it always runs ``cg_iters`` to avoid a host sync). Measured on CPU: a step with
``cg_iters=20`` costs 35-50 SGD steps (``results/bench_optim_cpu.md``). Meant for small models
(MLP, autoencoder, LeNet): the products re-run the whole network, unlike K-FAC's amortized
factors. Products use :func:`~ngexp.curvature.products.curvature_mode`: batch norm in train
mode uses batch statistics without updating its running statistics again, and dropout is off.

The plain ``loss.backward()`` is all it needs: the batch comes from the hooked model's
training forwards since the last step (several with gradient accumulation: their inputs are
concatenated), the empirical Fisher's output gradients from their backward passes.

Data-parallel (an initialized ``torch.distributed`` process group, the model in
``DistributedDataParallel``): each product ``C v`` is taken on the rank's batch and
all-reduced to the ranks' mean, the global batch's product, while the gradient is already the
ranks' mean; so every rank runs the same CG on the same numbers (one all-reduce of ``P``
floats per iteration; ``curvature_batch_size`` counts examples per rank).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ngexp.curvature.capture import TRAINING, ForwardRecord
from ngexp.curvature.choices import FisherType, ProductFisherType
from ngexp.curvature.linalg import CGResult, conjugate_gradient
from ngexp.curvature.products import (
    CurvatureProduct,
    curvature_mode,
    empirical_output_product,
    flatten,
    ggn_output_product,
)
from ngexp.curvature.tasks import at_least_float32
from ngexp.distributed import comm
from ngexp.optim.hyperparams import Hyperparameter, check_hyperparameter, value_at
from ngexp.optim.kl_clip import KLBlock
from ngexp.optim.preconditioner import Preconditioner
from ngexp.optim.training import base_optimizer
from ngexp.options import (
    check,
    check_integer,
    check_nonnegative,
    check_range,
    checked,
    configurable,
)

log = logging.getLogger("ngexp")
#: Deprecated spellings already reported in this process (each is reported once).
_DEPRECATIONS_SAID: set[str] = set()


def warn_deprecated(old: str, new: str) -> None:
    """One ``ngexp: warning:`` line, once per process, saying that ``old`` is spelled ``new``
    now."""
    if old not in _DEPRECATIONS_SAID:
        _DEPRECATIONS_SAID.add(old)
        log.warning("%s is deprecated: use %s (the same curvature)", old, new)


def check_natural_gradient(damping: Any, curvature: str, fisher_type: str, cg_iters: int,
                           cg_tol: float, warm_start_decay: float,
                           curvature_batch_size: int | None, **_: Any) -> None:
    check_hyperparameter("damping", damping)
    check(curvature == "fisher" or fisher_type == FisherType.EXACT, "fisher_type", fisher_type,
          "exact when curvature=ggn")
    check_integer("cg_iters", cg_iters, 1)
    check_nonnegative("cg_tol", cg_tol)
    check_range("warm_start_decay", warm_start_decay, 0, 1)
    check_integer("curvature_batch_size", curvature_batch_size, 1, allow_none=True)


def accumulated_batch(forwards: list[ForwardRecord]) -> tuple[Any, ...]:
    """The model arguments of the kept forwards as one batch (gradient accumulation: the
    micro-batches' inputs concatenated, for models called with one tensor)."""
    if len(forwards) == 1:
        return forwards[0].model_args
    if not all(len(f.model_args) == 1 and isinstance(f.model_args[0], Tensor) for f in forwards):
        raise RuntimeError("NaturalGradient with gradient accumulation needs a model called with "
                           "one tensor (the micro-batches' inputs are concatenated)")
    return (torch.cat([f.model_args[0] for f in forwards]),)


@configurable("optimizer", "natural_gradient", extends=base_optimizer,
              defaults={"lr": 0.1, "momentum": 0.0})
@checked(check_natural_gradient)
class NaturalGradient(Preconditioner):
    """Truncated-Newton natural gradient preconditioner (module docstring):
    ``NaturalGradient(model, damping=..., cg_iters=..., ...)``."""

    data_parallel = True  # products all-reduced to the global batch's

    def __init__(self, model: nn.Module, *, damping: Hyperparameter = 1e-2,
                 curvature: Literal["fisher", "ggn"] = "fisher",
                 fisher_type: ProductFisherType = "exact", cg_iters: int = 20,
                 cg_tol: float = 1e-3, warm_start_decay: float = 0.95,
                 curvature_batch_size: int | None = None, **options: Any) -> None:
        super().__init__(model, **options)
        if curvature == "ggn":
            warn_deprecated("optimizer.curvature=ggn", "optimizer.fisher_type=exact")
        self.damping, self.curvature = damping, curvature
        self.fisher_type = FisherType(fisher_type)
        self.cg_iters, self.cg_tol, self.warm_start_decay = cg_iters, cg_tol, warm_start_decay
        self.curvature_batch_size = curvature_batch_size
        self.params = {name: p for name, p in model.named_parameters() if p.requires_grad}
        #: The last (unclipped) CG solution by parameter name, for the warm start.
        self.solutions: dict[str, Tensor] = {}
        self._cg: CGResult | None = None
        self._arm(0)

    @property
    def _empirical(self) -> bool:
        return self.fisher_type == FisherType.EMPIRICAL

    def _arm(self, step: int) -> None:
        self.capture.watch_model = True

    def _precondition_grads(self) -> list[KLBlock]:
        capture = self.capture
        forwards = [f for f in capture.forwards if f.model_args and f.model_output is not None]
        if not forwards:
            raise RuntimeError("NaturalGradient.step(): no batch was seen; run the hooked model "
                               "forward in train mode with grad enabled, then loss.backward(), "
                               "before step()")
        example_grads = None
        if self._empirical:
            if not all(f.passes(TRAINING) for f in forwards):
                raise RuntimeError("NaturalGradient(fisher_type='empirical').step() needs the "
                                   "backward pass of the training loss first")
            # dL/dz of the accumulated loss (a mean over all N terms): per-term gradients N dL/dz;
            # bf16/fp16 gradients upcast to float32, float32 and float64 models keep theirs
            output_grads = torch.cat([f.output_grads[f.passes(TRAINING)[-1]] for f in forwards])
            example_grads = at_least_float32(output_grads) * output_grads.shape[0]
        params = list(self.params.values())
        grad = flatten([p.grad if p.grad is not None else torch.zeros_like(p) for p in params])
        self._cg, direction = self._solve(params, grad, accumulated_batch(forwards), example_grads)
        capture.clear()
        stepped = []
        sizes = [p.numel() for p in params]
        for (name, p), x, d in zip(self.params.items(), self._cg.x.split(sizes),
                                   direction.split(sizes), strict=True):
            self.solutions[name] = x.view_as(p).clone()
            if p.grad is not None:
                p.grad.copy_(d.view_as(p))
                stepped.append(p)
        return [(stepped, torch.dot(direction, grad))] if stepped else []

    def _solve(self, params: list[Tensor], grad: Tensor, args: tuple[Any, ...],
               example_grads: Tensor | None) -> tuple[CGResult, Tensor]:
        """CG solution (P,) of (C + damping I) d = grad (P,) on the batch ``args``, and the
        direction handed to the optimizer (:meth:`_minimize`)."""
        count = self.curvature_batch_size or len(args[0])
        if example_grads is not None:
            output_product = empirical_output_product(example_grads[:count])
        else:
            output_product = ggn_output_product(self.task)
        x0 = None
        if self.warm_start_decay > 0 and len(self.solutions) == len(self.params):
            x0 = self.warm_start_decay * flatten(list(self.solutions.values()))
            x0 = torch.where(torch.isfinite(x0).all(), x0, 0.0)  # a bad step does not persist
        damping = self._current_damping()
        batch = (args[0][:count], *args[1:])
        with curvature_mode(self.model), torch.enable_grad():
            product = CurvatureProduct(self.model, self.params, batch, output_product)
            # Held coordinates (mask 0) removed: CG on K (C + damping I) K with K = diag(keep),
            # from K grad and K x0, stays in the free subspace and solves (C_FF + damping I)
            # d_F = grad_F there, with d = 0 on the held coordinates.
            keep = (flatten([self.keep_masks.get(p, torch.ones_like(p)) for p in params])
                    if self.keep_masks else None)
            if keep is not None:
                grad, x0 = keep * grad, None if x0 is None else keep * x0

            def operator(v: Tensor) -> Tensor:
                (local,) = comm.all_reduce_mean([product(v)])  # as is in one process
                curvature = local if keep is None else keep * local
                return curvature + damping * v

            return self._minimize(operator, grad, x0, product, count)

    def _current_damping(self) -> float | Tensor:
        """The damping of this step's solve."""
        return value_at(self.damping, self.steps)

    def _minimize(self, operator: Callable[[Tensor], Tensor], grad: Tensor, x0: Tensor | None,
                  product: CurvatureProduct, count: int) -> tuple[CGResult, Tensor]:
        """CG on ``operator`` (the damped curvature, free coordinates) from ``x0``; the
        direction is its solution. Subclasses may choose another point of the CG run using
        ``product`` (its batch: the first ``count`` examples)."""
        result = conjugate_gradient(operator, grad, x0, self.cg_iters, self.cg_tol)
        return result, result.x

    def reset(self) -> None:
        self.solutions.clear()
        self._cg = None
        super().reset()

    def log_metrics(self) -> dict[str, float]:
        """CG iterations and relative residual of the last step, and the damping (syncs)."""
        metrics = {"damping": float(value_at(self.damping, max(self.steps - 1, 0))),
                   **super().log_metrics()}
        if self._cg is not None:
            metrics["cg_iters"] = float(self._cg.iterations)
            metrics["cg_residual"] = float(self._cg.residual)
        return metrics

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["solutions"] = dict(self.solutions)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        device = next(iter(self.params.values())).device
        self.solutions = {name: value.to(device) for name, value in state["solutions"].items()}
        super().load_state_dict(state)
