"""Resume is bit-identical: a run stopped (the trainer's SIGTERM path) after any step and resumed
ends with every tensor of its final checkpoint equal to the uninterrupted run's.

In-process trainers on synthetic data (no data set needed, seconds per run). A SIGKILL resumes
from the last epoch-end checkpoint, which is what a stop at an epoch boundary writes: the
stop steps below include one. The MLP's 256 x 257 layer at batch 64 takes K-FAC's factored
CPU path, whose choice must survive the resume (it decides which steps capture their batch).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from ngexp.train.session import run_session
from ngexp.train.stop import RunInterrupted
from tests.helpers import TIMINGS, InterruptAfter, build_trainer, compose

#: 16 steps per epoch, 24 steps.
BASE = ("data=synthetic", "data.shape=[1,16,16]", "data.num_train=1024", "data.num_test=128",
        "model=mlp", "model.widths=[256]", "trainer.batch_size=64", "trainer.max_steps=24",
        "trainer.device=cpu", "trainer.progress=none", "trainer.log_every=4")
#: K-FAC with statistics every 4 steps and inverses every 8 (steps counted from 0).
KFAC = ("optimizer=kfac", "optimizer.cov_update_freq=4", "optimizer.inv_update_freq=8")


def final_checkpoint(folder: Path, overrides: tuple[str, ...], stop: int | None = None
                     ) -> dict[str, Any]:
    """Train in ``folder``; with ``stop``, interrupt after ``stop`` steps (checkpoint written
    as on SIGTERM) and resume in a new trainer. The final ``last.pt``."""
    folder.mkdir(parents=True)
    cfg = compose(*BASE, *overrides, f"output_root={folder}")
    if stop is not None:
        trainer = build_trainer(cfg, {"model": "mlp"}, folder)
        trainer.callbacks.append(InterruptAfter(stop))
        with pytest.raises(RunInterrupted):
            run_session(trainer)
    run_session(build_trainer(cfg, {"model": "mlp"}, folder))
    return torch.load(folder / "checkpoints" / "last.pt", weights_only=True)


def leaves(value: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """``(path, leaf)`` of nested dicts, lists and tuples."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield from leaves(item, f"{path}/{key}")
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            yield from leaves(item, f"{path}/{index}")
    else:
        yield path, value


#: The leaves of a checkpoint that are measured times: the training time, the metric window's
#: start on that clock, the timings of the last train/ record.
TIMED = ("/elapsed", "/window/started", *(f"/last_train/{name}" for name in TIMINGS))


def assert_identical(resumed: dict[str, Any], reference: dict[str, Any]) -> None:
    """Every tensor bitwise equal (dtype and shape included); every other leaf equal, but the
    measured times."""
    got, expected = dict(leaves(resumed)), dict(leaves(reference))
    assert got.keys() == expected.keys()
    tensors = 0
    for path, value in expected.items():
        if isinstance(value, torch.Tensor):
            tensors += 1
            assert value.dtype == got[path].dtype and torch.equal(value, got[path]), path
        elif path not in TIMED:
            assert got[path] == value, path
    assert tensors > 10


@pytest.fixture(scope="module")
def kfac_reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return final_checkpoint(tmp_path_factory.mktemp("kfac") / "reference", KFAC)


@pytest.mark.parametrize("stop", [
    4,   # right before a statistics step (steps 0-3 done, step 4 next)
    8,   # right before a statistics step that refreshes the inverses (step 8)
    9,   # right after an inverse refresh (step 8) and its statistics
    14,  # a step without statistics next
    16,  # an epoch boundary: the checkpoint a SIGKILL resumes from
])
def test_kfac_resumes_bit_identically(tmp_path: Path, kfac_reference: dict[str, Any],
                                      stop: int) -> None:
    resumed = final_checkpoint(tmp_path / "resumed", KFAC, stop)
    assert resumed["optimizer"]["preconditioner"]["cheaper"] == {"layers.0": True,
                                                                 "layers.2": False}
    assert_identical(resumed, kfac_reference)


@pytest.mark.parametrize("overrides", [
    ("optimizer=sgd",),
    ("optimizer=adam",),
    ("optimizer=rmsprop",),
    ("optimizer=nadamw",),
    ("optimizer=ekfac", "optimizer.cov_update_freq=4", "optimizer.inv_update_freq=8"),
    (*KFAC, "optimizer.damping_mode=eigen"),
    (*KFAC, "optimizer.fisher_type=empirical", "optimizer.damping_schedule=adaptive",
     "optimizer.adapt_interval=3"),
    (*KFAC, "optimizer.damping_schedule=exponential", "optimizer.damping_decay_steps=5"),
    ("optimizer=natural_gradient", "model.widths=[32]"),
    ("optimizer=shampoo",),
    ("optimizer=soap",),
    ("optimizer=muon",),
    ("optimizer=tonga",),
    ("optimizer=hessian_free", "optimizer.cg_iters=5", "model.widths=[32]"),
    ("prune=variational_bernoulli", "prune.fix_every=4"),
    ("prune=spike_and_slab", "prune.fix_every=4"),
    ("prune=gradual", "prune.start_step=4", "prune.end_step=20", "prune.frequency=6"),
    ("prune=iterative", "prune.target_sparsity=0.36", "trainer.max_steps=40"),
    (*KFAC, "prune=kfac", "prune.num_examples=128", "prune.batch_size=64", "prune.steps=2"),
], ids=lambda overrides: " ".join(overrides))
def test_every_optimizer_and_pruning_schedule_resumes_bit_identically(
        tmp_path: Path, overrides: tuple[str, ...]) -> None:
    reference = final_checkpoint(tmp_path / "reference", overrides)
    assert_identical(final_checkpoint(tmp_path / "resumed", overrides, 9), reference)
