"""Faults and bad input: corrupted, truncated and malicious checkpoints, a full or read-only
disk, partial or binary run files, a concurrent ``force=true``, non-finite weights, and the bad
inputs users type. Each ends in a correct recovery or one ``ngexp: error:`` line, with nothing
already written lost."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from ngexp.cli import main
from ngexp.train import checkpoint
from tests.helpers import REPO, read_metrics, read_summary, requires_fashion_mnist, run_dirs

#: 8 steps per epoch, 3 epochs: checkpoints after steps 8 (kept as previous.pt later), 16, 24.
SHORT = ["data.subset=1024", "trainer.batch_size=128", "trainer.epochs=3",
         "trainer.log_every=4", "trainer.progress=none", "trainer.device=cpu"]
pytestmark = requires_fashion_mnist


def train(root: Path, capsys: pytest.CaptureFixture, *extra: str) -> tuple[int, str, str]:
    """``ngexp train SHORT extra`` in this process: (exit code, stdout, stderr)."""
    rc = main(["train", *SHORT, *extra, f"output_root={root}"])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def weights(run: Path, name: str = "last.pt") -> dict[str, torch.Tensor]:
    return torch.load(run / "checkpoints" / name, weights_only=True)["model"]


def mark_interrupted(run: Path) -> None:
    """Make a finished run look interrupted (as after SIGTERM), so the next command resumes."""
    summary = read_summary(run)
    summary["status"], summary["reason"] = "interrupted", "signal SIGTERM"
    (run / "summary.json").write_text(json.dumps(summary))


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("ngexp: error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    """The weights of the uninterrupted run."""
    root = tmp_path_factory.mktemp("reference")
    assert main(["train", *SHORT, f"output_root={root}"]) == 0
    [run] = run_dirs(root)
    return weights(run)


# ---------------------------------------------------------------------------- checkpoints
def corrupt(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "flipped":  # 64 bytes in the middle
        middle = len(data) // 2
        data[middle:middle + 64] = bytes(b ^ 0xFF for b in data[middle:middle + 64])
    elif how == "truncated":
        data = data[: len(data) // 3]
    else:
        data = bytearray()
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["flipped", "truncated", "empty"])
def test_corrupted_last_checkpoint_resumes_from_the_previous_one(
        how: str, tmp_path: Path, capsys: pytest.CaptureFixture,
        reference: dict[str, torch.Tensor]) -> None:
    assert train(tmp_path, capsys)[0] == 0
    [run] = run_dirs(tmp_path)
    mark_interrupted(run)
    corrupt(run / "checkpoints" / "last.pt", how)
    rc, out, _ = train(tmp_path, capsys)
    assert rc == 0
    assert "checkpoint last.pt: " in out and "moved to last.pt.corrupt-" in out
    assert "resuming from step 16 (previous.pt)" in out
    assert read_summary(run)["status"] == "completed"
    final = weights(run)
    assert all(torch.equal(final[key], reference[key]) for key in reference)
    kept = list((run / "checkpoints").glob("last.pt.corrupt-*"))
    assert len([p for p in kept if not p.name.endswith(".sha256")]) == 1  # kept for a look
    assert checkpoint.verify(run / "checkpoints" / "last.pt") is None


@pytest.mark.parametrize("optimizer", [["optimizer=tonga"],
                                       ["optimizer=hessian_free", "optimizer.cg_iters=5"]])
def test_second_order_state_resumes_from_the_previous_checkpoint_bit_identically(
        optimizer: list[str], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """TONGA's low-rank covariance and Hessian-free's damping and CG warm start travel in the
    checkpoint: resumed at step 16 (last.pt lost), the run ends with the weights of the
    uninterrupted one."""
    assert train(tmp_path / "reference", capsys, *optimizer)[0] == 0
    [reference_run] = run_dirs(tmp_path / "reference")
    assert train(tmp_path / "run", capsys, *optimizer)[0] == 0
    [run] = run_dirs(tmp_path / "run")
    mark_interrupted(run)
    corrupt(run / "checkpoints" / "last.pt", "empty")
    rc, out, _ = train(tmp_path / "run", capsys, *optimizer)
    assert rc == 0 and "resuming from step 16 (previous.pt)" in out
    final, expected = weights(run), weights(reference_run)
    assert all(torch.equal(final[key], expected[key]) for key in expected)


def test_both_checkpoints_corrupted_start_over(tmp_path: Path, capsys: pytest.CaptureFixture,
                                               reference: dict[str, torch.Tensor]) -> None:
    assert train(tmp_path, capsys)[0] == 0
    [run] = run_dirs(tmp_path)
    mark_interrupted(run)
    corrupt(run / "checkpoints" / "last.pt", "flipped")
    corrupt(run / "checkpoints" / "previous.pt", "truncated")
    rc, out, _ = train(tmp_path, capsys)
    assert rc == 0 and "no usable checkpoint left: starting over" in out
    final = weights(run)
    assert all(torch.equal(final[key], reference[key]) for key in reference)
    steps = [r["step"] for r in read_metrics(run) if "train/loss" in r]
    assert steps == sorted(set(steps)) and steps[0] == 4  # the old records were cleared


class Payload:
    """Unpickling this creates ``MARKER``: what a crafted checkpoint would run."""

    marker = ""

    def __reduce__(self):
        return (open, (self.marker, "w"))


def malicious_checkpoint(path: Path, marker: Path) -> None:
    Payload.marker = str(marker)
    torch.save({"model": {"weight": Payload()}, "step": 0}, path)
    digest = checkpoint.sha256_of(path)  # the attacker records a matching digest too
    checkpoint.digest_path(path).write_text(f"{digest}  {path.name}\n")


def test_malicious_checkpoint_never_runs(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    marker = tmp_path / "marker"
    evil = tmp_path / "evil.pt"
    malicious_checkpoint(evil, marker)
    rc, _, err = train(tmp_path / "runs", capsys, f"init_from={evil}")
    assert rc == 2 and "would run code when loaded" in one_error_line(err)
    assert not marker.exists()

    assert train(tmp_path / "runs", capsys)[0] == 0  # a run whose last.pt gets replaced
    [run] = run_dirs(tmp_path / "runs")
    mark_interrupted(run)
    malicious_checkpoint(run / "checkpoints" / "last.pt", marker)
    rc, out, _ = train(tmp_path / "runs", capsys)
    assert rc == 0 and "would run code when loaded" in out
    assert "resuming from step 16 (previous.pt)" in out
    assert not marker.exists()


# ---------------------------------------------------------------------------- the disk
def mount_tmpfs(path: Path, options: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                          capture_output=True).returncode == 0


@pytest.fixture
def small_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Path, object]]:
    """A 1 MB file system (a tmpfs where this runs as root), else checkpoint writes patched to
    fail as a full disk does; yields the folder and a function that fixes the cause."""
    folder = tmp_path / "disk"
    if os.geteuid() == 0 and mount_tmpfs(folder, "size=1m"):
        def grow() -> None:
            subprocess.run(["mount", "-o", "remount,size=64m", str(folder)], check=True)

        yield folder, grow
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)
        return
    real = checkpoint._write_synced

    def full(path: Path, data: bytes) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "_write_synced", full)
    yield folder, lambda: monkeypatch.setattr(checkpoint, "_write_synced", real)


def test_full_disk_is_a_failed_io_run_that_resumes_once_fixed(
        small_disk: tuple[Path, object], capsys: pytest.CaptureFixture,
        reference: dict[str, torch.Tensor]) -> None:
    folder, fix = small_disk
    rc, _, err = train(folder, capsys)
    assert rc == 1 and "No space left on device" in one_error_line(err)
    [run] = run_dirs(folder)
    summary = read_summary(run)
    assert summary["status"] == "failed" and summary["reason"].startswith("io: No space left")
    assert not [p for p in run.rglob("*") if p.name.endswith(".tmp")]  # no temporary left
    fix()  # type: ignore[operator]
    rc, _, _ = train(folder, capsys)
    assert rc == 0 and read_summary(run)["status"] == "completed"
    final = weights(run)
    assert all(torch.equal(final[key], reference[key]) for key in reference)


def test_read_only_or_file_output_root_is_one_line(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    a_file = tmp_path / "notes.txt"
    a_file.write_text("not a folder")
    rc, _, err = train(a_file, capsys)
    assert rc == 2 and "cannot create" in one_error_line(err)
    read_only = tmp_path / "ro"
    if os.geteuid() == 0 and mount_tmpfs(read_only, "size=1m,ro"):
        try:
            rc, _, err = train(read_only, capsys)
            assert rc == 2 and "Read-only file system" in one_error_line(err)
        finally:
            subprocess.run(["umount", "-l", str(read_only)], capture_output=True)
    assert a_file.read_text() == "not a folder"


def test_files_are_readable_by_the_group(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    previous = os.umask(0o022)
    try:
        assert train(tmp_path, capsys, "trainer.epochs=1")[0] == 0
    finally:
        os.umask(previous)
    [run] = run_dirs(tmp_path)
    modes = {path.relative_to(run).as_posix(): stat.S_IMODE(path.stat().st_mode)
             for path in run.rglob("*") if path.is_file()}
    assert {"config.yaml", "summary.json", "metrics.jsonl", "checkpoints/last.pt"} <= set(modes)
    assert all(mode == 0o644 for mode in modes.values()), modes


# ---------------------------------------------------------------------------- run files
def test_partial_metrics_line_and_binary_summary_still_resume(
        tmp_path: Path, capsys: pytest.CaptureFixture,
        reference: dict[str, torch.Tensor]) -> None:
    assert train(tmp_path, capsys)[0] == 0
    [run] = run_dirs(tmp_path)
    records = read_metrics(run)
    with (run / "metrics.jsonl").open("a") as stream:
        stream.write('{"step": 25, "train/lo')  # a crash mid-write
    (run / "summary.json").write_bytes(b"\x89\xff\x00binary")
    os.remove(run / "checkpoints" / "last.pt")  # resume from step 16
    rc, out, _ = train(tmp_path, capsys)
    assert rc == 0 and "resuming from step 16 (previous.pt)" in out
    final = weights(run)
    assert all(torch.equal(final[key], reference[key]) for key in reference)
    def numbers(rows: list[dict]) -> list[tuple]:  # timings differ between sessions
        return [(r["step"], r.get("train/loss"), r.get("test/acc")) for r in rows]

    assert numbers(read_metrics(run)) == numbers(records)  # every line whole, no duplicate


def test_force_never_renames_a_live_run(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    args = [*SHORT, "trainer.epochs=100", "trainer.checkpoint_every=100"]
    live = subprocess.Popen([sys.executable, "-m", "ngexp", "train", *args,
                             f"output_root={tmp_path}"], cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not list(tmp_path.rglob("metrics.jsonl")):
            time.sleep(0.1)
        [run] = [path.parent for path in tmp_path.rglob("metrics.jsonl")]
        rc = main(["train", *args, "force=true", f"output_root={tmp_path}"])
        out = capsys.readouterr().out
        assert rc == 0 and "another process is running this config" in out
        assert run.is_dir() and not list(tmp_path.rglob("*.replaced-*"))
        assert live.poll() is None  # still training, undisturbed
    finally:
        live.send_signal(signal.SIGTERM)
        live.communicate(timeout=60)
    assert live.returncode == 130 and read_summary(run)["status"] == "interrupted"


def test_non_finite_weights_are_never_checkpointed(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    """An lr that overflows the outputs: the run fails as nan and every checkpoint it wrote is
    finite; and a save of non-finite weights (what an lr overflowing the weights leads to) is
    refused without writing anything."""
    rc, _, _ = train(tmp_path, capsys, "data.subset=128", "optimizer.lr=1e38",
                     "optimizer.momentum=0")  # one step per epoch
    [run] = run_dirs(tmp_path)
    summary = read_summary(run)
    assert rc == 1 and summary["status"] == "failed" and summary["reason"].startswith("nan")
    for path in (run / "checkpoints").glob("*.pt"):
        state = torch.load(path, weights_only=True)
        assert checkpoint.all_finite([state["model"], state["optimizer"]]), path

    from tests.helpers import build_trainer, compose

    cfg = compose(*SHORT, f"output_root={tmp_path / 'unit'}")
    trainer = build_trainer(cfg, {"model": "mlp"}, tmp_path / "unit")
    with torch.no_grad():
        next(trainer.model.parameters())[0, 0] = float("inf")
    with pytest.raises(FloatingPointError, match="nan at step 0 .non-finite weights"):
        trainer.checkpoints.save("last.pt", trainer.state_dict())
    assert not (tmp_path / "unit").exists()


# ---------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(("overrides", "expected"), [
    (["model=lenet5", "data=row_fashion_mnist"], "model=lenet5 does not fit data="),
    (["model=resnet20", "data=row_fashion_mnist"], "data sets that fit: cifar10"),
    (["model=lenet5", "data=text", "data.path=README.md"], "LeNet-5 needs image data"),
    (["model=autoencoder", "data=text", "data.path=README.md"], "has token ids of shape"),
    (["model=gpt"], "model=gpt does not fit data=fashion_mnist: the GPT needs tokens data"),
    (["model=vit", "data=text", "data.path=README.md"], "the ViT needs image data, but data "),
    (["data.val_size=70000"], "data.val_size=70000 is invalid: expected fewer than the 60000"),
    (["optimizer.lr=inf"], "optimizer.lr=inf is invalid: expected a finite number > 0"),
    (["optimizer=kfac", "optimizer.damping=nan"], "optimizer.damping=nan is invalid"),
    (["optimizer=tonga", "optimizer.rank=0"], "optimizer.rank=0 is invalid"),
    (["optimizer=hessian_free", "optimizer.damping_max=0.5"],
     "optimizer.damping_max=0.5 is invalid: expected a finite number >= damping=1.0"),
    (["+trainer.epoch=3"], "trainer.epoch: 'epoch' is not a key of trainer; valid keys: epochs"),
    (["+foo=1"], "foo: 'foo' is not a key of the run config"),
    (["init_from=README.md"], "README.md is not a PyTorch checkpoint"),
    (["prune=variational_bernoulli", "prune.fix_below=0.7"],
     "prune.fix_below=0.7 is invalid: expected a number in [0, 0.5)"),
    (["prune=spike_and_slab", "prune.layer_prior_pi=[0.3]"],
     "prune.layer_prior_pi=[0.3] has 1 values but the model has 2 gated layers"),
])
def test_bad_input_is_one_line(overrides: list[str], expected: str, tmp_path: Path,
                               capsys: pytest.CaptureFixture) -> None:
    rc, _, err = train(tmp_path, capsys, *overrides)
    assert rc == 2 and expected in one_error_line(err)
    assert not list(tmp_path.rglob("*"))  # nothing written


def test_init_from_another_architecture_is_one_line(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    assert train(tmp_path / "lenet", capsys, "model=lenet5", "trainer.epochs=1")[0] == 0
    [run] = run_dirs(tmp_path / "lenet")
    rc, _, err = train(tmp_path / "mlp", capsys, f"init_from={run}")
    line = one_error_line(err)
    assert rc == 2 and "holds weights of another architecture" in line and "missing" in line
    shutil.rmtree(tmp_path / "lenet")
