"""``ngexp report`` on synthetic run directories whose numbers are known by hand."""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from ngexp.report import default_out, main
from ngexp.report.aggregate import Row, aggregate, auto_keys, band, pruning_curves, run_value
from ngexp.report.scan import STALE_AFTER_S, find_run_dirs, load_run
from ngexp.report.tables import RUN_DIRS, duration, number, value_cell

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
    assert "| sgd | 0.8300 ± 0.0361 | 3 | 0,1,2 | 20s | completed |" in markdown
    assert "| adam | nan | 1 | 2 | 20s | failed(nan at step 812) |" in markdown
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
    assert err.count("\n") == 1 and err.startswith("ngexp: error: ") and message in err


@pytest.mark.parametrize("argv, message", [
    (["--best", "--final"], "argument --final: not allowed with argument --best"),
    (["--bogus"], "unrecognized arguments: --bogus"),
    ([], "the following arguments are required: paths"),
])
def test_bad_arguments_one_line_exit_2(capsys: pytest.CaptureFixture, argv: list[str],
                                       message: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([*(["somewhere"] if argv else []), *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err == f"ngexp: error: {message} (see ngexp report --help)\n"


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


# ------------------------------------------------------------------ malformed run files
def edit_summary(**fields: Any) -> Callable[[Path], None]:
    """Set ``fields`` in summary.json."""
    def corrupt(run_dir: Path) -> None:
        summary = json.loads((run_dir / "summary.json").read_text())
        (run_dir / "summary.json").write_text(json.dumps({**summary, **fields}))
    return corrupt


def edit_record(line: int, **fields: Any) -> Callable[[Path], None]:
    """Set ``fields`` in record ``line`` (1-based) of metrics.jsonl."""
    def corrupt(run_dir: Path) -> None:
        path = run_dir / "metrics.jsonl"
        lines = path.read_text().splitlines()
        lines[line - 1] = json.dumps({**json.loads(lines[line - 1]), **fields})
        path.write_text("".join(f"{text}\n" for text in lines))
    return corrupt


def replace_bytes(name: str, old: bytes, new: bytes, count: int = 1) -> Callable[[Path], None]:
    def corrupt(run_dir: Path) -> None:
        path = run_dir / name
        path.write_bytes(path.read_bytes().replace(old, new, count))
    return corrupt


def write_bytes(name: str, data: bytes) -> Callable[[Path], None]:
    def corrupt(run_dir: Path) -> None:
        (run_dir / name).write_bytes(data)
    return corrupt


def truncate(name: str, size: int) -> Callable[[Path], None]:
    def corrupt(run_dir: Path) -> None:
        (run_dir / name).write_bytes((run_dir / name).read_bytes()[:size])
    return corrupt


def config_dir(run_dir: Path) -> None:
    (run_dir / "config.yaml").unlink()
    (run_dir / "config.yaml").mkdir()


DONE = "; summary status: completed"
STATUSES = "running, completed, failed, interrupted"
MALFORMED = {  # id: (corruption, status detail)
    "summary wall_time str": (edit_summary(wall_time="abc"),
                              f'summary.json: wall_time is "abc", not a finite number{DONE}'),
    "summary final list": (edit_summary(final=[1]),
                           f"summary.json: final is [1], not an object{DONE}"),
    "summary final entry str": (edit_summary(final={"test/acc": "abc", "test/loss": 0.2}),
                                f'summary.json: final["test/acc"] is "abc", not a number{DONE}'),
    "summary choices list": (edit_summary(choices=[1]),
                             f"summary.json: choices is [1], not an object{DONE}"),
    "summary choice dict": (edit_summary(choices={"optimizer": {"a": 1}}),
                            f'summary.json: choices["optimizer"] is {{"a": 1}}, not an option '
                            f"name{DONE}"),
    "summary seed str": (edit_summary(seed="abc"),
                         f'summary.json: seed is "abc", not an integer{DONE}'),
    "summary best str": (edit_summary(best="x"), f'summary.json: best is "x", not an object{DONE}'),
    "summary status unknown": (edit_summary(status="done"),
                               f'summary.json: status is "done", not one of {STATUSES}'),
    "summary without status": (write_bytes("summary.json", b'{"seed": 0, "status": null}'),
                               "summary.json: no status"),
    "summary two problems": (edit_summary(seed=True, wall_time=[]),
                             f"summary.json: seed is true, not an integer (+1 more){DONE}"),
    "summary top-level list": (write_bytes("summary.json", b"[1, 2]"),
                               "summary.json: a JSON array, not an object"),
    "summary binary": (write_bytes("summary.json", PNG + bytes(range(256))),
                       "summary.json: invalid UTF-8 at byte 0"),
    "summary invalid UTF-8": (replace_bytes("summary.json", b"completed", b"compl\xe9ted"),
                              "summary.json: invalid UTF-8 at byte 17"),
    "summary cut short": (truncate("summary.json", 20), "summary.json: not JSON "
                          "(Unterminated string starting at column 12)"),
    "record step str": (edit_record(2, step="abc"),
                        f'metrics.jsonl line 2: step is "abc", not an integer{DONE}'),
    "record metric str": (edit_record(4, **{"test/acc": "high"}),
                          f'metrics.jsonl line 4: test/acc is "high", not a number{DONE}'),
    "record metric null": (edit_record(3, **{"train/loss": None}),
                           f"metrics.jsonl line 3: train/loss is null, not a number{DONE}"),
    "record time inf": (edit_record(1, time=math.inf),
                        f"metrics.jsonl line 1: time is Infinity, not a finite number{DONE}"),
    "records invalid UTF-8": (replace_bytes("metrics.jsonl", b"train/loss", b"train/lo\xffss"),
                              f"metrics.jsonl line 1: invalid UTF-8 at byte 49{DONE}"),
    "record array": (replace_bytes("metrics.jsonl", b"\n", b"\n[1, 2]\n"),
                     f"metrics.jsonl line 2: a JSON array, not an object{DONE}"),
    "records not JSON": (replace_bytes("metrics.jsonl", b'{"step": 150', b'{"step": 150}}', 2),
                         f"metrics.jsonl line 3: not JSON (Extra data at column 14){DONE}"),
    "records two problems": (replace_bytes("metrics.jsonl", b'"epoch"', b'"epoch": 1, ', 2),
                             "metrics.jsonl line 1: not JSON (Expecting property name enclosed "
                             f"in double quotes at column 26) (+1 more){DONE}"),
    "config not YAML": (write_bytes("config.yaml", b"optimizer: [1, 2\n"),
                        "config.yaml: not YAML (did not find expected ',' or ']' at line 2)"
                        + DONE),
    "config bad date": (write_bytes("config.yaml", b"seed: 2024-13-45\n"),
                        f"config.yaml: not YAML (month must be in 1..12){DONE}"),
    "config invalid UTF-8": (write_bytes("config.yaml", b"\xff\xfeseed: 0\n"),
                             f"config.yaml: invalid UTF-8 at byte 0{DONE}"),
    "config list": (write_bytes("config.yaml", b"- 1\n- 2\n"),
                    f"config.yaml: a YAML list, not a mapping{DONE}"),
    "config empty": (write_bytes("config.yaml", b""),
                     f"config.yaml: an empty file, not a mapping{DONE}"),
    "config a directory": (config_dir, f"config.yaml: unreadable (Is a directory){DONE}"),
}


def two_runs(root: Path) -> tuple[Path, Path]:
    """A run to corrupt (seed 0: final test/acc 0.8 after 20 s) and a good one (seed 1)."""
    return make_run(root, "sgd", 0, [0.5, 0.8]), make_run(root, "sgd", 1, [0.6, 0.9])


def rows_by_dir(csv_path: Path) -> dict[str, dict[str, str]]:
    return {row[RUN_DIRS]: row for row in read_csv(csv_path)}


@pytest.mark.parametrize("corrupt, detail", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_run_listed_as_unreadable(tmp_path: Path, capsys: pytest.CaptureFixture,
                                            corrupt: Callable[[Path], None],
                                            detail: str) -> None:
    root = tmp_path / "runs"
    bad, good = two_runs(root)
    corrupt(bad)
    assert main([str(root), "--no-plots"]) == 0
    out = root / "report"
    rows = rows_by_dir(out / "report.csv")
    assert len(rows) == 2
    assert list(next(iter(rows.values())))[:3] == ["model", "optimizer", "status"]  # the keys
    row = rows[os.path.relpath(bad, out)]
    assert row["status"] == f"unreadable({detail})"
    # the readable parts: the final value (summary, else last record), seed, wall time
    assert (float(row["test/acc_mean"]), row["seeds"], row["n"]) == (0.8, "0", "1")
    assert float(row["wall_time_s"]) == 20.0
    other = rows[os.path.relpath(good, out)]  # never averaged with the unreadable run
    assert (other["status"], float(other["test/acc_mean"]), other["n"]) == ("completed", 0.9, "1")
    markdown = (out / "report.md").read_text()
    assert f"| 0.8000 | 1 | 0 | 20s | unreadable({detail}) |" in markdown
    assert "2 runs (1 completed, 1 unreadable)" in markdown
    assert "unreadable" in capsys.readouterr().out


@pytest.mark.parametrize("tail", [b'{"step": 250, "epoch": 2.5, "te', b'{"note": "caf\xc3'])
def test_partial_last_record_is_ignored(tmp_path: Path, tail: bytes) -> None:
    root = tmp_path / "runs"
    bad, _ = two_runs(root)
    with (bad / "metrics.jsonl").open("ab") as stream:
        stream.write(tail)  # a process killed mid-write
    running = make_run(root, "adam", 0, [0.7], status="running")
    with (running / "metrics.jsonl").open("ab") as stream:
        stream.write(tail)
    assert main([str(root), "--no-plots", "--by", "optimizer"]) == 0
    adam, sgd = read_csv(root / "report" / "report.csv")
    assert (sgd["status"], sgd["n"]) == ("completed", "2")
    assert float(sgd["test/acc_mean"]) == pytest.approx(0.85, rel=1e-12)
    assert adam["status"] == "running(step 100/1000)"
    assert len(load_run(running).records) == 2


def test_last_record_without_newline_is_read(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path, "sgd", 0, [0.5, 0.8], status="running")
    path = run_dir / "metrics.jsonl"
    path.write_bytes(path.read_bytes().rstrip(b"\n"))
    run = load_run(run_dir)
    assert run.status == "running(step 200/1000)" and run_value(run, "test/acc") == 0.8


def test_many_malformed_runs_with_plots(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    for seed, (corrupt, _) in enumerate(MALFORMED.values()):
        corrupt(make_run(root, "sgd", seed, [0.5, 0.8]))
    make_run(root, "adam", 0, [0.6, 0.9])
    assert main([str(root)]) == 0
    for axis in ("epoch", "step", "time"):
        assert (root / "report" / f"test-acc_vs_{axis}.png").read_bytes().startswith(PNG)
    assert f"{len(MALFORMED) + 1} runs (" in (root / "report" / "report.md").read_text()
    states = [row["status"].split("(")[0] for row in read_csv(root / "report" / "report.csv")]
    assert states.count("unreadable") == len(MALFORMED) and states.count("completed") == 1


def test_unreadable_pointer_is_a_warning(runs: Path, tmp_path: Path,
                                         capsys: pytest.CaptureFixture) -> None:
    sweep = tmp_path / "sweep"
    (sweep / "0").mkdir(parents=True)
    (sweep / "0" / "run_dir.txt").write_bytes(b"\xff\n")
    (sweep / "1").mkdir()
    target = next((runs / "mlp-sgd").glob("*/seed_0"))
    (sweep / "1" / "run_dir.txt").write_text(f"{target}\n")
    assert find_run_dirs([sweep]) == [target.resolve()]
    assert capsys.readouterr().err == (f"ngexp: warning: {sweep / '0' / 'run_dir.txt'} is "
                                       "unreadable ('utf-8' codec can't decode byte 0xff in "
                                       "position 0: invalid start byte)\n")


# ------------------------------------------------------------------ where the report goes
def test_report_written_in_the_scanned_directory(runs: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture) -> None:
    monkeypatch.chdir(tmp_path)
    assert main([os.path.relpath(runs, tmp_path)]) == 0
    out = (runs / "report").resolve()
    assert {p.name for p in out.iterdir()} == {"report.md", "report.csv", "test-acc_vs_epoch.png",
                                               "test-acc_vs_step.png", "test-acc_vs_time.png"}
    assert not (tmp_path / "report").exists()
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1] == str(out)  # whole, on its own line
    assert lines[-2] == ("wrote report.md, report.csv, test-acc_vs_epoch.png, "
                         "test-acc_vs_step.png, test-acc_vs_time.png to")
    assert main([str(runs), "--no-plots"]) == 0  # its own earlier output is not a run
    assert len(read_csv(out / "report.csv")) == 6


def test_report_location_for_several_paths_a_file_and_out(runs: Path, tmp_path: Path) -> None:
    mine = tmp_path / "mine"
    assert main([str(runs), "--out", str(mine), "--no-plots"]) == 0
    assert (mine / "report.csv").is_file() and not (runs / "report").exists()
    assert main([str(runs / "mlp-sgd"), str(runs / "mlp-adam"), "--no-plots"]) == 0
    assert {r["optimizer"] for r in read_csv(runs / "report" / "report.csv")} == {"sgd", "adam"}
    summary = next((runs / "mlp-kfac").glob("*/seed_0/summary.json"))
    assert default_out([str(summary)]) == summary.parent.resolve() / "report"
    assert default_out([str(runs / "mlp-sgd"), "/dev"]) == (runs / "mlp-sgd" / "report").resolve()


def test_unwritable_out_is_one_line_exit_2(runs: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert main([str(runs), "--out", str(blocker / "report"), "--no-plots"]) == 2
    err = capsys.readouterr().err
    assert err == (f"ngexp: error: cannot write the report to {blocker / 'report'}: "
                   "Not a directory; choose another folder with --out\n")


def test_csv_run_dirs_resolve_after_moving_runs_and_report(tmp_path: Path) -> None:
    study = tmp_path / "study"
    runs_root = study / "runs"
    made = [make_run(runs_root, "sgd", seed, [0.5, 0.8]) for seed in (0, 1)]
    made.append(make_run(runs_root, "adam", 0, [0.5, 0.9]))
    sweep = runs_root / "sweeps" / "2024-01-01_00-00-00"
    for num, run_dir in enumerate(made):
        (sweep / str(num)).mkdir(parents=True)
        (sweep / str(num) / "run_dir.txt").write_text(f"{run_dir.resolve()}\n")
    assert main([str(sweep), "--no-plots"]) == 0
    text = (sweep / "report" / "report.csv").read_text()
    assert str(tmp_path) not in text
    sgd = next(r for r in read_csv(sweep / "report" / "report.csv") if r["optimizer"] == "sgd")
    digest = made[0].parent.name
    assert sgd[RUN_DIRS] == f"../../../mlp-sgd/{digest}/seed_0;../../../mlp-sgd/{digest}/seed_1"

    moved = tmp_path / "archive" / "study-2024"
    moved.parent.mkdir()
    shutil.move(study, moved)  # the runs with their report
    csv_path = moved / "runs" / "sweeps" / sweep.name / "report" / "report.csv"
    found = []
    for row in read_csv(csv_path):
        for relative in row[RUN_DIRS].split(";"):
            run_dir = (csv_path.parent / relative).resolve()
            summary = json.loads((run_dir / "summary.json").read_text())
            assert run_dir.is_relative_to(moved.resolve())
            found.append((summary["choices"]["optimizer"], summary["seed"], row["optimizer"]))
    assert sorted(found) == [("adam", 0, "adam"), ("sgd", 0, "sgd"), ("sgd", 1, "sgd")]


# ------------------------------------------------------------------ numbers for people
@pytest.mark.parametrize("value, text", [
    (0.83, "0.8300"), (0.86264, "0.8626"), (245.31, "245.3"), (10440.3, "10440"),
    (1234567.8, "1234568"), (0.0001234, "0.0001234"), (-1.5, "-1.500"), (0.0, "0"),
    (math.nan, "nan"), (math.inf, "inf"),
])
def test_number_has_four_significant_digits_and_no_exponent(value: float, text: str) -> None:
    assert number(value) == text


@pytest.mark.parametrize("seconds, text", [
    (None, "-"), (3.72, "3.7s"), (42.4, "42s"), (83.2, "1m 23s"), (3599.6, "1h 00m"),
    (7500, "2h 05m"), (273610, "3d 04h"),
])
def test_duration(seconds: float | None, text: str) -> None:
    assert duration(seconds) == text


@pytest.mark.parametrize("values, text", [
    ([0.86264, 0.8627], "0.8627 ± 0.00004"),  # the std to its first significant digit
    ([0.83, 0.83 + 1e-15], "0.8300 ± 0.000000"),  # at most 2 decimals more than the mean
    ([10440.0, 10480.0], "10460 ± 28"),
    ([0.5], "0.5000"),
])
def test_value_cell(values: list[float], text: str) -> None:
    assert value_cell(Row(("sgd",), "completed", values=values)) == text


def test_large_values_and_minutes_in_the_table(tmp_path: Path,
                                               capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "runs"
    for seed, loss in enumerate([10440.0, 10480.0]):
        make_run(root, "sgd", seed, [0.5, 0.8], seconds_per_epoch=41.6,
                 extra_final={"test/loss": loss})
    assert main([str(root), "--no-plots", "--metric", "test/loss", "--by", "optimizer"]) == 0
    line = "| sgd | 10460 ± 28 | 2 | 0,1 | 1m 23s | completed |"
    assert line in (root / "report" / "report.md").read_text()
    printed = capsys.readouterr().out
    assert "10460 ± 28" in printed and "1m 23s" in printed and "e+0" not in printed


# ---------------------------------------------------------------------------- dynamics
def add_dynamics(run_dir: Path, values: dict[str, list[float]], steps: list[int]) -> None:
    """Append one ``dynamics/`` record per step (``values[metric][i]`` at ``steps[i]``)."""
    with (run_dir / "metrics.jsonl").open("a") as stream:
        for i, step in enumerate(steps):
            record = {"step": step, "epoch": step / 100, "time": step / 10,
                      **{metric: series[i] for metric, series in values.items()}}
            stream.write(json.dumps(record) + "\n")


@pytest.fixture
def dynamics_runs(tmp_path: Path) -> Path:
    """sgd: 3 seeds, kfac: 2 seeds, dynamics/tangent/cka (whole model) and a per-layer CKA at
    steps 0, 100, 200; seed 0 of sgd re-logs step 200 (a resume after a crash)."""
    root = tmp_path / "runs"
    for optimizer, seeds in (("sgd", 3), ("kfac", 2)):
        for seed in range(seeds):
            run = make_run(root, optimizer, seed, [0.8, 0.85])
            base = 0.1 * seed + (0.2 if optimizer == "kfac" else 0.0)
            add_dynamics(run, {"dynamics/tangent/cka": [base, base + 0.3, base + 0.5],
                               "dynamics/tangent/fc1/cka": [base, base, base + 0.1],
                               "dynamics/grad/b_simple_avg": [1.0, 10.0, 100.0 + seed]},
                         [0, 100, 200])
            if optimizer == "sgd" and seed == 0:
                add_dynamics(run, {"dynamics/tangent/cka": [0.5]}, [200])
    return root


def test_dynamics_figures_table_and_csv(dynamics_runs: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    assert main([str(dynamics_runs), "--out", str(out)]) == 0
    for metric in ("dynamics/tangent/cka", "dynamics/tangent/fc1/cka",
                   "dynamics/grad/b_simple_avg"):
        figure = out / "dynamics" / f"{metric.replace('/', '-')}_vs_step.png"
        assert figure.read_bytes().startswith(PNG) and figure.stat().st_size > 5000
    text = (out / "report.md").read_text()
    assert "## Dynamics" in text
    # sgd final cka: seeds 0, 1, 2 -> 0.5 (the re-logged value), 0.6, 0.7
    assert ("| [`dynamics/tangent/cka`](dynamics/dynamics-tangent-cka_vs_step.png) | sgd | "
            "0.1000 ± 0.1000 (step 0) | 0.6000 ± 0.1000 (step 200) | 3 |") in text
    assert ("| [`dynamics/tangent/cka`](dynamics/dynamics-tangent-cka_vs_step.png) | kfac | "
            "0.2500 ± 0.0707 (step 0) | 0.7500 ± 0.0707 (step 200) | 2 |") in text
    assert "![dynamics-tangent-cka_vs_step](dynamics/dynamics-tangent-cka_vs_step.png)" in text
    assert "![dynamics-tangent-fc1-cka_vs_step]" not in text  # per layer: linked, not inline
    rows = {(r["quantity"], r["optimizer"]): r for r in read_csv(out / "dynamics.csv")}
    b_simple = rows["dynamics/grad/b_simple_avg", "sgd"]
    assert float(b_simple["last_mean"]) == pytest.approx(101.0, rel=1e-12)
    assert float(b_simple["last_std"]) == pytest.approx(1.0, rel=1e-12)
    assert b_simple["first_steps"] == "0" and b_simple["last_steps"] == "200"
    assert rows["dynamics/tangent/fc1/cka", "kfac"]["first_std"] != ""
    assert float(rows["dynamics/tangent/cka", "sgd"]["last_mean"]) == pytest.approx(0.6)


def test_dynamics_selection_and_no_plots(dynamics_runs: Path, tmp_path: Path) -> None:
    model = tmp_path / "model"
    assert main([str(dynamics_runs), "--out", str(model), "--dynamics", "model"]) == 0
    assert {p.name for p in (model / "dynamics").iterdir()} == {
        "dynamics-tangent-cka_vs_step.png", "dynamics-grad-b_simple_avg_vs_step.png"}
    assert "fc1" not in (model / "report.md").read_text()
    none = tmp_path / "none"
    assert main([str(dynamics_runs), "--out", str(none), "--dynamics", "none"]) == 0
    assert not (none / "dynamics").exists() and not (none / "dynamics.csv").exists()
    assert "## Dynamics" not in (none / "report.md").read_text()
    bare = tmp_path / "bare"
    assert main([str(dynamics_runs), "--out", str(bare), "--no-plots"]) == 0
    text = (bare / "report.md").read_text()
    assert "| `dynamics/tangent/cka` | sgd |" in text and not (bare / "dynamics").exists()
    assert (bare / "dynamics.csv").is_file()


def test_runs_without_dynamics_have_no_dynamics_section(runs: Path, tmp_path: Path) -> None:
    out = tmp_path / "plain"
    assert main([str(runs), "--out", str(out)]) == 0
    assert "## Dynamics" not in (out / "report.md").read_text()
    assert not (out / "dynamics").exists() and not (out / "dynamics.csv").exists()
