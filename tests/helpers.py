"""Shared test helpers: running ``ngexp`` as a subprocess, composing configs in-process,
building a trainer and reading run directories (hooks live in ``conftest.py``)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from ngexp.callbacks import Callback

REPO = Path(__file__).resolve().parents[1]
#: Under pytest-xdist (``make test`` runs 2 workers on 2 cores) each worker and each ``ngexp``
#: subprocess uses one thread, so the cores are not oversubscribed.
THREADS = "1" if os.environ.get("PYTEST_XDIST_WORKER") else "2"
CONF = REPO / "conf"
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")


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

    register_all()
    with initialize_config_dir(str(CONF), version_base=None):
        return hydra_compose("train", overrides=list(overrides))


def build_trainer(cfg: Any, choices: Mapping[str, str | None], run_dir: Path):
    """A :class:`ngexp.train.trainer.Trainer` of the run of ``cfg`` in ``run_dir`` (built, not
    trained yet; :func:`ngexp.train.session.run_session` trains it)."""
    from ngexp.train.build import build_run
    from ngexp.train.trainer import Trainer

    return Trainer(build_run(cfg, choices, run_dir))
