"""Saliency of removing units under a local quadratic model of the loss (Laurent et al. 2020).

Removing a unit u (its weights w_u set to zero, a change dw = -w_u) changes the training loss by

    dL_u ~= -g_u^T w_u + 1/2 w_u^T H w_u ~= sum_{i in u} (-g_i w_i + 1/2 d_i w_i^2)

with the gradient g and a diagonal curvature d; the score adds the locality penalty of
Laurent et al. (2020), which favours changes small enough for the model to hold:

    score_u = |dL_u| + lambda/2 ||w_u||^2.

The criteria choose (g, d): ``magnitude`` (g = 0, d = 1, i.e. |w|), ``taylor1`` (g, d = 0;
Molchanov et al. 2017), ``obd`` (g = 0, d = exact diagonal GGN = Fisher; LeCun et al. 1990),
``qm`` (g and exact diagonal GGN), ``kfac``/``ekfac`` (g = 0, d = diagonal of the K-FAC / EKFAC
approximation of the Fisher), and ``random`` scores as a control.

Data-parallel, each rank scores on its share of the batches and ``reduce`` (a sum over the
ranks) combines the gradient and curvature sums and their counts before they are normalized,
so every rank gets the same scores, and so the same masks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol, TypeVar

import torch
from torch import Tensor, nn

from ngexp.curvature.choices import KroneckerType
from ngexp.curvature.diagonal import diagonal_ggn
from ngexp.curvature.kronecker import kronecker_diagonal
from ngexp.curvature.tasks import Task
from ngexp.errors import OptionError
from ngexp.prune.masks import param_key

Batches = Iterable[tuple[Tensor, Tensor]]
#: Elementwise sums over the data-parallel ranks (``ngexp.distributed.comm.all_reduce_sum``).
Reduce = Callable[[list[Tensor]], list[Tensor]]
F = TypeVar("F", bound=Callable[..., dict[str, Tensor]])


@dataclass(frozen=True)
class Criterion:
    """Which terms of the loss model a criterion uses: the gradient, and which curvature."""

    gradient: bool
    curvature: str | None  # identity | ggn | kfac | ekfac | None (d = 0)


class ScoreFunction(Protocol):
    """A pruning criterion of one's own (:func:`criterion`): the score of every unit of each
    layer, ``name -> (num_units[name],)``, lower = pruned first. ``model`` is masked and in
    eval mode; ``batches`` is a list of ``(inputs, targets)`` on its device (empty for a
    criterion that needs no data); ``generator`` is the run's; data-parallel, ``reduce`` sums a
    list of tensors over the ranks (``None`` in one process) and must combine whatever the
    scores are sums of, so that every rank selects the same units."""

    def __call__(self, model: nn.Module, task: Task, batches: list[tuple[Tensor, Tensor]],
                 layers: dict[str, nn.Module], num_units: dict[str, int], *, penalty: float,
                 generator: torch.Generator | None,
                 reduce: Reduce | None) -> dict[str, Tensor]: ...


@dataclass(frozen=True)
class CustomCriterion:
    """A criterion registered with :func:`criterion`."""

    score: ScoreFunction
    needs_data: bool


CRITERIA: dict[str, Criterion | CustomCriterion | None] = {
    "magnitude": Criterion(gradient=False, curvature="identity"),
    "taylor1": Criterion(gradient=True, curvature=None),
    "obd": Criterion(gradient=False, curvature="ggn"),
    "qm": Criterion(gradient=True, curvature="ggn"),
    "kfac": Criterion(gradient=False, curvature="kfac"),
    "ekfac": Criterion(gradient=False, curvature="ekfac"),
    "random": None,
}


def criterion(name: str, *, needs_data: bool = True) -> Callable[[F], F]:
    """Register ``score`` (a :class:`ScoreFunction`) as ``prune.criterion=<name>``;
    ``needs_data``: whether it reads the scoring batches (``prune.num_examples``)."""

    def register(score: F) -> F:
        taken = CRITERIA.get(name, False)
        if taken is not False and getattr(taken, "score", None) is not score:
            raise OptionError(f"prune.criterion={name} is registered already; choose another "
                              f"name")
        CRITERIA[name] = CustomCriterion(score, needs_data)
        return score

    return register


def needs_data(criterion: str) -> bool:
    spec = CRITERIA[criterion]
    if isinstance(spec, CustomCriterion):
        return spec.needs_data
    return spec is not None and (spec.gradient or spec.curvature not in ("identity", None))


def loss_gradient(model: nn.Module, task: Task, batches: Batches,
                  params: dict[str, Tensor], reduce: Reduce | None = None) -> dict[str, Tensor]:
    """Gradient of the mean loss over all terms of ``batches`` (of every rank, with
    ``reduce``) with respect to ``params`` (name -> parameter); leaves ``.grad`` untouched."""
    total = {name: torch.zeros_like(p) for name, p in params.items()}
    terms = 0
    for inputs, targets in batches:
        with torch.enable_grad():
            loss = task.loss(model(inputs), targets)
        count = task.num_terms(targets)
        grads = torch.autograd.grad(loss * count, list(params.values()))
        for name, grad in zip(total, grads, strict=True):
            total[name] += grad
        terms += count
    if reduce is not None:
        device = next(iter(params.values())).device
        *sums, all_terms = reduce([*total.values(), torch.tensor(float(terms), device=device)])
        return {name: grad / all_terms for name, grad in zip(total, sums, strict=True)}
    return {name: grad / terms for name, grad in total.items()}


def unit_scores(weight: Tensor, grad: Tensor | None, curvature: Tensor | None, penalty: float,
                num_units: int) -> Tensor:
    """``(num_units,)`` scores |sum_u (-g w + 1/2 d w^2)| + lambda/2 sum_u w^2 of the units
    (consecutive groups of ``weight.numel() / num_units`` weights: single weights, or the
    output channels of a Linear/Conv2d weight)."""
    dtype = torch.promote_types(weight.dtype, torch.float32)
    w = weight.detach().to(dtype).reshape(num_units, -1)
    change = torch.zeros_like(w)
    if grad is not None:
        change -= grad.to(dtype).reshape_as(w) * w
    if curvature is not None:
        change += 0.5 * curvature.to(dtype).reshape_as(w) * w.square()
    return change.sum(1).abs() + 0.5 * penalty * w.square().sum(1)


def saliencies(criterion: str, model: nn.Module, task: Task, batches: Batches,
               layers: dict[str, nn.Module], num_units: dict[str, int], *,
               penalty: float = 0.0, fisher_type: str = "mc",
               generator: torch.Generator | None = None,
               reduce: Reduce | None = None) -> dict[str, Tensor]:
    """Score of every unit of each layer (name -> ``(num_units[name],)``), lower = pruned
    first. ``batches`` must be re-iterable (a list) when both g and d are needed;
    ``generator`` draws the random scores and the targets of the ``mc`` Fisher; ``reduce``
    sums the statistics over data-parallel ranks (module docstring)."""
    spec = CRITERIA[criterion]
    if isinstance(spec, CustomCriterion):
        return spec.score(model, task, list(batches), layers, num_units, penalty=penalty,
                          generator=generator, reduce=reduce)
    if spec is None:
        return {name: torch.rand(num_units[name], generator=generator,
                                 device=layer.weight.device) for name, layer in layers.items()}
    weights = {param_key(name): layer.weight for name, layer in layers.items()}
    grads = loss_gradient(model, task, batches, weights, reduce) if spec.gradient else {}
    curvature: dict[str, Tensor] = {}
    if spec.curvature == "identity":
        curvature = {key: torch.ones_like(w) for key, w in weights.items()}
    elif spec.curvature == "ggn":
        curvature = diagonal_ggn(model, task, batches, layers, reduce)
    elif spec.curvature in tuple(KroneckerType):
        curvature = kronecker_diagonal(model, task, batches, fisher_type=fisher_type,
                                       kind=spec.curvature, generator=generator, reduce=reduce)
    return {name: unit_scores(layer.weight, grads.get(param_key(name)),
                              curvature.get(param_key(name)), penalty, num_units[name])
            for name, layer in layers.items()}
