"""Small lapses a new user meets: run names that would leave output_root, Adam's betas of the
wrong length, the generated ``--help``, ``trainer.progress=none``, and a diverged run whose
metrics must show how it diverged."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from ngexp.cli import main
from tests.helpers import ngexp, read_metrics, read_summary, run_dirs


@pytest.mark.parametrize("name", ["../../escaped", "/tmp/x", "a/b", "..", "a\\b"])
def test_a_name_that_leaves_output_root_is_one_error_line(
        name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "runs"
    assert main(["train", f"name={name}", f"output_root={root}", "data=synthetic"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"ngexp: error: name={name!r} is invalid: expected a folder name inside "
                   f"output_root, without '/', '\\' or '..'"]
    assert not root.exists() and not (tmp_path / "escaped").exists()


def test_adam_betas_of_the_wrong_length_is_one_error_line(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "optimizer=adam", "optimizer.betas=[0.9]"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "ngexp: error: optimizer.betas=[0.9] is invalid: expected two numbers in [0, 1), "
        "e.g. [0.9, 0.999]"]


def test_help_shows_real_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--help"]) == 0
    text = capsys.readouterr().out
    assert "prune.exclude=[]" in text
    assert "object at 0x" not in text and "MISSING" not in text


def test_progress_none_prints_no_summary_box(tmp_path: Path) -> None:
    result = ngexp("train", "data=synthetic", "trainer.max_steps=2", "trainer.progress=none",
                   f"output_root={tmp_path}")
    assert "summary" not in result.stdout and "│" not in result.stdout and "step 2" not in \
        result.stdout, result.stdout
    plain = ngexp("train", "data=synthetic", "trainer.max_steps=2", "trainer.progress=plain",
                  f"output_root={tmp_path}", "force=true")
    assert "│ status" in plain.stdout


def test_a_diverged_run_logs_the_steps_up_to_the_failure(tmp_path: Path) -> None:
    """lr=1e5 blows the loss up within a few steps, long before the first log_every=50 record:
    the finite steps before it and the non-finite step reach metrics.jsonl, TensorBoard and
    the CSV logger."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = ngexp("train", "data=synthetic", "optimizer.lr=1e5", "trainer.max_steps=40",
                   "trainer.log_every=50", "trainer.progress=plain", "logger=[tensorboard,csv]",
                   f"output_root={tmp_path}", check=False)
    assert result.returncode == 1
    (run_dir,) = run_dirs(tmp_path)
    bad = int(read_summary(run_dir)["reason"].removeprefix("nan at step "))
    assert 1 < bad < 40
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == [bad - 1, bad]
    assert math.isfinite(records[0]["train/loss"]) and records[0]["train/loss"] > 10
    assert not math.isfinite(records[1]["train/loss"])
    events = EventAccumulator(str(run_dir / "tb"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [bad - 1, bad]
    csv_steps = {int(line.split(",")[0]) for line in
                 (run_dir / "csv" / "metrics.csv").read_text().splitlines()[1:]}
    assert csv_steps == {bad - 1, bad}
