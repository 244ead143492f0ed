"""SynFlow, data-free pruning by iterative synaptic flow (Tanaka et al. 2020, Eq. 2 and
Algorithm 1): ``prune.criterion=synflow``.

The network is linearized by taking absolute values of every parameter, and fed one input of
all ones; the synaptic flow is the sum of its outputs, for a chain of layers ``W_1 .. W_L``::

    R = 1^T (prod_l |W_l|) 1,        score(theta) = |theta * dR/dtheta|   (at |theta|)

summed over the weights of a unit (one weight, or a Linear/Conv2d output channel with
``prune.structure=filter``), plus ngexp's locality penalty ``lambda/2 ||w_u||^2``. Pruned
weights are zero, so their flow is gone from the next scoring: the paper's iterative
algorithm is ``prune.steps=100 prune.step_schedule=exponential``.

The flow is computed in float64 (``R`` is a product over the depth) through the model in eval
mode (BatchNorm with its running statistics) by ``torch.func.functional_call`` on absolute
copies of its parameters and buffers, so the model itself is not touched. The ones enter the
first Linear layer: ngexp's models standardize their input first, which would otherwise turn
them into ``(1 - mean) / std``. No data is read, so the scores are the same on every rank.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import functional_call

from ngexp.curvature.tasks import Task
from ngexp.errors import UserError
from ngexp.prune.criteria import Reduce, criterion


def first_linear(model: nn.Module) -> nn.Linear:
    """The first ``nn.Linear`` of ``model`` (registration order, ngexp's forward order); a
    model that starts with another weight layer (a convolution, whose input size the score
    function is not told) is a one-line error."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            return module
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding)):
            break
    raise UserError(f"prune.criterion=synflow needs a model whose first weight layer is "
                    f"nn.Linear; {type(model).__name__} starts with another")


def synaptic_flow(model: nn.Module, weights: list[str]) -> dict[str, Tensor]:
    """``|theta * dR/dtheta|`` (float64, shaped like each tensor) of the parameters of
    ``model`` named in ``weights``, ``R`` the synaptic flow (module docstring)."""
    linear = {name: value.detach().double().abs()
              for name, value in (*model.named_parameters(), *model.named_buffers())}
    for name in weights:
        linear[name].requires_grad_(True)
    first = first_linear(model)

    def ones(module: nn.Module, inputs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        return (torch.ones_like(inputs[0]),)

    handle = first.register_forward_pre_hook(ones)
    try:
        with torch.enable_grad():
            start = torch.zeros(1, first.in_features, dtype=torch.float64,
                                device=first.weight.device)
            flow = functional_call(model, linear, (start,)).sum()
            grads = torch.autograd.grad(flow, [linear[name] for name in weights])
    finally:
        handle.remove()
    return {name: (linear[name] * grad).abs().detach()
            for name, grad in zip(weights, grads, strict=True)}


@criterion("synflow", needs_data=False)
def synflow(model: nn.Module, task: Task, batches: list[tuple[Tensor, Tensor]],
            layers: dict[str, nn.Module], num_units: dict[str, int], *, penalty: float,
            generator: torch.Generator | None, reduce: Reduce | None) -> dict[str, Tensor]:
    """Scores ``(num_units[name],)`` of each layer in ``layers`` (module docstring)."""
    names = {name: f"{name}.weight" for name in layers}
    flows = synaptic_flow(model, list(names.values()))
    scores = {}
    for name, layer in layers.items():
        weight = layer.weight.detach().double().reshape(num_units[name], -1)
        flow = flows[names[name]].reshape(num_units[name], -1)
        scores[name] = flow.sum(1) + 0.5 * penalty * weight.square().sum(1)
    return scores
