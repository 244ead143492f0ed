"""Data-parallel training on CPU (gloo, 2 processes) against one process on the union batch:
DDP + SGD, distributed K-FAC / EKFAC for grad_worker_fraction 1/2 and 1 (factors,
preconditioned gradients, weights), the natural gradient's all-reduced products, pruning masks;
then the CLI: ``trainer.devices=2`` and ``torchrun`` runs, kill -9 and resume, the run hash and
the summary, bad settings."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import Tensor

from ngexp.cli import main
from ngexp.distributed.world import World
from ngexp.train.checkpoint import digest_path
from ngexp.train.rundir import config_hash
from tests import distributed_worker
from tests.helpers import (
    REPO,
    compose,
    read_metrics,
    read_summary,
    requires_fashion_mnist,
    run_dirs,
)

#: Tolerance of "equal up to the order of floating-point sums" after 10 steps (float32).
TOL = 1e-6
#: EKFAC's: its scaling is measured in eigenbases of nearly degenerate factors, which a change
#: of summation order rotates; in one process, swapping the two halves of each batch moves the
#: weights by 2e-5 after these 10 steps (K-FAC: 6e-8).
EKFAC_TOL = 1e-4


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Tensor]]]:
    """Every scenario of :mod:`tests.distributed_worker`: ``[single process, rank 0, rank 1]``."""
    folder = tmp_path_factory.mktemp("ranks")
    mp.spawn(distributed_worker.run_rank, args=(str(folder), free_port()),
             nprocs=distributed_worker.WORLD)
    ranks = [torch.load(folder / f"rank_{r}.pt", weights_only=True)
             for r in range(distributed_worker.WORLD)]
    single = distributed_worker.run_all(World())
    return {name: [single[name], *(rank[name] for rank in ranks)] for name in single}


def assert_close(ours: dict[str, Tensor], theirs: dict[str, Tensor], prefix: str,
                 tol: float = TOL) -> None:
    keys = [key for key in theirs if key.startswith(prefix)]
    assert keys and keys == [key for key in ours if key.startswith(prefix)]
    for key in keys:
        error = float((ours[key] - theirs[key]).abs().max())
        scale = float(theirs[key].abs().max())
        assert error <= tol * max(1.0, scale), f"{key}: {error:.3g} (scale {scale:.3g})"


def test_ddp_sgd_equals_one_process_on_the_union_batch(results: dict) -> None:
    single, *ranks = results["sgd"]
    for rank in ranks:
        assert_close(rank, single, "weight.")
    assert not torch.equal(single["weight.7.weight"], distributed_worker.net()[7].weight)


@pytest.mark.parametrize("scenario", ["kfac_1", "kfac_half", "kfac_eigen_half", "ekfac_1",
                                      "ekfac_half", "kfac_half_resumed"])
def test_distributed_kronecker_equals_one_process(results: dict, scenario: str) -> None:
    """Factors (EKFAC: and its scaling), the last step's preconditioned gradients and the
    weights after 10 steps, on both ranks; ``_resumed``: rebuilt from state dicts at step 4."""
    single, *ranks = results[scenario]
    assert {key.split(".")[0] for key in single} >= {"A", "G", "grad", "weight"}
    tol = EKFAC_TOL if scenario.startswith("ekfac") else TOL
    for rank in ranks:
        for prefix in ("A.", "G.", "s.", "grad.", "weight."):
            if any(key.startswith(prefix) for key in single):
                assert_close(rank, single, prefix, tol)
    sgd = results["sgd"][0]  # preconditioning changed the trajectory
    assert float((single["weight.5.weight"] - sgd["weight.5.weight"]).abs().max()) > 1e-3


def test_resumed_distributed_kfac_continues_the_same_run(results: dict) -> None:
    """A state dict with every rank's terms (grad_worker_fraction 1/2 keeps each layer's on
    one rank) restores the run: the weights equal the uninterrupted run's."""
    for ours, theirs in zip(results["kfac_half_resumed"], results["kfac_half"], strict=True):
        assert_close(ours, theirs, "weight.")


