"""What the capture keeps of its forwards and backward passes, and for how long.

What one capturing forward and its backward passes leave is a *record*: a
:class:`ForwardRecord` of the model (the kinds of the passes through it; with the capture's
``watch_model``, the model's arguments, output, autocast dtype and output gradients) and one
:class:`~ngexp.curvature.layers.LayerRecord` per covered layer (its calls' inputs, outputs and
output gradients per pass). :class:`Records` keeps them side by side: ``forwards[i]`` and each
layer's ``records[i]`` are the ``i``-th kept forward's.

The accumulation policy (:meth:`Records.open_forward`): by default a capturing forward drops
the records of earlier ones; with ``accumulate=True`` (the preconditioners: gradient
accumulation, k forward/backward pairs before one step) the records of every forward that was
back-propagated are kept until :meth:`Records.clear`, while a forward that saw no backward pass
before the next one, or one followed by ``zero_grad`` (every hooked parameter's ``.grad``
``None`` when the next forward starts), is dropped.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ngexp.curvature.layers import LayerIO, LayerRecord

#: Kinds of a recorded backward pass: of the training loss (the plain ``loss.backward()``, the
#: empirical Fisher), of losses on targets sampled from the model (the Monte-Carlo Fisher).
TRAINING, SAMPLED = "training", "sampled"


@dataclass(eq=False)
class ForwardRecord:
    """One capturing forward of the model: the kinds of the backward passes through it, and
    (with :attr:`Capture.watch_model`) its positional arguments (detached), output, autocast
    dtype and the output gradient of each pass."""

    pass_kinds: list[str] = field(default_factory=list)
    model_args: tuple[Any, ...] = ()
    model_output: Tensor | None = None
    model_autocast: torch.dtype | None = None
    output_grads: list[Tensor] = field(default_factory=list)

    def passes(self, kind: str) -> list[int]:
        """Indices of the recorded passes of ``kind``."""
        return [index for index, recorded in enumerate(self.pass_kinds) if recorded == kind]

    def release(self) -> None:
        """Drop the tensors: the gradient hook on ``model_output`` refers to this record, a
        cycle through autograd's C++ graph that Python's collector cannot break."""
        self.model_args, self.model_output = (), None
        self.output_grads.clear()


class Records:
    """The records of the kept capturing forwards of the model whose covered layers are
    ``layers``: ``forwards[i]`` and ``layer.records[i]`` (module docstring)."""

    def __init__(self, layers: list[LayerIO]) -> None:
        self.layers = layers
        self.forwards: list[ForwardRecord] = []

    @property
    def latest(self) -> ForwardRecord:
        """The latest forward's record (an empty one before any)."""
        return self.forwards[-1] if self.forwards else ForwardRecord()

    def open_forward(self, accumulate: bool) -> None:
        """Start the records of a capturing forward, first dropping what the accumulation
        policy (module docstring) does not keep."""
        if not accumulate or self._grads_discarded():
            self.clear()
        elif self.forwards and not self.forwards[-1].pass_kinds:  # never back-propagated
            self.forwards.pop().release()
            for layer in self.layers:
                layer.records.pop().release()
        self.forwards.append(ForwardRecord())
        for layer in self.layers:
            layer.records.append(LayerRecord())

    def open_pass(self, forward: ForwardRecord, kind: str) -> None:
        """Start a backward pass of ``kind`` through ``forward``: each of its layer records
        gets an empty map from call index to output gradient (none when ``forward`` is no
        longer kept)."""
        forward.pass_kinds.append(kind)
        index = next((i for i, kept in enumerate(self.forwards) if kept is forward), None)
        if index is not None:
            for layer in self.layers:
                layer.records[index].grads.append({})

    def clear(self) -> None:
        """Drop every record."""
        for forward in self.forwards:
            forward.release()
        for layer in self.layers:
            for record in layer.records:
                record.release()
            layer.records.clear()
        self.forwards.clear()

    def _grads_discarded(self) -> bool:
        """Whether ``zero_grad`` ran since the kept forwards' backward passes: every hooked
        parameter's ``.grad`` is ``None``."""
        return bool(self.forwards) and all(p.grad is None for layer in self.layers
                                           for p in layer.params)


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast casts to on ``device_type`` right now, ``None`` when it is off."""
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def autocast_like(device_type: str, dtype: torch.dtype | None) -> AbstractContextManager[Any]:
    """Autocast to ``dtype`` on ``device_type`` (nothing when ``dtype`` is ``None``)."""
    return nullcontext() if dtype is None else torch.autocast(device_type, dtype=dtype)
