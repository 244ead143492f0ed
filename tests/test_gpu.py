"""On a CUDA device (``make test-gpu``; skipped elsewhere): the training step under
``torch.cuda.set_sync_debug_mode("error")``, a GPU run killed and resumed, bf16 +
``channels_last`` + ``torch.compile`` with K-FAC and EKFAC, compiled = eager on the GPU, a
diverging Monte-Carlo K-FAC run that ends ``failed(nan ...)`` and leaves the device usable.
The data are synthetic (a GPU machine may have no data set)."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ngexp.cli import main
from tests.helpers import REPO, read_summary, run_dirs
from tests.step_path import SyncCounter, trainer_for, training_batches

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

#: LeNet-5 on 28x28 synthetic images, on the GPU.
LENET = ["model=lenet5", "data=synthetic", "data.shape=[1,28,28]", "data.num_train=2048",
         "data.num_test=256", "trainer.batch_size=64", "trainer.device=cuda",
         "trainer.progress=none"]
#: VGG-16 with batch norm at CIFAR shapes.
VGG = ["model=vgg16_bn", "data=synthetic", "data.num_train=1024", "data.num_test=256",
       "trainer.batch_size=64", "trainer.device=cuda", "trainer.progress=none"]
SCHEDULE = ["optimizer.cov_update_freq=2", "optimizer.inv_update_freq=3"]


@pytest.mark.parametrize("optimizer", [
    ["optimizer=sgd"], ["optimizer=adam"], ["optimizer=kfac", *SCHEDULE],
    ["optimizer=kfac", "optimizer.damping_schedule=adaptive", "optimizer.adapt_interval=2",
     *SCHEDULE],
    ["optimizer=ekfac", *SCHEDULE], ["optimizer=natural_gradient", "optimizer.cg_iters=3"],
    # rank 1 + 3 columns: the low-rank truncation (an eigh) on steps 3 and 6
    ["optimizer=tonga", "optimizer.rank=1", "optimizer.refresh_interval=3"],
], ids=["sgd", "adam", "kfac", "kfac-adaptive", "ekfac", "natural_gradient", "tonga"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_training_step_never_waits_for_the_device(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, optimizer: list[str],
        precision: str) -> None:
    """No synchronization on any step but a preconditioner's refresh (its decompositions
    report failure once), by CUDA's sync debug mode and by ngexp's own host reads."""
    trainer = trainer_for(tmp_path, *LENET, *optimizer, f"trainer.precision={precision}",
                        "trainer.channels_last=true", "trainer.log_every=1000")
    counter = SyncCounter(monkeypatch)
    batches = training_batches(trainer)
    preconditioned = any(f"optimizer={name}" in optimizer for name in ("kfac", "ekfac", "tonga"))
    trainer.train_step(*next(batches))  # first step: lazy CUDA initialization, first refresh
    for step in range(1, 8):
        refresh = preconditioned and step % 3 == 0
        batch = next(batches)
        torch.cuda.synchronize()
        with counter.counting() as calls:
            torch.cuda.set_sync_debug_mode("warn" if refresh else "error")
            try:
                trainer.train_step(*batch)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        if not refresh:
            assert dict(calls) == {}, f"step {step}"
    assert all(bool(p.isfinite().all()) for p in trainer.model.parameters())


def test_a_gpu_run_killed_mid_training_resumes_to_the_same_weights(tmp_path: Path) -> None:
    """SIGTERM during a CUDA run, then the same command: it resumes (RNG states and Adam's step
    counters back on the host) and ends with the uninterrupted run's weights."""
    common = [*LENET, "optimizer=adam", "trainer.epochs=6", "trainer.deterministic=true"]
    assert main(["train", *common, f"output_root={tmp_path / 'reference'}"]) == 0
    [reference] = run_dirs(tmp_path / "reference")
    command = [sys.executable, "-m", "ngexp", "train", *common,
               f"output_root={tmp_path / 'killed'}"]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while not list((tmp_path / "killed").rglob("last.pt")) and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=120)
    [killed] = run_dirs(tmp_path / "killed")
    assert read_summary(killed)["status"] == "interrupted"
    subprocess.run(command, cwd=REPO, check=True, capture_output=True, timeout=300)
    assert read_summary(killed)["status"] == "completed"
    ours = torch.load(killed / "checkpoints/last.pt", weights_only=True)["model"]
    theirs = torch.load(reference / "checkpoints/last.pt", weights_only=True)["model"]
    for name, value in theirs.items():
        assert torch.equal(ours[name], value), name


@pytest.mark.parametrize("optimizer", [["optimizer=kfac"], ["optimizer=ekfac"]])
def test_bf16_channels_last_compile_trains_vgg16(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                 optimizer: list[str]) -> None:
    """The fast path end to end: finite losses that go down on memorizable synthetic data."""
    rc = main(["train", *VGG, *optimizer, "trainer.precision=bf16",
               "trainer.channels_last=true", "trainer.compile=true", "trainer.epochs=3",
               "trainer.log_every=4", *SCHEDULE, f"output_root={tmp_path}"])
    capsys.readouterr()
    [run] = run_dirs(tmp_path)
    assert rc == 0, read_summary(run)
    records = map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
    losses = torch.tensor([m["train/loss"] for m in records if "train/loss" in m])
    assert bool(torch.isfinite(losses).all()) and losses[-1] < losses[0]


@pytest.mark.parametrize("optimizer", [["optimizer=sgd"], ["optimizer=kfac", *SCHEDULE]],
                         ids=["sgd", "kfac"])
def test_compiled_and_eager_training_give_the_same_weights_on_the_gpu(
        tmp_path: Path, optimizer: list[str]) -> None:
    weights = {}
    for compiled in (False, True):
        trainer = trainer_for(tmp_path / str(compiled), *LENET, *optimizer,
                            f"trainer.compile={str(compiled).lower()}", "trainer.log_every=1000",
                            "trainer.deterministic=true")
        batches = training_batches(trainer)
        for _ in range(5):
            trainer.train_step(*next(batches))
        weights[compiled] = trainer.model.state_dict()
    torch.use_deterministic_algorithms(False)
    for name, eager in weights[False].items():
        torch.testing.assert_close(weights[True][name], eager, rtol=1e-3, atol=1e-4)


def test_a_diverging_monte_carlo_kfac_run_fails_nan_and_the_device_stays_usable(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rc = main(["train", *LENET, "model=mlp", "optimizer=kfac", "optimizer.fisher_type=mc",
               "optimizer.cov_update_freq=1", "optimizer.lr=1e30", "optimizer.kl_clip=null",
               "trainer.epochs=1", f"output_root={tmp_path}"])
    capsys.readouterr()
    [run] = run_dirs(tmp_path)
    assert rc == 1 and re.fullmatch(r"nan at step \d+", read_summary(run)["reason"])
    assert float(torch.ones(3, device="cuda").sum()) == 3.0  # no device-side assert fired
