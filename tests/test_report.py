"""``ngexp report`` on synthetic run directories whose numbers are known by hand."""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from ngexp.report import main
from ngexp.report.aggregate import aggregate, auto_keys, band, pruning_curves, run_value
from ngexp.report.scan import STALE_AFTER_S, find_run_dirs, load_run

PNG = b"\x89PNG\r\n\x1a\n"
OPTIMIZER_KEYS = {"sgd": {"lr": 0.1, "momentum": 0.9}, "adam": {"lr": 0.001, "eps": 1e-8},
                  "kfac": {"lr": 0.01, "damping": 0.001}}


def make_run(root: Path, optimizer: str, seed: int, accs: list[float], *,
             status: str | None = "completed", reason: str | None = None, lr: float | None = None,
             prune: dict[str, Any] | None = None, seconds_per_epoch: float = 10.0,
             extra_final: dict[str, float] | None = None) -> Path:
    """A run with one eval record per epoch (test/acc = ``accs``, test/loss = 1 - acc) and a
    train record in between; ``status=None`` writes no summary.json."""
    hyper = dict(OPTIMIZER_KEYS[optimizer], **({"lr": lr} if lr is not None else {}))
    config = {"seed": seed, "output_root": str(root), "name": None,
              "model": {"_target_": "ngexp.models.mlp.MLP", "hidden": [64]},
              "optimizer": {"_target_": f"ngexp.optim.{optimizer}", **hyper},
              "prune": prune, "trainer": {"epochs": 2, "device": "cpu"}}
    digest = hashlib.sha256(json.dumps([hyper, prune]).encode()).hexdigest()[:12]
    run_dir = root / f"mlp-{optimizer}" / digest / f"seed_{seed}"
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    records = []
    for epoch, acc in enumerate(accs, start=1):
        step = 100 * epoch
        elapsed = seconds_per_epoch * epoch
        records.append({"step": step - 50, "epoch": epoch - 0.5, "time": elapsed - 5,
                        "train/loss": 2.0 / epoch})
        records.append({"step": step, "epoch": float(epoch), "time": elapsed, "test/acc": acc,
                        "test/loss": 1.0 - acc,
                        **({"prune/sparsity": prune["sparsity"]} if prune else {})})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if status is not None:
        last = {k: v for k, v in records[-1].items() if "/" in k} if status == "completed" else {}
        summary = {"status": status, "reason": reason, "seed": seed, "step": records[-1]["step"],
                   "total_steps": 100 * len(accs) if status == "completed" else 1000,
                   "choices": {"model": "mlp", "optimizer": optimizer,
                               "prune": "oneshot" if prune else None},
                   "wall_time": records[-1]["time"] if status == "completed" else 0.0,
                   "final": {**last, **(extra_final or {})},
                   "best": {}}
        (run_dir / "summary.json").write_text(json.dumps(summary))
    return run_dir


@pytest.fixture
def runs(tmp_path: Path) -> Path:
    root = tmp_path / "runs"
    for seed, accs in enumerate([[0.5, 0.8], [0.6, 0.82], [0.7, 0.87]]):
        make_run(root, "sgd", seed, accs)
    make_run(root, "adam", 0, [0.85, 0.9])
    make_run(root, "adam", 1, [0.95, 0.86])
    make_run(root, "adam", 2, [0.3, math.nan], status="failed", reason="nan at step 812")
    make_run(root, "kfac", 0, [0.88, 0.91])
    stale = make_run(root, "kfac", 1, [0.4], status="running")
    old = time.time() - 2 * STALE_AFTER_S
    for name in ("summary.json", "metrics.jsonl"):
        os.utime(stale / name, (old, old))
    make_run(root, "kfac", 2, [0.45], status=None)
    return root


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as stream:
        return list(csv.DictReader(stream))


