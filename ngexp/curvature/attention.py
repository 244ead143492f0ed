"""``nn.MultiheadAttention``'s projections as four affine maps the capture covers.

torch computes the attention with ``F.multi_head_attention_forward``, which applies the input
projection (``in_proj_weight``, or ``q/k/v_proj_weight`` when the key/value sizes differ) and
``out_proj`` through ``F.linear``: no module hook sees them (kfac-pytorch's issue 267). The
capture therefore takes them from those ``F.linear`` calls themselves: while a hooked
attention module runs a capturing forward, ``torch.nn.functional.linear`` is replaced by a
function that calls the original and records each call whose weight is (a row block of) one of
the module's projection weights (and ``F.multi_head_attention_forward`` by itself run eagerly,
so that a compiled forward records real tensors too). So torch's own computation runs
unchanged, and the blocks are:

- ``q``, ``k``, ``v``: ``s = W_x [a; 1]`` with ``W_x`` the rows ``[iE, (i+1)E)`` of
  ``in_proj_weight`` (and of ``in_proj_bias``), inputs the query, key and value rows; a packed
  self-attention call (one ``F.linear`` for all three) feeds each block its third of the
  output gradient;
- ``out``: ``out_proj`` on the heads' concatenated outputs.

Each is a Kronecker block like a Linear layer's (the same factors as attention written with
four ``nn.Linear`` layers). Inside torch the rows are sequence-first (``(L, B, E)``, or ``(L
B, E)`` flattened for ``out_proj``); they are recorded batch-first, ``(B, L, E)``, so that
per-example sums group each example's positions. ``bias_k``/``bias_v`` (``add_bias_kv``)
are not affine maps of the input and keep the plain gradient (named by the coverage report).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ngexp.curvature.layers import LayerIO, OnCall, eager

#: The role of each block and the parameter names it reads (separate q/k/v weights).
ROLES = ("q", "k", "v")
#: The entered :class:`ProjectionCalls`: while there are some, ``F.linear`` and torch's
#: attention function are replaced (:data:`REPLACEMENTS`), the originals kept in ``SAVED``.
ENTERED: list[ProjectionCalls] = []
SAVED: dict[str, Callable[..., Any]] = {}


def recording_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear``, reporting the call to every entered :class:`ProjectionCalls`."""
    output = SAVED["linear"](x, weight, bias)
    for calls in ENTERED:
        calls.seen(x, weight, output)
    return output


#: What replaces each function of ``torch.nn.functional``, run eagerly: a compiled forward
#: would trace torch's attention with fake tensors.
REPLACEMENTS = {"linear": eager(recording_linear),
                "multi_head_attention_forward": eager(F.multi_head_attention_forward)}


class ProjectionIO(LayerIO):
    """One projection (``q``, ``k``, ``v`` or ``out``) of an ``nn.MultiheadAttention``: rows
    ``rows`` of ``weight`` (all rows when ``None``) and rows ``bias_rows`` of ``bias``."""

    def __init__(self, name: str, module: nn.MultiheadAttention, role: str, weight: nn.Parameter,
                 bias: nn.Parameter | None, rows: slice | None, bias_rows: slice | None,
                 weight_name: str) -> None:
        self.role = role
        self.rows, self.bias_rows = rows, bias_rows
        super().__init__(name, module, weight=weight, bias=bias, weight_name=weight_name)

    def read_shape(self) -> None:
        rows = self.rows
        self.groups = 1
        self.fan_in = self.weight.shape[1]
        self.out_dim = self.weight.shape[0] if rows is None else rows.stop - rows.start
        self.in_dim = self.fan_in + int(self.has_bias)

    def weight_matrix(self, weight: Tensor) -> Tensor:
        return (weight if self.rows is None else weight[self.rows])[None]

    def weight_like(self, matrix: Tensor) -> Tensor:
        return matrix.reshape(self.out_dim, self.fan_in)

    def bias_vector(self, bias: Tensor) -> Tensor:
        return (bias if self.bias_rows is None else bias[self.bias_rows])[None]

    def write_weight(self, target: Tensor, matrix: Tensor) -> None:
        self.weight_matrix(target)[0].copy_(matrix[0])

    def write_bias(self, target: Tensor, vector: Tensor) -> None:
        self.bias_vector(target)[0].copy_(vector[0])


