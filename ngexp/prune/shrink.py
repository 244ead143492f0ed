"""Physical removal of output units (Linear neurons, Conv2d filters) from a chain of layers.

A *link* is one prunable layer of a plain chain (MLP, LeNet-5, VGG: every layer feeds the next
one only): the layer, the batch norm right after it (if any) and the next Linear/Conv2d, which
reads ``factor`` consecutive input columns per unit of the layer (1, or ``H*W`` where a
convolution's maps are flattened into a Linear, channel-major as ``flatten(1)`` orders them).
Removing units ``u`` takes rows ``u`` out of the layer's weight and bias and of its batch
norm's affine parameters and running statistics, and columns ``u`` out of the next layer.

Parameters keep their identity (``param.data`` is replaced), so optimizers, clipping lists and
gradient hooks keep pointing at them; optimizer state must be reset afterwards.
:func:`chain_links` finds the links from one traced forward and verifies them numerically (a
residual connection, which removal would break, makes it return ``None``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ngexp.prune.masks import PRUNABLE_TYPES, hooked_eval_forward

NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)


@dataclass
class Link:
    """One prunable layer of a chain (module docstring); names as ``named_modules`` gives them."""

    layer: str
    norm: str | None
    consumer: str
    factor: int


def num_units(module: nn.Module) -> int:
    return module.out_features if isinstance(module, nn.Linear) else module.out_channels


def along_units(module: nn.Module, values: Tensor, output: Tensor) -> Tensor:
    """``values`` ``(B, units)`` or ``(units,)`` shaped to broadcast over ``output`` of
    ``module``: units are the last dimension of a Linear's output, dimension 1 of a
    convolution's or batch norm's."""
    rest = (1,) * (output.dim() - 2)
    lead = values.shape[:-1] if values.dim() == 2 else (1,)
    if isinstance(module, nn.Linear):
        shaped = values.reshape(*lead, *rest, values.shape[-1])
    else:
        shaped = values.reshape(*lead, values.shape[-1], *rest)
    return shaped.to(output.dtype)


@torch.no_grad()
def take(param: Tensor | None, index: Tensor, dim: int = 0) -> None:
    """Keep entries ``index`` of ``param`` along ``dim``, in place of its data.

    A tensor keeps its gradient accumulator (which checks gradient shapes) across ``.data``
    assignments unless the dtype changes (``VariableHooks::set_data`` in torch's
    ``variable.cpp``), and an autograd graph still alive elsewhere keeps that accumulator
    alive; so the data passes through another dtype, and the next backward gets a fresh one."""
    if param is not None:
        kept = param.data.index_select(dim, index.to(param.device)).contiguous()
        if param.requires_grad:
            other = torch.float64 if kept.dtype != torch.float64 else torch.float32
            param.data = kept.to(other)
            param.grad = None
        param.data = kept


def remove_units(model: nn.Module, link: Link, keep: Tensor,
                 extra: Callable[[str, Tensor, Tensor], None] | None = None) -> None:
    """Keep units ``keep`` (sorted indices, ``(k,)``) of ``link.layer``; ``extra(name, rows,
    columns)`` shrinks what else is shaped by these units (variational parameters): ``rows``
    index the layer's units, ``columns`` the consumer's inputs."""
    modules = dict(model.named_modules())
    layer, consumer = modules[link.layer], modules[link.consumer]
    take(layer.weight, keep)
    take(layer.bias, keep)
    if isinstance(layer, nn.Linear):
        layer.out_features = len(keep)
    else:
        layer.out_channels = len(keep)
    if link.norm is not None:
        norm = modules[link.norm]
        for tensor in (norm.weight, norm.bias, norm.running_mean, norm.running_var):
            take(tensor, keep)
        norm.num_features = len(keep)
    columns = (keep[:, None] * link.factor + torch.arange(link.factor, device=keep.device)
               ).flatten()
    take(consumer.weight, columns, dim=1)
    if isinstance(consumer, nn.Linear):
        consumer.in_features = len(columns)
    else:
        consumer.in_channels = len(columns)
    if extra is not None:
        extra(link.layer, keep, columns)


@torch.no_grad()
def call_order(model: nn.Module, example: Tensor) -> list[str]:
    """Names of the Linear/Conv2d/batch-norm modules in the order an eval-mode forward of
    ``example`` calls them (a module called twice appears twice)."""
    order: list[str] = []
    hooked_eval_forward(model, example, {
        module: lambda *_, name=name: order.append(name)
        for name, module in model.named_modules() if isinstance(module, (*PRUNABLE_TYPES, *NORMS))})
    return order


def norms_after(model: nn.Module, order: list[str], layers: list[str]) -> dict[str, str | None]:
    """The batch norm called right after each of ``layers`` (``None`` if another module is)."""
    modules = dict(model.named_modules())
    found: dict[str, str | None] = {}
    for name in layers:
        at = order.index(name) if name in order else len(order)
        after = order[at + 1] if at + 1 < len(order) else None
        found[name] = after if after is not None and isinstance(modules[after], NORMS) else None
    return found


def chain_links(model: nn.Module, layers: list[str], example: Tensor) -> list[Link] | None:
    """Links of ``layers`` (names of Linear/Conv2d modules) when ``model`` is a plain chain of
    them, else ``None``. Found from the :func:`call_order` of ``example`` (a batch norm right
    after a layer is its own), then checked (:func:`verified`)."""
    order = call_order(model, example)
    if len(order) != len(set(order)) or not set(layers) <= set(order):
        return None  # a module called twice, or not at all: not a chain
    modules = dict(model.named_modules())
    norms = norms_after(model, order, layers)
    links = []
    for name in layers:
        rest = order[order.index(name) + 1:]
        consumer = next((n for n in rest if isinstance(modules[n], PRUNABLE_TYPES)), None)
        if consumer is None:
            return None
        units, module = num_units(modules[name]), modules[consumer]
        width = module.in_features if isinstance(module, nn.Linear) else module.in_channels
        if width % units or (isinstance(module, nn.Conv2d) and width != units):
            return None
        links.append(Link(name, norms[name], consumer, width // units))
    return links if verified(model, links, example) else None


@torch.no_grad()
def verified(model: nn.Module, links: list[Link], example: Tensor) -> bool:
    """Whether removing unit ``i mod units`` of the ``i``-th link (a different unit per layer,
    so a residual sum of two layers' outputs no longer lines up) equals zeroing its
    (normalized) output."""
    if any(num_units(dict(model.named_modules())[link.layer]) < 2 for link in links):
        return False
    zeroed, removed = copy.deepcopy(model).eval(), copy.deepcopy(model).eval()
    modules = dict(zeroed.named_modules())
    for i, link in enumerate(links):
        units = num_units(modules[link.layer])
        alive = torch.arange(units, device=example.device) != i % units
        modules[link.norm or link.layer].register_forward_hook(
            lambda module, _, out, alive=alive: out * along_units(module, alive, out))
        remove_units(removed, link, alive.nonzero().flatten())
    try:
        same = torch.allclose(zeroed(example), removed(example), rtol=1e-4, atol=1e-5)
    except RuntimeError:  # shapes no longer fit: e.g. a residual sum
        return False
    return same
