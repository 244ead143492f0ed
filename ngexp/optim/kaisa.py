"""Distributed K-FAC and EKFAC: KAISA's placement of the work across data-parallel ranks
(Pauloski, Huang, Xu, Chard, Foster, Zhang: "KAISA: An Adaptive Second-Order Optimizer
Framework for Deep Neural Networks", SC'21, Sec. III; reference implementation
gpauloski/kfac-pytorch, whose names ``grad_worker_fraction`` and gradient workers/receivers
are used here).

With ``N`` ranks, ``grad_worker_fraction = f`` makes ``g = N f`` ranks the *gradient workers*
of each layer (``g`` must divide ``N``). The ranks form a grid of ``g`` rows by ``P = N / g``
columns, rank ``r`` in row ``r // P`` and column ``r % P``:

- **Statistics** (every ``cov_update_freq`` steps): each rank computes the factors ``A`` and
  ``G`` (EKFAC: also its eigenbasis moments ``s``) of its local batch; they are all-reduced to
  their mean over the ranks, which for equal local batches is the global batch's estimate, so
  every rank keeps the same running averages (KAISA Sec. III-A, "factor communication").
- **Decompositions** (every ``inv_update_freq`` steps): each layer is assigned to one rank,
  greedily, largest cost ``groups (d_A^3 + d_G^3)`` first, to the column with the least load
  and in it the rank with the least (KAISA Sec. III-B; its inverse and eigendecomposition
  workers, factors of a layer colocated). That rank inverts or eigendecomposes the layer's
  factors and broadcasts the result to the other ranks of its column: those ``g`` ranks hold
  the layer's preconditioning terms. (EKFAC holds its eigenbases on every rank, because each
  rank rotates its own per-example gradients into them for ``s``; its bases are broadcast to
  all.)
- **Preconditioning** (every step): the ``g`` ranks of the layer's column compute its
  preconditioned gradient ``V``; a rank outside that column receives ``V`` from the member of
  the column in its own row (a broadcast within the row).

So ``f = 1/N`` (``g = 1``, KAISA's MEM-OPT) keeps each layer's terms on one rank and broadcasts
every ``V`` (an all-gather of the preconditioned gradient per step); ``f = 1`` (``g = N``,
COMM-OPT, the default) broadcasts the terms to all ranks at each refresh and communicates no
gradient; fractions in between (HYBRID-OPT) trade the two. Memory for terms per rank: about
``f`` times the single-process amount (``docs/distributed.md`` gives the bytes per step).

:class:`Placement` decides where each layer's work runs (the grid and the owners);
:class:`Kaisa` issues the collectives that share it: the statistics' means, the refreshed terms
(:meth:`Kaisa.refresh`), the directions (:meth:`Kaisa.directions`) and a checkpoint's complete
terms (:meth:`Kaisa.complete`), reading and writing the layers'
:class:`~ngexp.optim.layer_curvature.LayerCurvature`.

Every collective is issued in the same order on all ranks of its group; column broadcasts
(refreshes) always precede row broadcasts (the step's directions), so no two groups wait on
each other. Results equal one process on the union batch up to the order of floating-point
sums (tested on gloo, 2 processes).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from ngexp.curvature.capture import LayerIO
from ngexp.curvature.tasks import Task
from ngexp.distributed import comm
from ngexp.distributed.world import World
from ngexp.errors import OptionError
from ngexp.optim.kronecker_terms import LayerGradient
from ngexp.optim.layer_curvature import LayerCurvature
from ngexp.options import check_range

#: Process groups by their ranks, shared by every preconditioner of this process.
_GROUPS: dict[tuple[int, ...], dist.ProcessGroup | None] = {}


def grad_worker_count(world_size: int, fraction: float) -> int:
    """``g = max(1, world_size * fraction)`` gradient workers (kfac-pytorch's rule, so any
    fraction suits one process); one :class:`OptionError` line when that is not a divisor of
    ``world_size`` (listing the fractions that are)."""
    check_range("grad_worker_fraction", fraction, 0, 1, closed="(]")
    workers = max(1.0, world_size * fraction)
    if abs(workers - round(workers)) > 1e-9 or world_size % round(workers):
        valid = ", ".join(f"{d}/{world_size}" if d < world_size else "1"
                          for d in range(1, world_size + 1) if world_size % d == 0)
        raise OptionError(f"grad_worker_fraction={fraction!r} is invalid: expected k/"
                          f"{world_size} with k a divisor of the world size {world_size}: "
                          f"{valid}")
    return round(workers)


def assign(costs: Mapping[str, float], columns: Sequence[Sequence[int]],
           world_size: int) -> dict[str, int]:
    """Greedy balanced assignment (module docstring): layer name -> rank, largest cost first,
    to the least-loaded column and its least-loaded rank (ties: the lower index)."""
    load = [0.0] * world_size
    owners: dict[str, int] = {}
    for name in sorted(costs, key=lambda n: -costs[n]):  # stable: equal costs keep order
        column = min(columns, key=lambda ranks: sum(load[r] for r in ranks))
        rank = min(column, key=lambda r: load[r])
        load[rank] += costs[name]
        owners[name] = rank
    return owners


def term_shape(layer: LayerIO, field: str) -> tuple[int, ...]:
    """Shape of a layer's preconditioning term ``field`` (a field of
    :class:`~ngexp.optim.layer_curvature.LayerCurvature`)."""
    groups, d_in, d_out = layer.groups, layer.in_dim, layer.out_dim
    return {"a_inv": (groups, d_in, d_in), "basis_a": (groups, d_in, d_in),
            "eigenvalues_a": (groups, d_in), "g_inv": (groups, d_out, d_out),
            "basis_g": (groups, d_out, d_out), "eigenvalues_g": (groups, d_out),
            "pi": (groups,), "scale": (groups, d_out, d_in)}[field]


def process_group(ranks: Sequence[int], world_size: int) -> dist.ProcessGroup | None:
    """The group of ``ranks`` (``None``: the default group, for all of them). Every rank must
    ask for every group, in the same order (``torch.distributed.new_group``)."""
    key = tuple(sorted(ranks))
    if len(key) == world_size:
        return None
    if key not in _GROUPS:
        _GROUPS[key] = dist.new_group(list(key))
    return _GROUPS[key]


class Placement:
    """Where each layer's work runs (module docstring): the grid of ``world``'s ranks for
    ``grad_worker_fraction``, and each layer's owner. ``terms_everywhere``: every rank holds
    every layer's terms (EKFAC)."""

    def __init__(self, layers: Sequence[LayerIO], grad_worker_fraction: float, world: World,
                 terms_everywhere: bool = False) -> None:
        self.world = world
        self.grad_workers = grad_worker_count(world.size, grad_worker_fraction)
        self.partitions = world.size // self.grad_workers
        self.terms_everywhere = terms_everywhere
        costs = {layer.name: float(layer.groups * (layer.in_dim**3 + layer.out_dim**3))
                 for layer in layers}
        self.owner = assign(costs, [self.column(c) for c in range(self.partitions)],
                            world.size)

    def column(self, index: int) -> tuple[int, ...]:
        """The gradient workers of column ``index``: ranks ``index, index + P, ...``."""
        return tuple(range(index, self.world.size, self.partitions))

    def row(self, index: int) -> tuple[int, ...]:
        """Row ``index``: ranks ``index P, ..., index P + P - 1``."""
        return tuple(range(index * self.partitions, (index + 1) * self.partitions))

    def workers(self, name: str) -> tuple[int, ...]:
        """The gradient workers of layer ``name``: its owner's column."""
        return self.column(self.owner[name] % self.partitions)

    def owns(self, name: str) -> bool:
        """Whether this rank computes the layer's decompositions."""
        return self.owner[name] == self.world.rank

    def holds(self, name: str) -> bool:
        """Whether this rank keeps the layer's preconditioning terms."""
        return self.terms_everywhere or self.world.rank in self.workers(name)

    def computes(self, name: str) -> bool:
        """Whether this rank computes the layer's preconditioned gradient."""
        return self.world.rank in self.workers(name)

    def source(self, name: str) -> int:
        """The rank this one receives the layer's preconditioned gradient from: the worker
        in its own row."""
        return (self.world.rank // self.partitions) * self.partitions \
            + self.owner[name] % self.partitions


#: Computes the terms of the given layers (their states, the damping); returns how many
#: decompositions failed (0-dim).
Refresh = Callable[[list[LayerIO], list[LayerCurvature], Tensor], Tensor]
#: A layer's direction ``(groups, d_out, d_in)`` for its gradient.
Direction = Callable[[LayerIO, LayerGradient], Tensor]


class Kaisa:
    """The collectives that share the work of :class:`Placement` (module docstring) for
    ``layers`` of a Kronecker preconditioner in ``world``. In a world of one, every layer is
    this rank's and nothing is communicated."""

    def __init__(self, layers: Sequence[LayerIO], grad_worker_fraction: float, world: World,
                 terms_everywhere: bool = False) -> None:
        self.world = world
        self.placement = place = Placement(layers, grad_worker_fraction, world,
                                           terms_everywhere)
        self.layers = {layer.name: layer for layer in layers}
        self._groups: dict[tuple[int, ...], dist.ProcessGroup | None] = {}
        if world.distributed:  # every rank creates every group, columns then rows
            for ranks in ([place.column(c) for c in range(place.partitions)]
                          + [place.row(r) for r in range(place.grad_workers)]):
                if len(ranks) > 1:
                    self._groups[ranks] = process_group(ranks, world.size)

    @property
    def distributed(self) -> bool:
        return self.world.distributed

    def mean(self, tensors: Sequence[Tensor]) -> list[Tensor]:
        """Means over all ranks (statistics)."""
        return comm.all_reduce_mean(tensors)

    def refresh(self, layers: list[LayerIO], compute: Refresh,
                states: Mapping[str, LayerCurvature], fields: Sequence[str],
                damping: Tensor) -> Tensor:
        """``compute`` the terms ``fields`` of the layers this rank owns, then share them with
        the ranks that hold them, into ``states``; the failed decompositions of all ranks. In
        one process, ``compute`` for all ``layers``."""
        if not self.distributed:
            return compute(layers, [states[layer.name] for layer in layers], damping)
        owned = [layer for layer in layers if self.placement.owns(layer.name)]
        kept = (compute(owned, [states[layer.name] for layer in owned], damping) if owned else
                torch.zeros((), dtype=torch.long, device=layers[0].weight.device))
        self._share_terms([layer.name for layer in layers], states, fields)
        (total,) = comm.all_reduce_sum([kept])
        return total

    def directions(self, layers: list[LayerIO],
                   direction: Direction) -> Iterator[tuple[LayerIO, LayerGradient, Tensor]]:
        """Each layer with a gradient, its gradient and its direction: the layers' gradient
        workers compute the directions, the other ranks receive them by a broadcast within
        their row. In one process, computed one layer at a time as they are consumed."""
        if not self.distributed:
            for layer in layers:
                grad = LayerGradient.of(layer)
                if grad is not None:
                    yield layer, grad, direction(layer, grad)
            return
        live = [(layer, grad) for layer in layers if (grad := LayerGradient.of(layer)) is not None]
        computed = {layer.name: direction(layer, grad) for layer, grad in live
                    if self.placement.computes(layer.name)}
        shared = self._share_directions([layer.name for layer, _ in live], computed)
        for layer, grad in live:
            yield layer, grad, shared[layer.name]

    def complete(self, names: Sequence[str], states: Mapping[str, LayerCurvature],
                 fields: Sequence[str]) -> dict[str, LayerCurvature]:
        """A copy of ``states`` in which every layer of ``names`` has its terms ``fields``
        (each owner broadcasts them to all ranks): what a checkpoint must hold. A collective
        when terms are not held everywhere."""
        complete = {name: state.copy() for name, state in states.items()}
        place = self.placement
        if self.distributed and not place.terms_everywhere and \
                place.grad_workers < self.world.size:
            self._broadcast_from_owners(names, complete, fields, range(self.world.size), None)
        return complete

    def _share_terms(self, names: Sequence[str], states: Mapping[str, LayerCurvature],
                     fields: Sequence[str]) -> None:
        """Broadcast the terms ``fields`` of layers ``names`` (just computed by their owners)
        from each owner to the ranks that hold them, into ``states``."""
        if self.placement.terms_everywhere:
            self._broadcast_from_owners(names, states, fields, range(self.world.size), None)
            return
        column = self.placement.column(self.world.rank % self.placement.partitions)
        if len(column) > 1:
            self._broadcast_from_owners(names, states, fields, column, self._groups[column])

    def _share_directions(self, names: Sequence[str],
                          directions: dict[str, Tensor]) -> dict[str, Tensor]:
        """Every layer's preconditioned gradient ``(groups, d_out, d_in)`` on this rank:
        ``directions`` holds those it computed; the others come from their source rank by a
        broadcast within this rank's row."""
        row = self.placement.row(self.world.rank // self.placement.partitions)
        if len(row) == 1:
            return directions
        shared = dict(directions)
        for src in row:
            mine = [name for name in names if self.placement.source(name) == src]
            tensors = [shared[name] if src == self.world.rank else
                       torch.empty(term_shape(self.layers[name], "scale"),
                                   device=self.layers[name].weight.device)
                       for name in mine]
            comm.broadcast_(tensors, src, self._groups[row])
            shared.update(zip(mine, tensors, strict=True))
        return shared

    def _broadcast_from_owners(self, names: Sequence[str], states: Mapping[str, LayerCurvature],
                               fields: Sequence[str], owners: Sequence[int],
                               group: dist.ProcessGroup | None) -> None:
        """For each rank of ``owners`` in turn, one coalesced broadcast (within ``group``) of
        the terms of the layers of ``names`` it owns."""
        for owner in owners:
            mine = [name for name in names if self.placement.owner[name] == owner]
            slots: list[tuple[str, str]] = [(name, field) for name in mine for field in fields]
            if owner == self.world.rank:
                tensors = [getattr(states[name], field) for name, field in slots]
            else:
                tensors = [torch.empty(term_shape(self.layers[name], field),
                                       device=self.layers[name].weight.device)
                           for name, field in slots]
            comm.broadcast_(tensors, owner, group)
            for (name, field), tensor in zip(slots, tensors, strict=True):
                setattr(states[name], field, tensor)


class GlobalSamples(Task):
    """``task`` with targets sampled for the global batch: each rank gathers every rank's
    outputs (in rank order, i.e. the single process's batch), draws from the generator all
    ranks share, and keeps its own rows -- the draws of one process on the union batch, and
    generator states that stay equal on all ranks (so rank 0's checkpoint restores them all).
    Costs an all-gather of the outputs per sampled pass on statistics steps."""

    def __init__(self, task: Task, world: World) -> None:
        self.task, self.world = task, world
        self.name, self.metric_names = task.name, task.metric_names

    def loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return self.task.loss(outputs, targets)

    def sample_targets(self, outputs: Tensor, generator: torch.Generator | None = None) -> Tensor:
        rows = outputs.shape[0]
        everyone = comm.all_gather_rows(outputs.detach())
        samples = self.task.sample_targets(everyone, generator)
        return samples[self.world.rank * rows:(self.world.rank + 1) * rows]
