"""Shared test helpers: running ``ngexp`` as a subprocess, composing configs in-process,
building a trainer and reading run directories (hooks live in ``conftest.py``)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch

from ngexp.callbacks import Callback

REPO = Path(__file__).resolve().parents[1]
#: Under pytest-xdist (``make test`` runs 2 workers on 2 cores) each worker and each ``ngexp``
#: subprocess uses one thread, so the cores are not oversubscribed.
THREADS = "1" if os.environ.get("PYTEST_XDIST_WORKER") else "2"
CONF = REPO / "conf"
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")


#: How many "standard deviations" :func:`sum_tolerance` allows (Higham and Mary's lambda).
SUM_CONFIDENCE = 6.0


def sum_tolerance(dtype: torch.dtype, terms: int, scale: float, *,
                  independent: bool = True) -> float:
    """Absolute error bound of a sum of ``terms`` products ``x_i y_i`` computed in ``dtype``
    (a dot product, one entry of a matmul, a Gram matrix or a conv), whatever the order of
    the sum: the BLAS kernel, the blocking, the threads and the CPU pick it, and they differ
    between machines and runs.

    ``scale`` is ``sum_i |x_i y_i|``, the magnitude of the terms, *not* the value of the
    result, which may cancel (for a Gram matrix ``sum_rows r r^T`` it is at most its largest
    diagonal entry, by Cauchy-Schwarz; for a mean, pass the sum's ``scale`` and divide the
    bound by the count). With unit roundoff ``u = eps / 2``, each product and each addition
    rounds once, and rounding the two factors to ``dtype`` (a float64 reference of float32
    inputs) costs two more, so with ``n = terms + 2`` (Higham, *Accuracy and Stability of
    Numerical Algorithms*, Eq. 3.5):

    * worst case: ``|error| <= gamma_n * scale``, ``gamma_n = n u / (1 - n u)``;
    * for rounding errors that are independent and of mean zero (random data: the default,
      ``independent``), with probability at least ``1 - 2 n exp(-lambda^2 (1 - u)^2 / 2)``,
      ``|error| <= (exp(lambda sqrt(n) u + n u^2 / (1 - u)) - 1) * scale``, about ``lambda
      sqrt(n) u scale`` (Higham and Mary 2019, Theorem 3.1). ``lambda = 6``
      (:data:`SUM_CONFIDENCE`) is already a bound; the typical error is a small fraction.

    The smaller of the two is returned, or the worst case alone when the terms are not
    independent random numbers (``independent=False``: a batch repeated many times, constant
    terms), whose rounding errors correlate and grow like ``n``, not ``sqrt(n)``. When both
    sides of a comparison are sums in ``dtype`` (two orders of the same float32 computation,
    say), their errors add: allow the sum of both bounds. A chain of products ``A1 A2 ... Ak``
    has, to first order, the bound of one sum of ``terms = sum of the inner dimensions``
    with ``scale = (|A1| |A2| ... |Ak|)_ij`` (Higham, Eq. 3.13)."""
    if not dtype.is_floating_point:
        return 0.0
    u = torch.finfo(dtype).eps / 2
    n = terms + 2
    worst = n * u / (1 - n * u) if n * u < 1 else math.inf
    if not independent:
        return worst * float(scale)
    likely = math.expm1(SUM_CONFIDENCE * math.sqrt(n) * u + n * u * u / (1 - u))
    return min(worst, likely) * float(scale)


def fashion_mnist_available() -> bool:
    torchvision_copy = REPO / "data/FashionMNIST/raw/train-images-idx3-ubyte.gz"
    return FASHION_MNIST.is_file() or torchvision_copy.is_file()


requires_fashion_mnist = pytest.mark.skipif(
    not fashion_mnist_available() and os.environ.get("CI") != "true",
    reason="real Fashion-MNIST not installed (make data)")


def ngexp(*args: str, cwd: Path | None = None, check: bool = True,
          timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run ``python -m ngexp ARGS`` in a subprocess (plain progress lines, no colours)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "NO_COLOR": "1", "COLUMNS": "200"}
    env.setdefault("OMP_NUM_THREADS", THREADS)
    result = subprocess.run([sys.executable, "-m", "ngexp", *args], cwd=cwd or REPO, env=env,
                            capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"ngexp {' '.join(args)} exited {result.returncode}\n"
                             f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}")
    return result


def run_dirs(root: Path) -> list[Path]:
    return sorted(path.parent for path in root.rglob("summary.json")
                  if ".replaced-" not in str(path))


def read_summary(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "summary.json").read_text())


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


#: The fields of a metrics record that are measured times, different in every session.
TIMINGS = ("time", "train/examples_per_s", "train/step_time_ms", "train/peak_mem_mb")


class InterruptAfter(Callback):
    """Stops the run after ``step`` steps as SIGTERM does (checkpoint, then interrupted)."""

    def __init__(self, step: int) -> None:
        self.at = step

    def after_optimizer_step(self, trainer: Any) -> None:
        if trainer.step + 1 == self.at:
            trainer.stop.signal = signal.SIGTERM


def compose(*overrides: str):
    """Compose ``conf/train.yaml`` with overrides (schemas registered), without Hydra's node."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from ngexp.config import register_all
    from ngexp.hydra_compat import VERSION_BASE

    register_all()
    with initialize_config_dir(str(CONF), **VERSION_BASE):
        return hydra_compose("train", overrides=list(overrides))


def build_trainer(cfg: Any, choices: Mapping[str, str | None], run_dir: Path):
    """A :class:`ngexp.train.trainer.Trainer` of the run of ``cfg`` in ``run_dir`` (built, not
    trained yet; :func:`ngexp.train.session.run_session` trains it)."""
    from ngexp.train.build import build_run
    from ngexp.train.trainer import Trainer

    return Trainer(build_run(cfg, choices, run_dir))
