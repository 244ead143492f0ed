"""The collectives of ngexp's data-parallel code, each a no-op in a world of one.

Tensor collectives are *coalesced*: tensors of one dtype and device are flattened into buckets
of at most :data:`BUCKET_ELEMENTS` and each bucket is reduced or broadcast by one call (one
launch per bucket instead of one per tensor, the temporary memory bounded). They run on the
tensors' device (NCCL on GPUs, gloo on the CPU) and never read a value back to the host.

Host-side decisions (a stop signal, rank 0's choice of checkpoint) are agreed on with CPU
tensors on :func:`~ngexp.distributed.world.control_group` (gloo), so they never wait for a GPU.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from ngexp.distributed.world import control_group, current

#: Elements per flattened bucket (128 MB of float32).
BUCKET_ELEMENTS = 2**25
Group = dist.ProcessGroup | None


def group_size(group: Group = None) -> int:
    """Ranks in ``group`` (the default group when ``None``); 1 without a process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def _buckets(tensors: Sequence[Tensor]) -> list[list[int]]:
    """Indices of ``tensors`` grouped by dtype and device into buckets of at most
    :data:`BUCKET_ELEMENTS` elements (a larger tensor is a bucket of its own)."""
    buckets: list[list[int]] = []
    open_buckets: dict[tuple[torch.dtype, torch.device], tuple[list[int], int]] = {}
    for index, tensor in enumerate(tensors):
        key = (tensor.dtype, tensor.device)
        members, size = open_buckets.get(key, ([], 0))
        if members and size + tensor.numel() > BUCKET_ELEMENTS:
            members, size = [], 0
        if not members:
            buckets.append(members)
        members.append(index)
        open_buckets[key] = (members, size + tensor.numel())
    return buckets


def all_reduce_sum(tensors: Sequence[Tensor], group: Group = None) -> list[Tensor]:
    """The elementwise sums of ``tensors`` over the ranks of ``group`` (new tensors, same
    shapes); the tensors themselves when there is nothing to reduce."""
    if group_size(group) == 1:
        return list(tensors)
    result: list[Tensor] = list(tensors)
    for bucket in _buckets(tensors):
        flat = torch.cat([tensors[i].reshape(-1) for i in bucket])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        for i, part in zip(bucket, flat.split([tensors[i].numel() for i in bucket]),
                           strict=True):
            result[i] = part.view_as(tensors[i])
    return result


def all_reduce_mean(tensors: Sequence[Tensor], group: Group = None) -> list[Tensor]:
    """The elementwise means of ``tensors`` over the ranks of ``group`` (sum, then divided by
    the group size: gloo has no average)."""
    size = group_size(group)
    if size == 1:
        return list(tensors)
    return [total.div_(size) for total in all_reduce_sum(tensors, group)]


def broadcast_(tensors: Sequence[Tensor], src: int, group: Group = None) -> None:
    """Overwrite ``tensors`` on every rank of ``group`` with those of global rank ``src``
    (receivers pass tensors of the same shapes and dtypes, e.g. ``torch.empty``)."""
    if group_size(group) == 1 or not tensors:
        return
    for bucket in _buckets(tensors):
        if len(bucket) == 1 and tensors[bucket[0]].is_contiguous():
            dist.broadcast(tensors[bucket[0]], src=src, group=group)
            continue
        flat = torch.cat([tensors[i].reshape(-1) for i in bucket])
        dist.broadcast(flat, src=src, group=group)
        for i, part in zip(bucket, flat.split([tensors[i].numel() for i in bucket]),
                           strict=True):
            tensors[i].copy_(part.view_as(tensors[i]))


def all_gather_rows(tensor: Tensor) -> Tensor:
    """``tensor (n, ...)`` of every rank concatenated in rank order ``(size * n, ...)`` (every
    rank passes the same shape)."""
    size = group_size()
    if size == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(size)]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def agree_max(value: int) -> int:
    """The largest of the ranks' ``value`` (e.g. a stop signal number, 0 for none), agreed on
    the host (:func:`~ngexp.distributed.world.control_group`)."""
    return _agree(value, dist.ReduceOp.MAX)


def agree_min(value: int) -> int:
    """The smallest of the ranks' ``value``, agreed on the host."""
    return _agree(value, dist.ReduceOp.MIN)


def _agree(value: int, op: dist.ReduceOp.RedOpType) -> int:
    if not current().distributed:
        return value
    box = torch.tensor([value], dtype=torch.int64, device="cpu")
    dist.all_reduce(box, op=op, group=control_group())
    return int(box[0])


def broadcast_int(value: int, src: int = 0) -> int:
    """Rank ``src``'s ``value`` on every rank (host side)."""
    if not current().distributed:
        return value
    box = torch.tensor([value], dtype=torch.int64, device="cpu")
    dist.broadcast(box, src=src, group=control_group())
    return int(box[0])