def attention_blocks(name: str, module: nn.MultiheadAttention) -> list[ProjectionIO]:
    """The ``q``, ``k``, ``v`` and ``out`` blocks of ``module`` (named ``<name>.q`` ...)."""
    prefix = f"{name}." if name else ""
    size = module.embed_dim
    blocks = []
    for index, role in enumerate(ROLES):
        rows = slice(index * size, (index + 1) * size)
        if module._qkv_same_embed_dim:
            weight, weight_rows, weight_name = module.in_proj_weight, rows, "in_proj_weight"
        else:
            weight, weight_rows = getattr(module, f"{role}_proj_weight"), None
            weight_name = f"{role}_proj_weight"
        blocks.append(ProjectionIO(f"{prefix}{role}", module, role, weight, module.in_proj_bias,
                                   weight_rows, rows, f"{prefix}{weight_name}"))
    out = module.out_proj
    blocks.append(ProjectionIO(f"{prefix}out", module, "out", out.weight, out.bias, None, None,
                               f"{prefix}out_proj.weight"))
    return blocks


def attach_projections(module: nn.MultiheadAttention, layers: list[LayerIO], on_call: OnCall,
                       enabled: Callable[[nn.Module], bool]) -> list[RemovableHandle]:
    """Record the projection calls of each forward of ``module`` while ``enabled(module)``:
    :class:`ProjectionCalls` entered by a pre-hook, left by a hook that runs always."""
    calls = ProjectionCalls([layer for layer in layers if isinstance(layer, ProjectionIO)],
                            on_call)

    def enter(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if enabled(module):
            calls.start(batch_size(module, args[0] if args else kwargs["query"]))

    def leave(*_: Any) -> None:
        if calls.entered:
            calls.__exit__()

    return [module.register_forward_pre_hook(enter, with_kwargs=True),
            module.register_forward_hook(leave, always_call=True)]


class ProjectionCalls:
    """While entered, ``F.linear`` calls on the projection weights of one attention module
    are recorded with ``record(block, rows (B, L, E), output, to_rows)``, ``to_rows`` mapping
    the output's gradient to the block's batch-first gradient rows. ``batch`` is the batch size
    of the running forward (:meth:`start` sets it)."""

    def __init__(self, blocks: list[ProjectionIO], record: OnCall) -> None:
        self.blocks, self.record = blocks, record
        self.batch = 1
        #: Whether this module's calls are recorded now.
        self.entered = False

    @eager
    def start(self, batch: int) -> None:
        """Enter, for a forward of batch size ``batch``."""
        self.batch = batch
        self.__enter__()

    def __enter__(self) -> ProjectionCalls:
        if self.entered:
            return self
        if not ENTERED:  # the names torch's attention functions look up at call time
            for name, replacement in REPLACEMENTS.items():
                SAVED[name] = getattr(F, name)
                setattr(F, name, replacement)
        ENTERED.append(self)
        self.entered = True
        return self

    @eager
    def __exit__(self, *_: Any) -> None:
        """Leave (in any order when several captures record the same module)."""
        if self.entered:
            self.entered = False
            ENTERED.remove(self)
            if not ENTERED:
                for name, original in SAVED.items():
                    setattr(F, name, original)

    def seen(self, x: Tensor, weight: Tensor, output: Tensor) -> None:
        """Record the call ``output = F.linear(x, weight, ...)`` if ``weight`` holds blocks."""
        for block, begin, end in self._matches(weight):
            self.record(block, self._batch_first(x), output,
                        lambda grad, b=begin, e=end: self._batch_first(grad[..., b:e]))

    def _matches(self, weight: Tensor) -> list[tuple[ProjectionIO, int, int]]:
        """The blocks whose rows ``weight`` holds, with their column range in its output."""
        found = []
        for block in self.blocks:
            param = block.weight
            if weight.untyped_storage().data_ptr() != param.untyped_storage().data_ptr():
                continue
            first = (weight.storage_offset() - param.storage_offset()) // param.shape[1]
            rows = block.rows or slice(0, param.shape[0])  # the block's rows of its weight
            if first <= rows.start and rows.stop <= first + weight.shape[0]:
                found.append((block, rows.start - first, rows.stop - first))
        return found

    def _batch_first(self, tensor: Tensor) -> Tensor:
        """``(L, B, E)`` or ``(L B, E)`` rows inside torch's attention as ``(B, L, E)``."""
        if tensor.dim() == 2:
            tensor = tensor.view(-1, self.batch, tensor.shape[-1])
        return tensor.transpose(0, 1)


def batch_size(module: nn.MultiheadAttention, query: Tensor) -> int:
    """The batch size of a call of ``module`` (1 for an unbatched ``(L, E)`` query)."""
    if query.dim() == 2:
        return 1
    return query.shape[0] if module.batch_first else query.shape[1]
