"""End to end: ``ngexp train`` as a subprocess on real Fashion-MNIST."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from tests.helpers import (
    REPO,
    THREADS,
    ngexp,
    read_metrics,
    read_summary,
    requires_fashion_mnist,
    run_dirs,
)

pytestmark = requires_fashion_mnist
SHORT = ("data.subset=6000", "trainer.log_every=20", "trainer.progress=plain")


def test_short_run_learns_and_writes_run_directory(tmp_path: Path) -> None:
    result = ngexp("train", "trainer.max_steps=200", "trainer.log_every=50",
                   f"output_root={tmp_path}")
    [run] = run_dirs(tmp_path)
    assert str(run) in result.stdout.replace("\n", "")  # the run directory is printed
    assert run.relative_to(tmp_path).parts[0] == "fashion_mnist-mlp-sgd"
    assert run.name == "seed_0"
    summary = read_summary(run)
    assert summary["status"] == "completed" and summary["step"] == 200
    assert summary["final"]["test/acc"] > 0.75  # chance is 0.10
    assert summary["choices"]["optimizer"] == "sgd" and summary["versions"]["torch"]
    records = read_metrics(run)
    assert [r["step"] for r in records if "train/loss" in r] == [50, 100, 150, 200]
    assert all({"step", "epoch", "time"} <= set(r) for r in records)
    train_losses = [r["train/loss"] for r in records if "train/loss" in r]
    assert train_losses[-1] < train_losses[0]
    assert {"optim/lr", "optim/grad_norm", "train/examples_per_s"} <= set(records[0])
    assert (run / "config.yaml").is_file() and (run / "checkpoints" / "last.pt").is_file()
    assert (run / "checkpoints" / "best.pt").is_file()
    assert list((run / "tb").glob("events.out.tfevents.*"))

    again = ngexp("train", "trainer.max_steps=200", "trainer.log_every=50",
                  f"output_root={tmp_path}")
    assert "skipping" in again.stdout and "completed" in again.stdout
    assert read_metrics(run) == records


def test_kill_and_resume_ends_with_identical_weights(tmp_path: Path) -> None:
    args = ["train", *SHORT, "trainer.max_steps=240", "trainer.epochs=6", "trainer.log_every=5",
            "optimizer=adam"]
    reference = tmp_path / "reference"
    ngexp(*args, f"output_root={reference}")

    interrupted = tmp_path / "interrupted"
    process = subprocess.Popen([sys.executable, "-m", "ngexp", *args,
                                f"output_root={interrupted}"], cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin",
                                    "OMP_NUM_THREADS": THREADS})
    metrics = None
    deadline = time.time() + 120
    while time.time() < deadline:
        found = list(interrupted.rglob("metrics.jsonl"))
        if found and found[0].read_text().count("\n") >= 6:  # well inside the first epochs
            metrics = found[0]
            break
        time.sleep(0.05)
    assert metrics is not None, process.communicate()
    process.send_signal(signal.SIGTERM)
    process.communicate(timeout=60)
    assert process.returncode == 130
    [run] = run_dirs(interrupted)
    summary = read_summary(run)
    assert summary["status"] == "interrupted" and 0 < summary["step"] < 240
    assert (run / "checkpoints" / "last.pt").is_file()

    resumed = ngexp(*args, f"output_root={interrupted}")
    assert f"resuming from step {summary['step']}" in resumed.stdout
    assert read_summary(run)["status"] == "completed"
    [ref_run] = run_dirs(reference)
    final = torch.load(run / "checkpoints" / "last.pt", weights_only=False)["model"]
    expected = torch.load(ref_run / "checkpoints" / "last.pt", weights_only=False)["model"]
    assert final.keys() == expected.keys()
    for key in expected:
        assert torch.equal(final[key], expected[key]), key
    steps = [r["step"] for r in read_metrics(run) if "train/loss" in r]
    assert steps == sorted(set(steps))  # no duplicated records after the resume


def test_multirun_gives_one_run_directory_per_job(tmp_path: Path) -> None:
    ngexp("train", "-m", "optimizer=sgd,rmsprop", "seed=0,1", *SHORT,
          "trainer.max_steps=10", f"output_root={tmp_path}")
    runs = run_dirs(tmp_path)
    assert len(runs) == 4
    assert {(read_summary(r)["choices"]["optimizer"], read_summary(r)["seed"]) for r in runs} \
        == {("sgd", 0), ("sgd", 1), ("rmsprop", 0), ("rmsprop", 1)}
    pointers = sorted((tmp_path / "sweeps").rglob("run_dir.txt"))
    assert {Path(p.read_text().strip()) for p in pointers} == {r.resolve() for r in runs}
    # relaunched, every job skips its finished run and still points to it
    again = ngexp("train", "-m", "optimizer=sgd,rmsprop", "seed=0,1", *SHORT,
                  "trainer.max_steps=10", f"output_root={tmp_path}",
                  f"hydra.sweep.dir={tmp_path / 'again'}")
    assert again.stdout.count("skipping") == 4
    pointers = sorted((tmp_path / "again").rglob("run_dir.txt"))
    assert {Path(p.read_text().strip()) for p in pointers} == {r.resolve() for r in runs}


def test_divergence_stops_as_failed_nan(tmp_path: Path) -> None:
    result = ngexp("train", *SHORT, "trainer.max_steps=100", "optimizer.lr=1e6",
                   "lr_schedule=constant", f"output_root={tmp_path}", check=False)
    assert result.returncode == 1
    [run] = run_dirs(tmp_path)
    summary = read_summary(run)
    assert summary["status"] == "failed" and summary["reason"].startswith("nan at step ")
    assert int(summary["reason"].split()[-1]) <= 100
    again = ngexp("train", *SHORT, "trainer.max_steps=100", "optimizer.lr=1e6",
                  "lr_schedule=constant", f"output_root={tmp_path}")
    assert "skipping" in again.stdout  # deterministic divergence is not retried


def test_init_from_and_validation_split(tmp_path: Path) -> None:
    ngexp("train", *SHORT, "trainer.max_steps=60", f"output_root={tmp_path / 'a'}")
    [source] = run_dirs(tmp_path / "a")
    ngexp("train", *SHORT, "trainer.max_steps=1", "optimizer.lr=1e-9", "data.val_size=1000",
          f"init_from={source}", f"output_root={tmp_path / 'b'}")
    [run] = run_dirs(tmp_path / "b")
    final = read_summary(run)["final"]
    assert {"val/acc", "val/loss", "test/acc"} <= set(final)
    assert abs(final["test/acc"] - read_summary(source)["final"]["test/acc"]) < 0.02
    assert json.loads((run / "summary.json").read_text())["status"] == "completed"


def test_sweep_over_a_group_applies_its_keys_in_every_job(tmp_path: Path) -> None:
    ngexp("train", "-m", "prune=magnitude,random", "prune.target_sparsity=0.5",
          "prune.finetune_epochs=1", "trainer.epochs=1", "data.subset=1280",
          "trainer.batch_size=128", f"output_root={tmp_path}")
    runs = run_dirs(tmp_path)
    assert {read_summary(r)["choices"]["prune"] for r in runs} == {"magnitude", "random"}
    for run in runs:
        assert abs(read_summary(run)["final"]["prune/sparsity"] - 0.5) < 1e-3
