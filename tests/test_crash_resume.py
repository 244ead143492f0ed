"""Nothing lost after a crash: a run killed (SIGKILL) or stopped (SIGTERM) at an exact step (a
forked child that signals itself there) and launched again ends with the ``metrics.jsonl`` of
the uninterrupted run (timings aside: every other value equal, no step twice) and its final
weights, bit for bit on the CPU -- whether it resumes from an epoch's ``last.pt``, from one of
the step or time cadence in the middle of an epoch, with a partial metric window, or starts
over because only a ``best.pt`` was written (the earlier outputs set aside, never appended to).
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from ngexp.cli import main
from ngexp.distributed.world import World
from ngexp.train import checkpoint, ranks
from ngexp.train.trainer import Trainer
from tests.helpers import TIMINGS, read_metrics, read_summary, run_dirs

#: 16 steps per epoch, 32 steps; train/ records every 3 steps (and at each epoch's end), an
#: evaluation (and a best.pt) every 5 steps: a best.pt at step 5, the first last.pt at 16.
BASE = ("data=synthetic", "data.shape=[1,8,8]", "data.num_train=512", "data.num_test=128",
        "model=mlp", "model.widths=[32]", "trainer.batch_size=32", "trainer.epochs=2",
        "trainer.log_every=3", "trainer.eval_every=5", "trainer.progress=none",
        "trainer.device=cpu")


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """Every run of the module on one thread, the killed children's too: the sums of a
    reduction (the gradient norm) are the same only for the same number of threads, and a
    forked child uses OpenMP safely only on one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def values(run: Path) -> list[dict[str, Any]]:
    """``metrics.jsonl`` without its timings."""
    return [{k: v for k, v in record.items() if k not in TIMINGS} for record in read_metrics(run)]


def weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "checkpoints" / "last.pt", weights_only=True)["model"]


def relaunch(root: Path, capsys: pytest.CaptureFixture, *extra: str) -> tuple[Path, str]:
    """``ngexp train`` of the run again, in this process: its directory and its output."""
    assert main(["train", *BASE, *extra, f"output_root={root}"]) == 0
    [run] = run_dirs(root)
    return run, capsys.readouterr().out


def signal_after(step: int, signum: int) -> None:
    """Make :meth:`Trainer.train_step` send ``signum`` to this process right after step
    ``step`` (before that step's records, evaluation and checkpoint)."""
    train_step = Trainer.train_step

    def patched(self: Trainer, *args: Any) -> None:
        train_step(self, *args)
        if self.step == step:
            os.kill(os.getpid(), signum)

    Trainer.train_step = patched  # type: ignore[method-assign]


def crash(root: Path, signum: int, step: int, *extra: str) -> Path:
    """The run in a child process that sends itself ``signum`` right after step ``step``: its
    directory. The child is forked from this one (no second import of torch and ngexp: a
    second instead of ten)."""
    log = root.with_suffix(".log")
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 70
        with log.open("w") as stream:
            try:
                os.dup2(stream.fileno(), 1)
                os.dup2(stream.fileno(), 2)
                sys.stdout = sys.stderr = stream
                signal_after(step, signum)
                code = main(["train", *BASE, *extra, f"output_root={root}"])
            except BaseException:  # noqa: BLE001  (reported in the log, read by the parent)
                traceback.print_exc()
            finally:
                stream.flush()
                os._exit(code)
    deadline = time.monotonic() + 300
    while (status := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    if status[0] == 0:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    expected = -signal.SIGKILL if signum == signal.SIGKILL else 130
    assert status[0] == pid and os.waitstatus_to_exitcode(status[1]) == expected, \
        log.read_text()
    [run] = [path.parent for path in root.rglob("config.yaml") if path.parent.name == "seed_0"]
    return run


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict[str, Any]],
                                                                  dict[str, torch.Tensor]]:
    """The uninterrupted run's metrics (without timings) and final weights."""
    root = tmp_path_factory.mktemp("reference")
    assert main(["train", *BASE, f"output_root={root}"]) == 0
    [run] = run_dirs(root)
    return values(run), weights(run)


def assert_as_uninterrupted(run: Path, reference: tuple[list[dict[str, Any]],
                                                        dict[str, torch.Tensor]]) -> None:
    records, final = reference
    assert values(run) == records
    assert read_summary(run)["status"] == "completed"
    got = weights(run)
    assert got.keys() == final.keys() and all(torch.equal(got[k], final[k]) for k in final)


def test_killed_before_its_first_last_pt_starts_over_with_the_old_outputs_set_aside(
        tmp_path: Path, capsys: pytest.CaptureFixture, reference: Any) -> None:
    run = crash(tmp_path, signal.SIGKILL, 7)
    assert (run / "checkpoints" / "best.pt").is_file()
    assert not (run / "checkpoints" / "last.pt").exists()
    assert [r["step"] for r in read_metrics(run)] == [3, 5, 6]
    before = (run / "metrics.jsonl").read_text()
    run, out = relaunch(tmp_path, capsys)
    assert "no last.pt or previous.pt to resume from: starting over (metrics.jsonl, tb, " \
           "train.log, summary.json, checkpoints moved to <name>.restarted-" in out, out
    assert "resuming" not in out
    assert_as_uninterrupted(run, reference)
    [old] = run.glob("metrics.jsonl.restarted-*")  # kept as it was, not appended to
    assert old.read_text() == before
    [best] = run.glob("checkpoints.restarted-*/best.pt")
    assert checkpoint.verify(best) is None
    assert "starting over" in (run / "train.log").read_text()


