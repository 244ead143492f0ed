"""Hessian-free optimization (Martens 2010, "Deep learning via Hessian-free optimization").

A truncated Newton method: each step minimizes the damped quadratic model of the loss on the
curvature batch,

    q(p) = g^T p + 1/2 p^T (G + lambda I) p,

by conjugate gradient on Gauss-Newton-vector products (G the GGN, Sec. 4.2), i.e. solves
``(G + lambda I) x = g`` with ``p = -x``. It is :class:`NaturalGradient` (same products, the
same CG, warm start from ``warm_start_decay`` times the previous final CG iterate, Sec. 4.5;
curvature batch, held coordinates of pruned weights) with the rest of Martens' algorithm:

- **Levenberg-Marquardt damping** (Sec. 4.1): after the step, ``rho = (f(theta + p) -
  f(theta)) / (q(p) - lambda |p|^2 / 2)``, the actual change of the loss on the curvature batch
  over the change the *undamped* model predicts (so ``rho = 1`` when the model is exact); then
  ``lambda *= 3/2`` if ``rho < 1/4``, ``*= 2/3`` if ``rho > 3/4``
  (:func:`~ngexp.optim.damping.levenberg_marquardt`, shared with K-FAC), clamped to
  ``[damping_min, damping_max]``. ``damping`` is the initial ``lambda``.
- **CG iterate backtracking** (Sec. 4.6): CG keeps its iterates at iterations ``ceil(s^j)``
  (``s = backtrack_spacing``, j = 0, 1, ...) and the last one; starting from the last, the
  step moves to the previous kept iterate while that lowers the loss on the curvature batch.
  The next CG run still starts from the last iterate (Sec. 4.6).
- **Preconditioned CG** (Sec. 4.7, ``cg_preconditioner``): ``M = (diag(F_emp) + lambda
  I)^alpha`` with ``alpha = cg_preconditioner_exponent`` (0.75 in the paper) and
  ``diag(F_emp) = (1/B) sum_n g_n * g_n``
  of the per-example gradients of the training batch (:func:`~ngexp.curvature.per_example.
  example_gradient_squares`; the paper sums over the data set, we average as the loss does, so
  that it is on the scale of ``G``). The capture's layers (Linear, Conv, Embedding,
  attention projections, norm scale and shift) have per-example gradients; other parameters get
  ``M = lambda^alpha`` (``cg_preconditioner=false``:
  ``M = I``, plain CG).
- **Line search** (``line_search``, from Martens' published HF code rather than the paper):
  the step ``rate * p`` with the largest ``rate`` of ``1, 0.8, 0.8^2, ...`` (60 tries) that
  satisfies Armijo's condition ``f(theta + rate p) <= f(theta) + 0.01 rate g^T p`` on the
  curvature batch; none: no step.

The step goes to the optimizer as ``.grad = -rate p``: the preset steps it with SGD, ``lr=1``,
no momentum, as the algorithm does (another ``lr`` scales it; ``rho`` is measured for the
proposed ``p``). KL clipping is off by default (the damping is the trust region).

Differences from the paper: CG stops at ``|r| <= cg_tol |g|`` (Martens: the relative progress
of ``q``, Sec. 4.4), and ``g`` is the training batch's gradient (Sec. 4.3: the data set's, or a
large part of it; the curvature batch is the first ``curvature_batch_size`` examples of it).

It needs the batch targets (the loss at trial points): ``pre.backward(loss, targets=y)``, as
``ngexp train`` does, and one batch per step (no gradient accumulation). Each loss evaluation
is one forward pass of the curvature batch without gradients; backtracking costs one per kept
iterate it visits, the line search one per extra try. The comparisons read losses on the host
(one sync each).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ngexp.curvature.capture import TRAINING
from ngexp.curvature.linalg import CGResult, conjugate_gradient
from ngexp.curvature.per_example import example_gradient_squares
from ngexp.curvature.products import CurvatureProduct, flatten
from ngexp.distributed import comm
from ngexp.optim.damping import levenberg_marquardt
from ngexp.optim.hyperparams import Hyperparameter
from ngexp.optim.natural_gradient import NaturalGradient
from ngexp.optim.training import base_optimizer
from ngexp.options import check, check_range, checked, configurable, is_number

#: Martens 2010, Sec. 4.1: the damping is multiplied by 2/3 (or divided by it).
SHRINK = 2 / 3
#: Armijo's constant and the backtracking factor of the line search, and its tries.
ARMIJO, LINE_SEARCH_FACTOR, LINE_SEARCH_TRIES = 1e-2, 0.8, 60


def check_hessian_free(damping: Any, damping_min: float, damping_max: float,
                       backtrack_spacing: float, cg_preconditioner_exponent: float,
                       **_: Any) -> None:
    check(is_number(damping) and damping > 0, "damping", damping,
          "a finite number > 0 (Hessian-free adapts it; no schedule)")
    check_range("damping_min", damping_min, 0, damping if is_number(damping) else math.inf,
                closed="(]")
    check(is_number(damping_max) and damping_max >= damping, "damping_max", damping_max,
          f"a finite number >= damping={damping}")
    check_range("backtrack_spacing", backtrack_spacing, 1, math.inf, closed="()")
    check_range("cg_preconditioner_exponent", cg_preconditioner_exponent, 0, 1)


def kept_iterations(iters: int, spacing: float) -> list[int]:
    """``ceil(spacing^j)`` for ``j = 0, 1, ...`` up to ``iters``, without repeats."""
    kept, power = [], 1.0
    while math.ceil(power) <= iters:
        if not kept or kept[-1] != math.ceil(power):
            kept.append(math.ceil(power))
        power *= spacing
    return kept


@configurable("optimizer", "hessian_free", extends=base_optimizer,
              defaults={"lr": 1.0, "momentum": 0.0})
@checked(check_hessian_free)
class HessianFree(NaturalGradient):
    """Hessian-free (module docstring): ``HessianFree(model, damping=..., cg_iters=...)``; the
    curvature options are :class:`NaturalGradient`'s (default: the GGN)."""

    def __init__(self, model: nn.Module, *, damping: float = 1.0, damping_min: float = 1e-6,
                 damping_max: float = 1e4, backtracking: bool = True,
                 backtrack_spacing: float = 1.3, cg_preconditioner: bool = True,
                 cg_preconditioner_exponent: float = 0.75, line_search: bool = True,
                 cg_iters: int = 10, kl_clip: Hyperparameter | None = None,
                 **options: Any) -> None:
        self.cg_preconditioner = cg_preconditioner  # read by _arm, which the base calls
        super().__init__(model, damping=damping, cg_iters=cg_iters, kl_clip=kl_clip, **options)
        self.damping_min, self.damping_max = damping_min, damping_max
        self.backtracking, self.backtrack_spacing = backtracking, backtrack_spacing
        self.cg_preconditioner_exponent = cg_preconditioner_exponent
        self.line_search = line_search
        first = next(iter(self.params.values()))
        dtype = torch.promote_types(first.dtype, torch.float32)
        #: lambda, adapted after every step.
        self._lambda = torch.tensor(float(damping), device=first.device, dtype=dtype)
        self._rho = torch.full((), math.nan, device=first.device, dtype=dtype)
        self._rate = torch.ones((), device=first.device, dtype=dtype)
        self._chosen = 0

    def _arm(self, step: int) -> None:
        self.capture.watch_model = True
        self.capture.active = self.cg_preconditioner

    def _current_damping(self) -> Tensor:
        return self._lambda

    def _minimize(self, operator: Callable[[Tensor], Tensor], grad: Tensor, x0: Tensor | None,
                  product: CurvatureProduct, count: int) -> tuple[CGResult, Tensor]:
        if len(self.capture.forwards) > 1:
            raise RuntimeError(f"HessianFree measures the loss at trial steps on one batch: it "
                               f"does not support gradient accumulation "
                               f"({len(self.capture.forwards)} forwards before one step)")
        if self._targets is None:
            raise RuntimeError("HessianFree needs the batch targets (the loss at trial steps): "
                               "call pre.backward(loss, targets=targets) instead of "
                               "loss.backward()")
        targets, self._targets = self._targets[:count], None  # each step needs its own

        def loss_at(x: Tensor) -> Tensor:
            """f(theta - x) on the curvature batch."""
            (loss,) = comm.all_reduce_mean([self.task.loss(product.outputs_at(-x), targets)])
            return loss.detach()

        kept = kept_iterations(self.cg_iters, self.backtrack_spacing) if self.backtracking \
            else [self.cg_iters]
        result = conjugate_gradient(operator, grad, x0, self.cg_iters, self.cg_tol,
                                    preconditioner=self._diagonal_preconditioner(grad),
                                    keep_at=kept)
        with torch.no_grad():
            (before,) = comm.all_reduce_mean([self.task.loss(product.outputs.detach(), targets)])
            index, losses = backtrack(result.iterates, loss_at)
            _, x, r = result.iterates[index]
            self._chosen = result.iterates[index][0]
            after = losses[index]
            # q(p) without the damping term, p = -x: -g^T x + 1/2 x^T G x, with (G + lambda) x
            # = grad - r from CG's residual.
            predicted = -torch.dot(grad, x) + 0.5 * (torch.dot(x, grad - r)
                                                     - self._lambda * torch.dot(x, x))
            self._rho = (after - before) / predicted
            self._lambda = levenberg_marquardt(self._lambda, self._rho, predicted, SHRINK,
                                               self.damping_min, self.damping_max)
            self._rate = (armijo_rate(before, after, -torch.dot(grad, x), x, loss_at)
                          if self.line_search else torch.ones_like(before))
        return result, self._rate * x

    def _diagonal_preconditioner(self, grad: Tensor) -> Tensor | None:
        """``(diag(F_emp) + lambda)^alpha`` (P,) (module docstring), or ``None`` when off."""
        if not self.cg_preconditioner:
            return None
        training = self.capture.passes(TRAINING)
        if not training or not self.capture.captured_inputs:
            raise RuntimeError("HessianFree(cg_preconditioner=True) needs the training backward "
                               "of a capturing forward before step()")
        squares = example_gradient_squares(self.capture, training[-1])
        batch = self.capture.model_output.shape[0]
        diagonal = flatten([squares[p].to(grad.dtype) / batch if p in squares
                            else torch.zeros_like(p) for p in self.params.values()])
        (diagonal,) = comm.all_reduce_mean([diagonal])
        return (diagonal + self._lambda).pow(self.cg_preconditioner_exponent)

    def log_metrics(self) -> dict[str, float]:
        metrics = super().log_metrics()
        metrics.update(damping=float(self._lambda), rho=float(self._rho),
                       step_rate=float(self._rate), chosen_iteration=float(self._chosen))
        return metrics

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(hf_damping=self._lambda.clone(), rho=self._rho.clone())
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._lambda = state["hf_damping"].to(self._lambda.device).clone()
        self._rho = state["rho"].to(self._rho.device).clone()
        super().load_state_dict(state)


