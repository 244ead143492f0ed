"""Which layers are pruned, and the binary masks that keep pruned parameters at zero.

A *unit* is the smallest thing a pruning decision removes: one weight (unstructured pruning) or
one output channel of a layer, i.e. a Conv2d filter or a Linear output neuron together with its
bias (``structure="filter"``). Masks are float tensors shaped like the parameters they mask and
are applied in place with one fused ``torch._foreach_mul_`` (no host synchronization).
"""

from __future__ import annotations

from collections.abc import Callable
from fnmatch import fnmatchcase
from typing import Any

import torch
from torch import Tensor, nn

#: Layer types whose weights can be pruned.
PRUNABLE_TYPES = (nn.Linear, nn.Conv2d)


def unwrap(model: nn.Module) -> nn.Module:
    """The eager module behind a ``torch.compile`` wrapper (its parameter names have no prefix)."""
    return getattr(model, "_orig_mod", model)


@torch.no_grad()
def hooked_eval_forward(model: nn.Module, example: Tensor,
                        hooks: dict[nn.Module, Callable[..., None]]) -> None:
    """One eval-mode forward of ``example`` with a forward hook on each module of ``hooks``;
    the hooks are removed and the model's mode restored afterwards."""
    handles = [module.register_forward_hook(hook) for module, hook in hooks.items()]
    was_training = model.training
    try:
        model.eval()
        model(example)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()


def param_key(layer: str, kind: str = "weight") -> str:
    """Name of parameter ``kind`` of module ``layer`` as ``named_parameters`` spells it."""
    return f"{layer}.{kind}" if layer else kind


def prunable_layers(model: nn.Module, keep_first_dense: bool = False,
                    keep_last_dense: bool = False,
                    exclude: tuple[str, ...] | list[str] = ()) -> dict[str, nn.Module]:
    """Linear/Conv2d modules of ``model`` by name, in registration order (the forward order of
    the sequential models here), without the first/last one if asked, nor names matching a
    shell pattern of ``exclude`` (e.g. ``"classifier.*"``)."""
    layers = {name: module for name, module in model.named_modules()
              if isinstance(module, PRUNABLE_TYPES)}
    names = list(layers)
    dropped = {names[0]} if keep_first_dense and names else set()
    dropped |= {names[-1]} if keep_last_dense and names else set()
    dropped |= {name for name in names if any(fnmatchcase(name, p) for p in exclude)}
    return {name: layers[name] for name in names if name not in dropped}


class Masks:
    """Masks of the prunable layers' weights (and, for filter pruning, biases).

    Pruning decisions are made per unit (:meth:`alive`, :meth:`set_alive`) and stored in the
    parameter masks. Masks do nothing until :meth:`set_alive` or :meth:`load_state_dict`
    activates them.
    """

    def __init__(self, layers: dict[str, nn.Module], structure: str = "unstructured") -> None:
        self.layers, self.structure = layers, structure
        self.active = False
        self.params: list[Tensor] = []
        self.tensors: list[Tensor] = []
        self._index: dict[tuple[str, str], int] = {}
        for name, module in layers.items():
            kinds = ("weight", "bias") if structure == "filter" else ("weight",)
            for kind in kinds:
                param = getattr(module, kind)
                if param is not None:
                    self._index[name, kind] = len(self.params)
                    self.params.append(param)
                    self.tensors.append(torch.ones_like(param, memory_format=torch.preserve_format))

    def weight_mask(self, layer: str) -> Tensor:
        return self.tensors[self._index[layer, "weight"]]

    def num_units(self, layer: str) -> int:
        weight = self.layers[layer].weight
        return weight.shape[0] if self.structure == "filter" else weight.numel()

    def alive(self, layer: str) -> Tensor:
        """Boolean ``(units,)``: units not pruned (a filter is pruned when all its weights are)."""
        return self.weight_mask(layer).reshape(self.num_units(layer), -1).bool().any(1)

    def set_alive(self, layer: str, alive: Tensor) -> None:
        """Mask all parameters of the units of ``layer`` where ``alive`` ``(units,)`` is false."""
        for kind in ("weight", "bias"):
            index = self._index.get((layer, kind))
            if index is not None:
                mask = self.tensors[index]
                per_unit = alive.reshape(-1, *(1,) * (mask.dim() - 1)) \
                    if self.structure == "filter" else alive.reshape(mask.shape)
                mask.copy_(per_unit.expand_as(mask))
        self.active = True

    @torch.no_grad()
    def mask_weights(self) -> None:
        if self.active:
            torch._foreach_mul_(self.params, self.tensors)

    @torch.no_grad()
    def mask_gradients(self) -> None:
        if self.active:
            pairs = [(p.grad, m) for p, m in zip(self.params, self.tensors, strict=True)
                     if p.grad is not None]
            if pairs:
                grads, masks = zip(*pairs, strict=True)
                torch._foreach_mul_(list(grads), list(masks))

    def state_dict(self) -> dict[str, Any]:
        """Boolean masks by parameter name (``"<layer>.weight"``), empty while inactive."""
        if not self.active:
            return {}
        return {param_key(layer, kind): self.tensors[i].bool().cpu() for (layer, kind), i
                in self._index.items()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if not state:
            return
        expected = {param_key(layer, kind) for layer, kind in self._index}
        if set(state) != expected:
            raise ValueError(f"pruning masks do not match the model: saved for "
                             f"{sorted(set(state) - expected)} but missing "
                             f"{sorted(expected - set(state))}")
        for (layer, kind), i in self._index.items():
            self.tensors[i].copy_(state[param_key(layer, kind)])
        self.active = True