@pytest.mark.parametrize(("kill", "extra", "resumed"), [
    (20, (), 16),  # after the first epoch's last.pt
    (10, ("trainer.checkpoint_every_steps=4",), 8),  # mid-epoch, a window of 7-8 open
    (11, ("trainer.checkpoint_every_minutes=1e-6",), 10),  # after every step: 10 % 3 = 1
], ids=["epoch", "steps", "minutes"])
def test_killed_after_a_checkpoint_resumes_from_it_as_if_uninterrupted(
        kill: int, extra: tuple[str, ...], resumed: int, tmp_path: Path,
        capsys: pytest.CaptureFixture, reference: Any) -> None:
    run = crash(tmp_path, signal.SIGKILL, kill, *extra)
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["step"] == resumed
    run, out = relaunch(tmp_path, capsys, *extra)
    assert f"resuming from step {resumed}\n" in out and "starting over" not in out, out
    assert_as_uninterrupted(run, reference)
    assert not list(run.glob("*.restarted-*"))


@pytest.fixture(scope="module")
def stopped(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The output root of the run stopped by SIGTERM after step 20 (a test copies it)."""
    root = tmp_path_factory.mktemp("stopped")
    crash(root, signal.SIGTERM, 20)
    return root


def copy_of(root: Path, tmp_path: Path) -> Path:
    shutil.copytree(root, tmp_path / "runs")
    [run] = run_dirs(tmp_path / "runs")
    return run


def test_sigterm_between_two_records_resumes_the_metric_window(
        stopped: Path, tmp_path: Path, capsys: pytest.CaptureFixture, reference: Any) -> None:
    """Stopped after step 20 (records at 18 and 21): the resumed run's record at 21 averages
    steps 19-21 as the uninterrupted run's does, from the window in the checkpoint."""
    run = copy_of(stopped, tmp_path)
    assert read_summary(run)["status"] == "interrupted"
    window = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["window"]
    assert window["steps"] == 2 and len(window["rows"]) == 2
    run, out = relaunch(tmp_path / "runs", capsys)
    assert "resuming from step 20\n" in out, out
    assert_as_uninterrupted(run, reference)


def test_a_checkpoint_without_the_metric_window_still_resumes(
        stopped: Path, tmp_path: Path, capsys: pytest.CaptureFixture, reference: Any) -> None:
    """An earlier ngexp's checkpoint (no ``window``, no ``last_train``) loads; the first record
    after it averages fewer steps, which is said."""
    run = copy_of(stopped, tmp_path)
    path = run / "checkpoints" / "last.pt"
    state = torch.load(path, weights_only=True)
    del state["window"], state["last_train"]
    checkpoint.save_checkpoint(path, state)
    run, out = relaunch(tmp_path / "runs", capsys)
    assert "checkpoint without its metric window" in out and "resuming from step 20" in out
    records, final = reference
    got = values(run)
    steps = [r["step"] for r in records]
    assert [r["step"] for r in got] == steps
    first = steps.index(21)  # the record of steps 19-21, of step 21 alone here
    assert got[:first] == records[:first] and got[first] != records[first]
    assert all(torch.equal(weights(run)[k], final[k]) for k in final)


@pytest.mark.parametrize(("mine", "others", "agreed"), [
    ((None, False), (None, False), (None, False)),
    ((None, False), (None, True), (None, True)),  # another rank's clock: all checkpoint
    ((None, True), (None, False), (None, True)),
    ((None, True), (signal.SIGTERM, False), (signal.SIGTERM, False)),  # the stop checkpoints
    ((signal.SIGUSR2, False), (signal.SIGTERM, True), (signal.SIGTERM, True)),  # the larger
])
def test_ranks_agree_on_a_stop_and_a_timed_checkpoint_in_one_exchange(
        mine: tuple[int | None, bool], others: tuple[int | None, bool],
        agreed: tuple[int | None, bool], monkeypatch: pytest.MonkeyPatch) -> None:
    """``agree_stop_signal`` of two ranks, the other rank's value folded in by ``agree_max``."""
    other = 2 * (others[0] or 0) + int(others[1])
    calls = []

    def agree_max(value: int) -> int:
        calls.append(value)
        return max(value, other)

    monkeypatch.setattr(ranks.comm, "agree_max", agree_max)
    assert ranks.agree_stop_signal(*mine, World(0, 2)) == agreed
    assert len(calls) == 1  # one collective a step, as before the time cadence
    assert ranks.agree_stop_signal(*mine, World()) == mine  # one process: nothing to agree


@pytest.mark.parametrize(("override", "expected"), [
    ("trainer.checkpoint_every_steps=-1", "expected an integer >= 0"),
    ("trainer.checkpoint_every_minutes=-5", "=-5.0 is invalid: expected a finite number >= 0"),
    ("trainer.checkpoint_every_minutes=inf", "=inf is invalid: expected a finite number >= 0"),
])
def test_a_bad_cadence_is_one_line(override: str, expected: str, tmp_path: Path,
                                   capsys: pytest.CaptureFixture) -> None:
    assert main(["train", *BASE, override, f"output_root={tmp_path}"]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("ngexp: error: ") and expected in lines[0]
    assert not list(tmp_path.iterdir())
