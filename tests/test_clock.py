"""The training clock (ngexp/train/clock.py): record times and ``wall_time`` leave out
evaluations and checkpoint writes, so a time to target does not depend on how often a run
evaluates."""

from __future__ import annotations

from pathlib import Path

import pytest

from ngexp.train import clock
from ngexp.train.clock import TrainingClock
from tests.helpers import InterruptAfter, build_trainer, compose, read_metrics, read_summary


class FakeTime:
    """A ``perf_counter`` that only moves when told to."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_paused_seconds_are_left_out_and_the_clock_reads_the_pause_start(
        monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeTime()
    monkeypatch.setattr(clock, "perf_counter", fake)
    watch = TrainingClock()
    watch.before = 7.0  # an earlier session's seconds
    watch.start_session()
    fake.now += 2.0
    with watch.paused():
        fake.now += 30.0
        assert watch.seconds == 9.0  # frozen at the pause
        with watch.paused():  # nested: counted once
            fake.now += 5.0
        assert watch.seconds == 9.0
    fake.now += 1.0
    assert watch.seconds == 10.0


def slow_trainer(fake: FakeTime, run_dir: Path):
    """A trainer of a tiny MLP run in ``run_dir`` whose training steps take 1 fake second and
    whose evaluations and checkpoint writes take 1000."""
    cfg = compose("model=mlp", "data=synthetic", "data.shape=[1,8,8]", "data.num_train=64",
                  "data.num_test=32", "trainer.batch_size=16", "trainer.epochs=2",
                  "trainer.eval_every=2", "trainer.log_every=1", "trainer.progress=none",
                  "trainer.device=cpu", f"output_root={run_dir.parent}")
    run_dir.mkdir(exist_ok=True)
    trainer = build_trainer(cfg, {"model": "mlp"}, run_dir)

    def slow(method):
        def wrapped(*args, **kwargs):
            fake.now += 1000.0
            return method(*args, **kwargs)
        return wrapped

    step = trainer.train_step
    trainer.train_step = lambda *args: (setattr(fake, "now", fake.now + 1.0), step(*args))
    trainer.evaluator.evaluate_splits = slow(trainer.evaluator.evaluate_splits)
    trainer.checkpoints.save = slow(trainer.checkpoints.save)
    return trainer


@pytest.mark.parametrize("interrupt_at", [None, 3])
def test_evaluations_and_checkpoints_are_not_training_time(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, interrupt_at: int | None) -> None:
    """Record times and ``wall_time`` count the training steps only (1 s each), also across
    a kill and resume (the interrupted session's checkpoint written at step 3), and every
    ``train/step_time_ms`` is one step's 1000 ms, the first after the resume too."""
    from ngexp.train.session import run_session
    from ngexp.train.stop import RunInterrupted

    fake = FakeTime()
    monkeypatch.setattr(clock, "perf_counter", fake)
    run_dir = tmp_path / "run"
    if interrupt_at is not None:
        trainer = slow_trainer(fake, run_dir)
        trainer.callbacks.append(InterruptAfter(interrupt_at))
        with pytest.raises(RunInterrupted):
            run_session(trainer)
    run_session(slow_trainer(fake, run_dir))
    records = read_metrics(run_dir)
    train = [r for r in records if "train/loss" in r]
    assert [(r["step"], r["time"]) for r in train] == [(s, float(s)) for s in range(1, 9)]
    assert {r["train/step_time_ms"] for r in train} == {1000.0}
    assert [r["time"] for r in records if "test/loss" in r] == [2.0, 4.0, 6.0, 8.0]
    assert read_summary(run_dir)["wall_time"] == 8.0