def test_table_numbers_and_states(runs: Path, tmp_path: Path,
                                  capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "report"
    assert main([str(runs), "--out", str(out), "--no-plots"]) == 0
    rows = read_csv(out / "report.csv")
    assert [(r["optimizer"], r["status"].split("(")[0], r["n"]) for r in rows] == [
        ("adam", "completed", "2"), ("adam", "failed", "1"), ("kfac", "completed", "1"),
        ("kfac", "stale", "1"), ("sgd", "completed", "3"), ("-", "unfinished", "1")]
    adam, failed, kfac, stale, sgd, unfinished = rows  # no summary.json: no choices known
    assert float(sgd["test/acc_mean"]) == pytest.approx(0.83, rel=1e-12)
    assert float(sgd["test/acc_std"]) == pytest.approx(math.sqrt(0.0013), rel=1e-12)
    assert sgd["seeds"] == "0 1 2"
    assert float(adam["test/acc_mean"]) == pytest.approx(0.88, rel=1e-12)
    assert float(adam["test/acc_std"]) == pytest.approx(math.sqrt(0.0008), rel=1e-12)
    assert float(kfac["test/acc_mean"]) == pytest.approx(0.91) and kfac["test/acc_std"] == ""
    assert float(sgd["wall_time_s"]) == pytest.approx(20.0)
    assert failed["status"] == "failed(nan at step 812)" and failed["seeds"] == "2"
    assert stale["status"].startswith("stale(step 100/1000, no update for 1.0 h)")
    assert unfinished["status"] == "unfinished(no summary.json, step 100)"
    assert float(unfinished["test/acc_mean"]) == pytest.approx(0.45)  # last record
    markdown = (out / "report.md").read_text()
    assert "| sgd | 0.8300 ± 0.0361 | 3 | 0,1,2 | 20.0 s | completed |" in markdown
    assert "| adam | nan | 1 | 2 | 20.0 s | failed(nan at step 812) |" in markdown
    assert "9 runs (6 completed, 1 failed, 1 stale, 1 unfinished)" in markdown
    printed = capsys.readouterr().out
    assert "failed(nan" in printed and "0.8300 ± 0.0361" in printed


def test_best_uses_max_for_accuracy_and_min_for_loss(runs: Path, tmp_path: Path) -> None:
    out = tmp_path / "best"
    assert main([str(runs), "--out", str(out), "--no-plots", "--best", "--by", "optimizer"]) == 0
    adam = read_csv(out / "report.csv")[0]
    assert float(adam["test/acc_mean"]) == pytest.approx((0.9 + 0.95) / 2, rel=1e-12)
    assert main([str(runs), "--out", str(out), "--no-plots", "--best", "--metric",
                 "test/loss"]) == 0
    adam = read_csv(out / "report.csv")[0]
    assert float(adam["test/loss_mean"]) == pytest.approx((0.1 + 0.05) / 2, rel=1e-12)
    assert float(adam["test/loss_std"]) == pytest.approx(math.sqrt(0.05**2 / 2), rel=1e-9)


def test_group_keys_dotted_and_auto(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    for lr in (0.1, 0.01):
        for seed in (0, 1):
            make_run(root, "sgd", seed, [0.5, 0.7 + lr + seed / 100], lr=lr)
    make_run(root, "adam", 0, [0.5, 0.9])
    runs = [load_run(p) for p in find_run_dirs([root])]
    assert auto_keys(runs) == ["optimizer", "optimizer.lr"]  # lr also varies within sgd
    rows = aggregate(runs, ["optimizer.lr"], "test/acc")
    assert [(r.key, r.n) for r in rows] == [((0.001,), 1), ((0.01,), 2), ((0.1,), 2)]
    assert rows[1].mean == pytest.approx(0.715, rel=1e-12)
    assert rows[1].std == pytest.approx(math.sqrt(0.01**2 / 2), rel=1e-9)
    same = [run for run in runs if run.choices["optimizer"] == "sgd" and
            run.config["optimizer.lr"] == 0.1]
    assert auto_keys(same) == ["model", "optimizer"]  # nothing varies: show the choices


def test_sweep_pointers_dedup_and_dangling(runs: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture) -> None:
    sweep = tmp_path / "sweeps" / "2024-01-01_00-00-00"
    targets = sorted((runs / "mlp-sgd").glob("*/seed_*"))
    for num, target in enumerate([*targets, tmp_path / "gone"]):
        (sweep / str(num)).mkdir(parents=True)
        (sweep / str(num) / "run_dir.txt").write_text(f"{target}\n")
    found = find_run_dirs([sweep])
    assert found == [t.resolve() for t in targets]
    assert "points to missing" in capsys.readouterr().err
    assert len(find_run_dirs([sweep, runs])) == 9  # the same runs twice count once


def test_plots_written(runs: Path, tmp_path: Path) -> None:
    out = tmp_path / "plots"
    assert main([str(runs), "--out", str(out)]) == 0
    for axis in ("epoch", "step", "time"):
        data = (out / f"test-acc_vs_{axis}.png").read_bytes()
        assert data.startswith(PNG) and len(data) > 5000
    assert "![test-acc_vs_epoch](test-acc_vs_epoch.png)" in (out / "report.md").read_text()
    assert not (out / "test-acc_vs_sparsity.png").exists()  # no pruning runs


def test_pruning_accuracy_vs_sparsity(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    expected = {}
    for criterion, drop in (("magnitude", 0.1), ("obd", 0.05)):
        for sparsity in (0.5, 0.9):
            accs = [0.9 - drop * sparsity - seed / 100 for seed in (0, 1)]
            expected[criterion, sparsity] = accs
            for seed, acc in enumerate(accs):
                make_run(root, "sgd", seed, [acc],
                         prune={"criterion": criterion, "sparsity": sparsity})
    runs = [load_run(p) for p in find_run_dirs([root])]
    rows = aggregate(runs, ["prune.criterion", "prune.sparsity"], "test/acc")
    curves = pruning_curves(rows, ["prune.criterion", "prune.sparsity"], "test/acc")
    assert list(curves) == ["magnitude", "obd"]
    for criterion, points in curves.items():
        assert [p.sparsity for p in points] == [0.5, 0.9]
        for point in points:
            accs = expected[criterion, point.sparsity]
            assert point.n == 2 and point.mean == pytest.approx(sum(accs) / 2, rel=1e-12)
            assert point.std == pytest.approx(abs(accs[0] - accs[1]) / math.sqrt(2), rel=1e-9)
    out = tmp_path / "report"
    assert main([str(root), "--out", str(out), "--by", "prune.criterion,prune.sparsity"]) == 0
    assert (out / "test-acc_vs_sparsity.png").read_bytes().startswith(PNG)


def test_band_interpolates_onto_the_common_range() -> None:
    x1, x2 = np.linspace(0, 10, 11), np.linspace(1, 12, 23)
    grid, mean, std = band([(x1, x1), (x2, 2 * x2)], points=50)
    assert grid[0] == 1 and grid[-1] == 10 and len(grid) == 50
    np.testing.assert_allclose(mean, 1.5 * grid)
    np.testing.assert_allclose(std, grid / math.sqrt(2))
    same = band([(x1, x1), (x1, 3 * x1), (x1, 5 * x1)])
    assert same is not None and np.array_equal(same[0], x1)
    np.testing.assert_allclose(same[1], 3 * x1)
    np.testing.assert_allclose(same[2], 2 * x1)  # sample std of (1, 3, 5) = 2
    disjoint = [(np.array([0.0, 1.0]), x1[:2]), (np.array([2.0, 3.0]), 3 * x1[:2])]
    assert band(disjoint) is None
    steps = [np.array([100, 200])] * 2  # the same evals, at different times: matched by step
    by_step = band(disjoint, steps=steps)
    assert by_step is not None
    np.testing.assert_allclose(by_step[0], [1.0, 2.0])  # mean time of each eval
    np.testing.assert_allclose(by_step[1], [0.0, 2.0])
    np.testing.assert_allclose(by_step[2], [0.0, math.sqrt(2)])
    single = band([(x1, x1)])
    assert single is not None and single[2] is None


def test_final_prefers_summary_then_last_record(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path, "sgd", 0, [0.5, 0.7], extra_final={"test/acc": 0.75})
    run = load_run(run_dir)
    assert run_value(run, "test/acc") == 0.75
    assert run_value(run, "test/acc", best=True) == 0.7  # records: max
    assert run_value(run, "val/acc") is None


@pytest.mark.parametrize("argv, message", [
    (["{tmp}/nope"], "no such file or directory"),
    (["{tmp}"], "no run directories"),
    (["{runs}", "--metric", "test/bleu"], "--metric 'test/bleu' was logged by no run; choices:"),
    (["{runs}", "--by", "optimizer.beta9"], "--by key 'optimizer.beta9' is in no run"),
])
def test_bad_input_one_line_exit_2(runs: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                   argv: list[str], message: str) -> None:
    (tmp_path / "empty").mkdir()
    argv = [a.format(tmp=tmp_path / "empty", runs=runs) for a in argv]
    assert main([*argv, "--out", str(tmp_path / "r"), "--no-plots"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("ngexp report: ") and message in err


def test_hundreds_of_runs_in_seconds(tmp_path: Path) -> None:
    root = tmp_path / "many"
    rng = np.random.default_rng(0)
    for lr in np.round(np.geomspace(1e-3, 1, 75), 6):
        for seed in range(4):
            make_run(root, "sgd", seed, list(rng.uniform(0.5, 0.9, size=20)), lr=float(lr))
    start = time.perf_counter()
    assert main([str(root), "--out", str(tmp_path / "r"), "--no-plots"]) == 0
    assert time.perf_counter() - start < 10  # about 1 s on 2 CPU cores
    assert len(read_csv(tmp_path / "r" / "report.csv")) == 75


@pytest.mark.parametrize("status, reason, expected", [
    ("running", None, "running(step 100/1000)"),
    ("interrupted", "signal SIGTERM", "interrupted(signal SIGTERM, step 100/1000)"),
    ("failed", "RuntimeError: boom", "failed(RuntimeError: boom)"),
])
def test_states(tmp_path: Path, status: str, reason: str | None, expected: str) -> None:
    run = load_run(make_run(tmp_path, "sgd", 0, [0.4], status=status, reason=reason))
    assert run.status == expected and not run.completed
    assert run.wall_time == 10.0  # the last record's time: the summary's is from the start