@pytest.mark.parametrize("scenario", ["natural_gradient", "hessian_free", "tonga"])
def test_cg_and_tonga_steps_equal_one_process(results: dict, scenario: str) -> None:
    """Every rank equals one process on the union batch: the natural gradient's and
    Hessian-free's products, losses and CG preconditioner are all-reduced; TONGA needs nothing
    (the gradients it keeps are already the ranks' mean)."""
    single, *ranks = results[scenario]
    for rank in ranks:
        assert_close(rank, single, "weight.")
        assert_close(rank, single, "grad.")


@pytest.mark.parametrize("scenario", ["masks_obd", "masks_kfac_empirical", "masks_kfac_mc"])
def test_pruning_masks_agree_on_every_rank(results: dict, scenario: str) -> None:
    """Equal on both ranks; equal to one process's except with Monte-Carlo targets (each rank
    draws its own, ngexp/prune/pruner.py)."""
    single, first, second = results[scenario]
    for key in single:
        assert torch.equal(first[key], second[key]), key
        if scenario != "masks_kfac_mc":
            assert torch.equal(first[key], single[key]), key
    kept = sum(int(m.sum()) for m in single.values()) / sum(m.numel() for m in single.values())
    assert kept == pytest.approx(0.5, abs=0.01)


# --------------------------------------------------------------------------- the CLI
SHORT = ["model=mlp", "data.subset=1024", "trainer.epochs=10", "trainer.log_every=4",
         "trainer.progress=none", "trainer.device=cpu", "logger=[]"]