def backtrack(iterates: tuple[tuple[int, Tensor, Tensor], ...],
              loss_at: Callable[[Tensor], Tensor]) -> tuple[int, dict[int, Tensor]]:
    """Martens 2010, Sec. 4.6: from the last kept CG iterate ``x`` back, move to the previous
    one while ``loss_at(x)`` decreases. Returns the chosen index and the losses evaluated (by
    index)."""
    index = len(iterates) - 1
    losses = {index: loss_at(iterates[index][1])}
    while index > 0:
        losses[index - 1] = loss_at(iterates[index - 1][1])
        if not bool(losses[index - 1] < losses[index]):
            break
        index -= 1
    return index, losses


def armijo_rate(before: Tensor, after: Tensor, slope: Tensor, x: Tensor,
                loss_at: Callable[[Tensor], Tensor]) -> Tensor:
    """The largest ``rate = 0.8^i`` (``i < 60``) with ``f(theta - rate x) <= f(theta) + 0.01
    rate slope`` (``slope = g^T p``, ``after = f(theta - x)``); 0 when none is."""
    rate, loss = 1.0, after
    for _ in range(LINE_SEARCH_TRIES):
        if bool(loss <= before + ARMIJO * rate * slope):
            return torch.full_like(before, rate)
        rate *= LINE_SEARCH_FACTOR
        loss = loss_at(rate * x)
    return torch.zeros_like(before)
