"""Time to target, performance profiles and the AlgoPerf score in ``ngexp report``, against
sweeps computed by hand: two optimizers x three seeds, ``val/loss`` recorded at steps 100, 200,
300; three optimizers x two workloads x three studies (seeds) of one or two trials each."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from ngexp.report import main as report_main
from ngexp.report.aggregate import aggregate
from ngexp.report.scan import find_run_dirs, load_run
from ngexp.report.score import R_MAX, capped, submissions, workload_targets, workload_times
from ngexp.report.target import profiles, rho, target_from, target_rows

#: optimizer -> seed -> (val/loss at steps 100, 200, 300; seconds at those records)
SWEEP = {
    "adam": {0: ([0.8, 0.6, 0.45], [10, 20, 30]), 1: ([0.7, 0.5, 0.4], [11, 22, 33]),
             2: ([0.9, 0.8, 0.7], [10, 20, 30])},
    "kfac": {0: ([0.5, 0.3, 0.2], [20, 40, 60]), 1: ([0.6, 0.4, 0.3], [21, 42, 63]),
             2: ([0.45, 0.3, 0.2], [19, 38, 57])},
}


def write_run(run: Path, optimizer: str, seed: int, losses: list[float], times: list[float],
              workload: tuple[str, str] = ("fashion_mnist", "mlp"), lr: float = 0.1) -> None:
    """A completed run directory: ``val/loss`` ``losses[i]`` at step ``100 (i + 1)`` and
    ``times[i]`` seconds, batch 128."""
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(
        {"seed": seed, "trainer": {"batch_size": 128}, "optimizer": {"lr": lr}}))
    records = [{"step": 100 * (i + 1), "epoch": i + 1.0, "time": float(t), "val/loss": v}
               for i, (v, t) in enumerate(zip(losses, times, strict=True))]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (run / "summary.json").write_text(json.dumps({
        "status": "completed", "seed": seed, "step": 100 * len(losses),
        "wall_time": float(times[-1]), "global_batch_size": 128,
        "final": {"val/loss": losses[-1]},
        "choices": {"optimizer": optimizer, "data": workload[0], "model": workload[1]}}))


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    for optimizer, seeds in SWEEP.items():
        for seed, (losses, times) in seeds.items():
            write_run(tmp_path / "runs" / optimizer / f"seed_{seed}", optimizer, seed, losses,
                      times)
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


# ---------------------------------------------------------------------------- AlgoPerf score
W1, W2 = ("fashion_mnist", "mlp"), ("mnist", "lenet5")
#: optimizer -> workload -> study (seed) -> seconds to val/loss <= 0.5 of each trial (an lr;
#: None: never). A run that reaches it logs 0.9 at t/2, then 0.4 (W1) or 0.3 (W2) at t; one
#: that never does logs 0.9 and 0.8 at 5 and 10 s.
STUDIES: dict[str, dict[tuple[str, str], dict[int, list[float | None]]]] = {
    "sgd": {W1: {0: [30, 40], 1: [20, None], 2: [50, 60]}, W2: {0: [110], 1: [100], 2: [120]}},
    "adam": {W1: {0: [10], 1: [12], 2: [None]}, W2: {0: [25], 1: [20], 2: [30]}},
    "kfac": {W1: {0: [None], 1: [None], 2: [8]}, W2: {0: [40], 1: [70, 50], 2: [60]}},
}


@pytest.fixture
def studies(tmp_path: Path) -> Path:
    for optimizer, workloads in STUDIES.items():
        for workload, seeds in workloads.items():
            for seed, trials in seeds.items():
                for trial, time in enumerate(trials):
                    reached = 0.4 if workload == W1 else 0.3
                    losses, times = ([0.9, reached], [time / 2, time]) if time else (
                        [0.9, 0.8], [5, 10])
                    write_run(tmp_path / "studies" / optimizer / workload[0] / f"lr_{trial}"
                              / f"seed_{seed}", optimizer, seed, losses, times, workload,
                              lr=0.1 * (trial + 1))
    return tmp_path / "studies"


def test_algoperf_score_by_hand(studies: Path) -> None:
    """Best trial per study, median over studies (seconds):
    W1: sgd min(30,40), min(20,never), min(50,60) = 30, 20, 50 -> 30; adam 10, 12, never -> 12;
        kfac never, never, 8 -> never (its 8 s is the fastest run, but in one study of three).
        Fastest 12: r = sgd 30/12 = 2.5, adam 1, kfac inf.
    W2: sgd 110, 100, 120 -> 110; adam 25, 20, 30 -> 25; kfac 40, min(70,50), 60 -> 50.
        Fastest 25: r = sgd 4.4 (past the cap of 4: never), adam 1, kfac 2.
    score = 1/2 * sum over workloads of (4 - r)/3 for r <= 4:
        adam (3/3 + 3/3)/2 = 1; kfac (0 + 2/3)/2 = 1/3; sgd (1.5/3 + 0)/2 = 1/4."""
    rows = aggregate([load_run(p) for p in find_run_dirs([studies])], ["optimizer"], "val/loss")
    items = target_rows(rows, "val/loss", 0.5)
    assert workload_times(items, ["optimizer"], "seconds") == {
        "adam": {W1: 12, W2: 25}, "kfac": {W1: math.inf, W2: 50}, "sgd": {W1: 30, W2: 110}}
    ranked = submissions(items, ["optimizer"], "seconds")
    assert [s.name for s in ranked] == ["adam", "kfac", "sgd"]
    adam, kfac, sgd = ranked
    assert adam.ratios == {W1: 1, W2: 1} and kfac.ratios == {W1: math.inf, W2: 2}
    assert sgd.ratios == {W1: 2.5, W2: pytest.approx(4.4)}
    assert (adam.score, kfac.score, sgd.score) == (1, pytest.approx(1 / 3), 0.25)
    profile = [capped(r) for r in sgd.ratios.values()]  # [2.5, inf]
    assert [rho(profile, tau) for tau in (2, 2.5, R_MAX)] == [0, 0.5, 0.5]
    for submission in ranked:  # the exact integral against the trapezoid rule on a fine grid
        taus = np.linspace(1, R_MAX, 30001)
        ratios = [capped(r) for r in submission.ratios.values()]
        area = np.trapezoid([rho(ratios, t) for t in taus], taus) / (R_MAX - 1)
        assert area == pytest.approx(submission.score, abs=1e-3)
    # in steps, every median that is reached is 200: r = 1, but kfac's never on W1 (ties kept
    # in the report's order)
    assert [(s.name, s.score) for s in submissions(items, ["optimizer"], "steps")] == [
        ("adam", 1), ("sgd", 1), ("kfac", 0.5)]


def test_algoperf_targets_are_per_workload(studies: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture) -> None:
    """Adam's best values: W1 0.4, 0.4, 0.8 (its miss) -> 0.8; W2 0.3 each -> 0.3."""
    rows = aggregate([load_run(p) for p in find_run_dirs([studies])], ["optimizer"], "val/loss")
    metric, targets, _ = workload_targets(rows, ["optimizer"], None, "adam", "val/loss")
    assert metric == "val/loss" and targets == {W1: 0.8, W2: 0.3}
    write_run(tmp_path / "extra" / "seed_0", "sgd", 0, [0.5], [1], ("cifar10", "resnet20"))
    assert report_main([str(studies), str(tmp_path / "extra"), "--by", "optimizer",
                        "--metric", "val/loss", "--target-from", "adam", "--score",
                        "--no-plots", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and ("--target-from 'adam' has no completed run on workload "
                                      "cifar10/resnet20") in err


def test_score_command(studies: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    assert report_main([str(studies), "--by", "optimizer", "--metric", "val/loss", "--target",
                        "val/loss=0.5", "--score", "--no-plots", "--out", str(out)]) == 0
    with (out / "score.csv").open() as stream:
        lines = list(csv.DictReader(stream))
    assert [(r["submission"], float(r["score"])) for r in lines] == [
        ("adam", 1.0), ("kfac", pytest.approx(1 / 3)), ("sgd", 0.25)]
    assert lines[1]["fashion_mnist/mlp:seconds"] == "inf"
    assert lines[1]["mnist/lenet5:seconds"] == "50.0" and lines[1]["mnist/lenet5:ratio"] == "2.0"
    assert float(lines[2]["mnist/lenet5:ratio"]) == pytest.approx(4.4)  # uncapped in the CSV
    text = (out / "report.md").read_text()
    assert "| submission | score | fashion_mnist/mlp (seconds) | mnist/lenet5 (seconds) |" in text
    assert "| adam | 1.0000 | 12.00 (r=1.00) | 25.00 (r=1.00) |" in text
    assert "| kfac | 0.3333 | never | 50.00 (r=2.00) |" in text
    assert "| sgd | 0.2500 | 30.00 (r=2.50) | 110.0 (r=4.40 > 4) |" in text
    assert "fashion_mnist/mlp `val/loss <= 0.5000`, mnist/lenet5 `val/loss <= 0.5000`" in text


def test_score_without_a_target_is_one_line_exit_2(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        report_main(["somewhere", "--score"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == ("ngexp: error: --score needs a target: --target "
                                       "METRIC=VALUE or --target-from GROUP (see ngexp report "
                                       "--help)\n")
