"""The data-parallel world of this process, and joining it.

A process is *launched* when a launcher started it as one of several:

- ``torchrun`` (``torch.distributed.run``, also behind ``trainer.devices=N``) sets ``RANK``,
  ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``;
- a SLURM job step with several tasks (``srun``, submitit's ``tasks_per_node``) sets
  ``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID`` and the node list; :func:`join` exports
  the ``torchrun`` variables from them (as submitit's ``TorchDistributedEnvironment`` does: the
  first node is the master, the port derived from the job id unless ``MASTER_PORT`` is set).

:func:`join` then initializes the default process group by the ``env://`` method, with NCCL for
a CUDA device (rank ``r`` uses ``cuda:LOCAL_RANK``) and gloo on the CPU, once per process; with
NCCL it also makes a gloo group for host-side decisions (:func:`control_group`), so agreeing on
e.g. a stop signal never waits for the device.
"""

from __future__ import annotations

import atexit
import os
import random
import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist

#: Port range of a SLURM job's rendezvous when ``MASTER_PORT`` is not set (submitit's).
SLURM_PORTS = (20000, 60000)

_control: dist.ProcessGroup | None = None


@dataclass(frozen=True)
class World:
    """Rank and size of the data-parallel world, and of this process's machine."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes the run directory."""
        return self.rank == 0


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: ``gpu[003-004,7],cpu1`` -> ``gpu003``."""
    match = re.match(r"([^,\[]*)(?:\[([^\]]*)\])?([^,]*)", nodelist.strip())
    if match is None or not match.group(0):
        raise ValueError(f"cannot read the SLURM node list {nodelist!r}")
    prefix, ranges, suffix = match.groups()
    first = ranges.split(",")[0].split("-")[0] if ranges else ""
    return f"{prefix}{first}{suffix or ''}"


def slurm_variables(environ: Mapping[str, str]) -> dict[str, str]:
    """The ``torchrun`` variables of a multi-task SLURM step, from its ``SLURM_*`` ones
    (empty when this is not one)."""
    tasks = int(environ.get("SLURM_NTASKS", "1") or 1)
    if "SLURM_PROCID" not in environ or tasks <= 1:
        return {}
    nodes = int(environ.get("SLURM_NNODES", environ.get("SLURM_JOB_NUM_NODES", "1")) or 1)
    nodelist = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST") \
        or environ.get("SLURM_NODELIST", "localhost")
    port = environ.get("MASTER_PORT") or str(
        random.Random(environ.get("SLURM_JOB_ID", "0")).randint(*SLURM_PORTS))
    return {"RANK": environ["SLURM_PROCID"], "WORLD_SIZE": str(tasks),
            "LOCAL_RANK": environ.get("SLURM_LOCALID", "0"),
            "LOCAL_WORLD_SIZE": str(max(1, tasks // max(nodes, 1))),
            "MASTER_ADDR": environ.get("MASTER_ADDR") or first_host(nodelist),
            "MASTER_PORT": port}


def launched_world(environ: Mapping[str, str] | None = None) -> World:
    """The world a launcher started this process in (module docstring); ``World()`` when it
    was started alone."""
    environ = os.environ if environ is None else environ
    variables = {**slurm_variables(environ), **{key: environ[key] for key in
                 ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE") if key in environ}}
    size = int(variables.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    return World(int(variables["RANK"]), size, int(variables.get("LOCAL_RANK", "0")),
                 int(variables.get("LOCAL_WORLD_SIZE", str(size))))


def current() -> World:
    """The world of the initialized default process group (``World()`` without one): what the
    preconditioners distribute their work over."""
    if not (dist.is_available() and dist.is_initialized()):
        return World()
    launched = launched_world()
    size = dist.get_world_size()
    local = launched if launched.size == size else World(size=size, local_size=size)
    return World(dist.get_rank(), size, local.local_rank, local.local_size)


def device_type(device: str) -> str:
    """``cuda`` or ``cpu`` for a ``trainer.device`` value (``auto``: CUDA when available)."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return "cuda" if device.startswith("cuda") else "cpu"


def join(device: str) -> World:
    """Join the launched world of this process (module docstring), initializing the default
    process group the first time; a process started alone gets ``World()``."""
    global _control
    launched = launched_world()
    if not launched.distributed:
        return World()
    if dist.is_initialized():
        return current()
    for key, value in slurm_variables(os.environ).items():
        os.environ.setdefault(key, value)
    cuda = device_type(device) == "cuda"
    if cuda:
        torch.cuda.set_device(launched.local_rank)
    dist.init_process_group("nccl" if cuda else "gloo", init_method="env://",
                            device_id=torch.device("cuda", launched.local_rank) if cuda else None)
    _control = dist.new_group(backend="gloo") if cuda else None
    atexit.register(leave)
    return current()


def control_group() -> dist.ProcessGroup | None:
    """The group for host-side (CPU tensor) collectives: gloo beside NCCL, else the default."""
    return _control


def leave() -> None:
    """Destroy the process group (at exit of a launched process)."""
    global _control
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _control = None
