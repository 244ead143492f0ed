"""Time to target and performance profiles in ``ngexp report``, against a sweep computed by
hand: two optimizers x three seeds, ``val/loss`` recorded at steps 100, 200, 300."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import yaml

from ngexp.report import main as report_main
from ngexp.report.aggregate import aggregate
from ngexp.report.scan import find_run_dirs, load_run
from ngexp.report.target import profiles, rho, target_from, target_rows

#: optimizer -> seed -> (val/loss at steps 100, 200, 300; seconds at those records)
SWEEP = {
    "adam": {0: ([0.8, 0.6, 0.45], [10, 20, 30]), 1: ([0.7, 0.5, 0.4], [11, 22, 33]),
             2: ([0.9, 0.8, 0.7], [10, 20, 30])},
    "kfac": {0: ([0.5, 0.3, 0.2], [20, 40, 60]), 1: ([0.6, 0.4, 0.3], [21, 42, 63]),
             2: ([0.45, 0.3, 0.2], [19, 38, 57])},
}


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    for optimizer, seeds in SWEEP.items():
        for seed, (losses, times) in seeds.items():
            run = tmp_path / "runs" / optimizer / f"seed_{seed}"
            run.mkdir(parents=True)
            (run / "config.yaml").write_text(yaml.safe_dump(
                {"seed": seed, "trainer": {"batch_size": 128}, "optimizer": {"lr": 0.1}}))
            records = [{"step": 100 * (i + 1), "epoch": i + 1.0, "time": float(t), "val/loss": v}
                       for i, (v, t) in enumerate(zip(losses, times, strict=True))]
            (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
            (run / "summary.json").write_text(json.dumps({
                "status": "completed", "seed": seed, "step": 300, "wall_time": float(times[-1]),
                "global_batch_size": 128, "final": {"val/loss": losses[-1]},
                "choices": {"optimizer": optimizer, "data": "fashion_mnist", "model": "mlp"}}))
    return tmp_path / "runs"


def rows_of(sweep: Path):
    return aggregate([load_run(p) for p in find_run_dirs([sweep])], ["optimizer"], "val/loss")


def test_time_to_a_given_target(sweep: Path) -> None:
    adam, kfac = target_rows(rows_of(sweep), "val/loss", 0.5)
    assert [h["steps"] for h in adam.hits] == [300, 200, math.inf]
    assert [h["examples"] for h in adam.hits] == [38400, 25600, math.inf]
    assert [h["seconds"] for h in adam.hits] == [30, 22, math.inf]
    assert adam.reached == 2 and adam.median("steps") == 300 and adam.median("seconds") == 30
    assert adam.spread("seconds") == (22, 30)
    assert [h["steps"] for h in kfac.hits] == [100, 200, 100]  # 0.5 counts: <= for a loss
    assert kfac.reached == 3 and kfac.median("seconds") == 20
    assert kfac.spread("steps") == (100, 200)


def test_performance_profile_ratios(sweep: Path) -> None:
    items = target_rows(rows_of(sweep), "val/loss", 0.5)
    seconds = profiles(items, ["optimizer"], "seconds")
    assert seconds["adam"] == [1.0, 1.5, math.inf]  # seed 1 fastest; 30/20 on seed 0; missed 2
    assert seconds["kfac"] == [1.0, 1.0, pytest.approx(42 / 22)]
    assert rho(seconds["adam"], 1.0) == pytest.approx(1 / 3)
    assert rho(seconds["kfac"], 1.0) == pytest.approx(2 / 3) and rho(seconds["kfac"], 2) == 1
    assert profiles(items, ["optimizer"], "steps")["adam"] == [1.0, 3.0, math.inf]


def test_target_from_a_baseline_group_and_the_command(sweep: Path, tmp_path: Path) -> None:
    """Adam's best values 0.45, 0.4, 0.7: every seed reaches 0.7."""
    assert target_from(rows_of(sweep), ["optimizer"], "adam", "val/loss") == 0.7
    out = tmp_path / "report"
    assert report_main([str(sweep), "--metric", "val/loss", "--target-from", "adam",
                        "--out", str(out)]) == 0
    with (out / "target.csv").open() as stream:
        lines = list(csv.DictReader(stream))
    steps = {(r["optimizer"], r["seed"]): float(r["steps"]) for r in lines}
    assert steps == {("adam", "0"): 200, ("adam", "1"): 100, ("adam", "2"): 300,
                     ("kfac", "0"): 100, ("kfac", "1"): 100, ("kfac", "2"): 100}
    for row in lines:  # relative to the CSV's folder, as in report.csv
        run_dir = out / row["run_dir_relative_to_csv"]
        assert (run_dir / "metrics.jsonl").is_file() and run_dir.name == f"seed_{row['seed']}"
    text = (out / "report.md").read_text()
    assert "| adam | completed | 3/3 | 200 (100-300) | 25600 (12800-38400) |" in text
    assert ("| kfac | completed | 3/3 | 100 (100-100) | 12800 (12800-12800) "
            "| 20.00 (19.00-21.00) |") in text
    for measure in ("steps", "examples", "seconds"):
        assert (out / f"performance_profile_{measure}.png").stat().st_size > 5000


def test_bad_target_is_one_line_exit_2(sweep: Path, tmp_path: Path,
                                       capsys: pytest.CaptureFixture) -> None:
    assert report_main([str(sweep), "--target", "val/loss", "--out", str(tmp_path / "r")]) == 2
    assert "expected METRIC=VALUE" in capsys.readouterr().err
    assert report_main([str(sweep), "--target-from", "sgd", "--out", str(tmp_path / "r")]) == 2
    assert "choices: adam, kfac" in capsys.readouterr().err
