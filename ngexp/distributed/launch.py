"""``trainer.devices=N``: run ``python -m ngexp train ...`` as N data-parallel processes on this
machine, exactly as ``torchrun --standalone --nproc-per-node=N -m ngexp train ...`` would (this
calls ``torch.distributed.run``), and return the run's exit code without torchrun's error
report: each process reports for itself (rank 0 writes the run directory and prints).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

#: Exit code of an interrupted run (SIGINT/SIGTERM): the shell's 128 + SIGINT.
INTERRUPTED = 130


def launch_local(nproc: int, args: Sequence[str]) -> int:
    """Start ``nproc`` processes of ``ngexp ARGS`` (elastic launch, standalone rendezvous on a
    free port, no restarts) and wait for them; the exit code of rank 0 if it failed, else of
    the first process that failed, else 0. A signal to this process is passed on to the
    processes (they checkpoint and stop), and gives 130.

    Each process gets ``OMP_NUM_THREADS`` = cores / ``nproc`` unless it is set."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    elastic = logging.getLogger("torch.distributed.elastic")
    level = elastic.level
    elastic.setLevel(logging.ERROR)  # its "closing signal" notes; our processes say why
    try:
        run(parse_args(["--standalone", f"--nproc-per-node={nproc}", "--max-restarts=0",
                        "--module", "ngexp", *args]))
    except ChildFailedError as error:
        failure = error.failures.get(0) or error.get_first_failure()[1]
        return failure.exitcode if failure.exitcode > 0 else 128 - failure.exitcode
    except SignalException:
        return INTERRUPTED
    finally:
        elastic.setLevel(level)
    return 0
