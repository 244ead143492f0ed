"""Which device a sweep job trains on: one GPU per job process when several are visible.

Job numbers alone cannot place parallel jobs (with 4 GPUs, jobs 0 and 4 may run at the same time
when job 0 is slow), so a job process *claims* a GPU: it takes an exclusive ``flock`` on a lock
file named after the GPU, which the OS releases when the process exits. A joblib worker keeps its
GPU for every job it runs; processes of other sweeps on the same machine see the claims too.
"""

from __future__ import annotations

import fcntl
import os
import tempfile
from pathlib import Path
from typing import IO

_held: list[tuple[int, IO[str]]] = []  # this process's claim: (GPU index, open lock file)


def lock_dir() -> Path:
    return Path(tempfile.gettempdir()) / f"ngexp-gpu-locks-{os.getuid()}"


def physical_id(index: int) -> str:
    """The id of visible GPU ``index`` in ``CUDA_VISIBLE_DEVICES`` (the index if unset)."""
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")
               if v.strip()]
    return visible[index] if index < len(visible) else str(index)


def claim_gpu(job_num: int, num_gpus: int, folder: Path) -> tuple[int, IO[str]] | None:
    """Lock the first free GPU of ``job_num % num_gpus, job_num + 1, ...``; ``None`` if all are
    held. The claim lasts while the returned file stays open."""
    folder.mkdir(parents=True, exist_ok=True)
    for offset in range(num_gpus):
        index = (job_num + offset) % num_gpus
        stream = (folder / f"gpu-{physical_id(index)}.lock").open("w")
        try:
            fcntl.flock(stream, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            stream.close()
            continue
        return index, stream
    return None


def assign_device(job_num: int, num_gpus: int | None = None) -> str:
    """Device for sweep job ``job_num`` when ``trainer.device=auto``: ``cpu`` without CUDA,
    ``cuda`` with one GPU; with several, the GPU this process claimed (``cuda:<i>``), or when
    every GPU is claimed already, GPU ``job_num % num_gpus`` shared with another job."""
    if num_gpus is None:
        import torch

        num_gpus = torch.cuda.device_count()
    if num_gpus == 0:
        return "cpu"
    if num_gpus == 1:
        return "cuda"
    if not _held:
        claim = claim_gpu(job_num, num_gpus, lock_dir())
        if claim is None:
            return f"cuda:{job_num % num_gpus}"
        _held.append(claim)
    return f"cuda:{_held[0][0]}"