def cli(*args: str, devices: int = 1, torchrun: bool = False,
        **popen: object) -> subprocess.Popen[str]:
    """``ngexp train ARGS`` as a subprocess (``torchrun`` or ``trainer.devices``), one torch
    thread per process, in its own session (so kill -9 reaches every process)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "NO_COLOR": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "ngexp", "train", *args]
    if torchrun:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc-per-node={devices}", "-m", "ngexp", "train", *args]
    elif devices > 1:
        command.append(f"trainer.devices={devices}")
    return subprocess.Popen(command, cwd=REPO, env=env, text=True, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen)


def descendants(pid: int) -> list[int]:
    """The processes ``pid`` started, recursively (Linux ``/proc``): torchrun's workers run
    in sessions of their own, out of reach of a signal to its process group."""
    children = Path(f"/proc/{pid}/task/{pid}/children")
    found = [int(child) for child in children.read_text().split()] if children.exists() else []
    return [grand for child in found for grand in (child, *descendants(child))]


def finish(process: subprocess.Popen[str], timeout: float = 240) -> str:
    out, err = process.communicate(timeout=timeout)
    assert process.returncode == 0, f"exit {process.returncode}\n{out}\n{err}"
    return out


def last_weights(run: Path) -> dict[str, Tensor]:
    return torch.load(run / "checkpoints" / "last.pt", weights_only=True)["model"]


@requires_fashion_mnist
def test_cli_two_processes_killed_and_resumed_equal_one_on_the_union_batch(
        tmp_path: Path) -> None:
    """``torchrun`` with 2 processes of batch B, killed with -9 (launcher and ranks) after its
    first checkpoint, then ``trainer.devices=2`` on the same command: it resumes and ends (SGD
    with momentum, 80 steps) with the weights of one process with batch 2B, the uninterrupted
    run, in the same run directory relative to the output root; the summary records the
    world. A copy of the killed run resumed by one process with batch 2B (another world size,
    the same global batch) ends there too."""
    common = [*SHORT, "optimizer=sgd"]
    one = cli(*common, "trainer.batch_size=128", f"output_root={tmp_path / 'one'}")
    killed = cli(*common, "trainer.batch_size=64", f"output_root={tmp_path / 'two'}",
                 devices=2, torchrun=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and not any(  # last.pt and its digest written
            digest_path(path).exists() for path in (tmp_path / "two").rglob("last.pt")):
        time.sleep(0.01)
    for pid in (killed.pid, *descendants(killed.pid)):  # the launcher and both ranks
        os.kill(pid, signal.SIGKILL)
    killed.communicate(timeout=60)
    [two_run] = run_dirs(tmp_path / "two")
    assert read_summary(two_run)["status"] == "running"  # killed: nobody wrote the end
    saved = torch.load(two_run / "checkpoints" / "last.pt", weights_only=True)["step"]
    assert 0 < saved < 80
    shutil.copytree(tmp_path / "two", tmp_path / "other")

    out = finish(cli(*common, "trainer.batch_size=64", f"output_root={tmp_path / 'two'}",
                     devices=2))
    assert f"resuming from step {saved}" in out and out.count("resuming") == 1, out  # rank 0
    alone = finish(cli(*common, "trainer.batch_size=128", f"output_root={tmp_path / 'other'}"))
    assert f"resuming from step {saved}" in alone, alone
    finish(one)
    [one_run] = run_dirs(tmp_path / "one")
    assert two_run.relative_to(tmp_path / "two") == one_run.relative_to(tmp_path / "one")
    summary, single = read_summary(two_run), read_summary(one_run)
    assert summary["status"] == "completed"
    assert (summary["world_size"], summary["global_batch_size"], summary["step"]) == (2, 128, 80)
    assert (single["world_size"], single["global_batch_size"]) == (1, 128)
    assert summary["final"]["test/acc"] == pytest.approx(single["final"]["test/acc"], abs=1e-3)
    steps = [r["step"] for r in read_metrics(two_run) if "train/loss" in r]
    assert steps == list(range(4, 81, 4))  # rank 0's records, none repeated by the resume
    [other_run] = run_dirs(tmp_path / "other")
    assert read_summary(other_run)["world_size"] == 1
    theirs = last_weights(one_run)
    for ours in (last_weights(two_run), last_weights(other_run)):
        assert ours.keys() == theirs.keys()
        for key, value in theirs.items():
            assert float((ours[key] - value).abs().max()) <= TOL, key


def test_run_hash_ignores_the_world_size_only_for_the_same_global_batch() -> None:
    two = compose("trainer.batch_size=64", "trainer.devices=2")
    one = compose("trainer.batch_size=128")
    assert config_hash(two, 2) == config_hash(one, 1)
    assert config_hash(two, 1) != config_hash(one, 1)  # 1 x 64 is another global batch
    assert config_hash(compose("trainer.batch_size=64"), 4) != config_hash(one, 1)
    kfac = compose("optimizer=kfac")
    assert config_hash(kfac) == config_hash(compose("optimizer=kfac",
                                                    "optimizer.grad_worker_fraction=0.5"))


@pytest.mark.parametrize(("overrides", "expected"), [
    (["optimizer=kfac", "optimizer.grad_worker_fraction=0.75", "trainer.devices=2"],
     "optimizer.grad_worker_fraction=0.75 is invalid: expected k/2"),
    (["optimizer=ekfac", "optimizer.grad_worker_fraction=0", "trainer.devices=2"],
     "grad_worker_fraction=0"),
    (["trainer.sync_bn=true", "trainer.devices=2", "trainer.device=cpu"],
     "trainer.sync_bn=True is invalid"),
    (["trainer.devices=0"], "trainer.devices=0 is invalid"),
])
def test_bad_distributed_settings_are_one_line(overrides: list[str], expected: str,
                                               tmp_path: Path,
                                               capsys: pytest.CaptureFixture) -> None:
    assert main(["train", *overrides, *SHORT, "trainer.max_steps=1",
                 f"output_root={tmp_path}"]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("ngexp: error: "), err
    assert expected in lines[0], lines[0]
    assert not list(tmp_path.iterdir())
