"""What a user sees: console lines and summary, TensorBoard's HParams records, the loggers'
files, early stopping, epochs vs max_steps, Hydra's habits and the help text."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from ngexp.cli import describe, main, train_help
from ngexp.config import LIST_GROUPS, register_all
from ngexp.options import REGISTRY
from ngexp.train.console import format_duration, format_number
from tests.helpers import ngexp, read_metrics, read_summary, requires_fashion_mnist, run_dirs

#: 2000 examples, batch 128: 15 steps per epoch.
SMALL = ["data.subset=2000", "trainer.batch_size=128", "trainer.log_every=5",
         "trainer.device=cpu"]


def train(root: Path, capsys: pytest.CaptureFixture, *extra: str) -> tuple[int, str, str]:
    rc = main(["train", *SMALL, *extra, f"output_root={root}"])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def hparams_records(run: Path) -> list:
    """The HParams plugin records (experiment, session start, session end) of a run's events."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.plugins.hparams import plugin_data_pb2

    found = []
    for path in sorted((run / "tb").glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                if value.metadata.plugin_data.plugin_name == "hparams":
                    found.append(plugin_data_pb2.HParamsPluginData.FromString(
                        value.metadata.plugin_data.content))
    return found


def wandb_records(path: Path) -> list:
    """The protobuf records of an offline W&B run file (LevelDB's log format after W&B's 7-byte
    header: 32 KiB blocks of chunks with a 7-byte header, full or first/middle/last)."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    position, block, pending, records = 7, 32768, b"", []
    while position + 7 <= len(data):
        room = block - position % block
        if room < 7:
            position += room
            continue
        length, kind = struct.unpack("<HB", data[position + 4:position + 7])
        chunk = data[position + 7:position + 7 + length]
        position += 7 + length
        if kind == 0:
            continue
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def scalar_tags(run: Path) -> set[str]:
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    return {value.tag for path in (run / "tb").glob("events.out.tfevents.*")
            for event in EventFileLoader(str(path)).Load() for value in event.summary.value
            if value.metadata.plugin_data.plugin_name != "hparams"}


# ---------------------------------------------------------------------------- console
def test_numbers_are_formatted_for_people() -> None:
    assert format_number(0.81749, "test/acc") == "0.8175"
    assert format_number(245.312) == "245.3"
    assert format_number(0.00012345) == "0.0001234"
    assert format_number(10440.0, "train/examples_per_s") == "10.4k"
    assert format_number(1_204_000.0, "train/examples_per_s") == "1.2M"
    assert format_number(60000.0) == "60,000"
    assert "e" not in format_number(1.5e-7) and format_number(float("nan")) == "nan"
    assert [format_duration(s) for s in (4.21, 83, 7500)] == ["4.2s", "1m 23s", "2h 05m"]


@requires_fashion_mnist
def test_plain_output_labels_every_number_and_summary_is_complete(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rc, out, _ = train(tmp_path, capsys, "trainer.epochs=2", "trainer.progress=plain",
                       "data.val_size=1000")
    assert rc == 0
    lines = out.splitlines()
    train_lines = [line for line in lines if "train/loss" in line and line.startswith("step")]
    eval_lines = [line for line in lines if "val/acc" in line and line.startswith("step")]
    assert train_lines[0].startswith("step 5/30  epoch 0.33  train/loss ")
    assert re.search(r"train/examples_per_s [0-9.]+k?$", train_lines[0]), train_lines[0]
    assert eval_lines[0].startswith("step 15/30  epoch 1.00  val/loss ")
    assert "test/loss" in eval_lines[0] and "test/acc" in eval_lines[0]  # labelled, both splits
    assert not [line for line in lines if "e+0" in line or "e-0" in line]
    [run] = run_dirs(tmp_path)
    assert f"run dir: {run}" in lines  # whole, on its own line
    table = "\n".join(lines[lines.index("summary"):])
    for row in ("completed", "30 / 30", "2.00", "train/loss", "val/acc", "test/acc",
                "best val/acc"):
        assert row in table, row
    best = read_summary(run)["best_step"]["val/acc"]
    assert f"(step {best})" in table
    epochs = {record["step"]: record["epoch"] for record in read_metrics(run)}
    assert epochs[15] == 1.0 and epochs[30] == 2.0  # the same epoch count everywhere


@requires_fashion_mnist
@pytest.mark.parametrize(("epochs", "max_steps", "expected"), [(2, 1000, 30), (5, 10, 10)])
def test_epochs_or_max_steps_whichever_comes_first(epochs: int, max_steps: int, expected: int,
                                                   tmp_path: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    assert train(tmp_path, capsys, f"trainer.epochs={epochs}",
                 f"trainer.max_steps={max_steps}", "trainer.progress=none")[0] == 0
    [run] = run_dirs(tmp_path)
    assert read_summary(run)["step"] == read_summary(run)["total_steps"] == expected


# ---------------------------------------------------------------------------- HParams
@requires_fashion_mnist
def test_sweep_lists_every_run_with_its_hparams_failed_ones_included(tmp_path: Path) -> None:
    """A real sweep: TensorBoard's HParams records of both runs, written from the start, with
    the end status (the diverging lr fails) and no hparam/ clutter (the experiment TensorBoard
    infers from them: tests/test_tensorboard_hparams.py)."""
    ngexp("train", "-m", *SMALL, "trainer.epochs=1", "optimizer.lr=0.05,1e30",
          "optimizer.momentum=0", f"output_root={tmp_path}", check=False)
    runs = run_dirs(tmp_path)
    assert len(runs) == 2
    statuses = {}
    for run in runs:
        records = hparams_records(run)
        assert not [r for r in records if r.HasField("experiment")]  # TensorBoard infers it
        start = next(r.session_start_info for r in records if r.HasField("session_start_info"))
        assert {"optimizer.lr", "optimizer.momentum", "trainer.batch_size", "seed",
                "choice/optimizer", "model.widths", "status"} <= set(start.hparams)
        end = next(r.session_end_info for r in records if r.HasField("session_end_info"))
        statuses[start.hparams["optimizer.lr"].number_value] = end.status
        if start.hparams["optimizer.lr"].number_value == 0.05:  # the other fails at step 1
            assert "test/acc" in scalar_tags(run)
        assert not [tag for tag in scalar_tags(run) if tag.startswith("hparam/")]
    from tensorboard.plugins.hparams import api_pb2

    assert statuses == {0.05: api_pb2.STATUS_SUCCESS, 1e30: api_pb2.STATUS_FAILURE}


# ---------------------------------------------------------------------------- loggers
@requires_fashion_mnist
def test_csv_mlflow_and_wandb_get_the_same_metrics_and_hparams(
        tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc: W&B stays offline
    rc, _, _ = train(tmp_path, capsys, "trainer.epochs=1", "trainer.progress=none",
                     "logger=[tensorboard,csv,mlflow,wandb]")
    assert rc == 0
    [run] = run_dirs(tmp_path)
    records = read_metrics(run)
    names = {key for record in records for key in record} - {"step", "epoch", "time"}

    import csv

    with (run / "csv" / "metrics.csv").open() as stream:
        rows = list(csv.DictReader(stream))
    assert {row["name"] for row in rows} == names
    loss = next(r["train/loss"] for r in records if "train/loss" in r)
    assert float(next(r["value"] for r in rows if r["name"] == "train/loss")) == loss
    with (run / "csv" / "hparams.csv").open() as stream:
        assert dict(csv.reader(stream))["optimizer.lr"] == "0.05"
    assert (run / "csv" / "status.csv").read_text().splitlines()[1].startswith("completed")

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(tmp_path / "mlruns").as_uri())
    mlflow_run = client.get_run((run / "mlflow_run_id").read_text().strip())
    assert mlflow_run.info.status == "FINISHED"
    assert mlflow_run.data.params["optimizer.lr"] == "0.05"
    assert set(mlflow_run.data.metrics) == names
    history = client.get_metric_history(mlflow_run.info.run_id, "train/loss")
    assert [m.step for m in history] == [r["step"] for r in records if "train/loss" in r]

    [offline] = list((run / "wandb").glob("offline-run-*/*.wandb"))  # offline: W&B's log
    assert offline.parent.name.endswith("-" + (run / "wandb_run_id").read_text().strip())
    kinds: dict[str, dict[str, str]] = {"run": {}, "history": {}, "summary": {}}
    losses = []
    for record in wandb_records(offline):
        kind = record.WhichOneof("record_type")
        items = {"run": lambda r: r.run.config.update, "history": lambda r: r.history.item,
                 "summary": lambda r: r.summary.update}.get(kind)
        if items is not None:
            values = {item.key or "/".join(item.nested_key): item.value_json
                      for item in items(record)}
            kinds[kind].update(values)
            if kind == "history" and "train/loss" in values:
                losses.append(float(values["train/loss"]))
    assert json.loads(kinds["run"]["optimizer.lr"]) == 0.05
    assert losses == [r["train/loss"] for r in records if "train/loss" in r]
    assert names <= set(kinds["history"]) and kinds["summary"]["ngexp/status"] == '"completed"'


def test_missing_optional_logger_gives_the_install_line(monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    from ngexp.errors import UserError
    from ngexp.train.loggers.mlflow import MLflowLogger

    real = builtins.__import__

    def without_mlflow(name: str, *args, **kwargs):
        if name.startswith("mlflow"):
            raise ImportError(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without_mlflow)
    with pytest.raises(UserError, match=r"pip install 'ngexp\[mlflow\]'"):
        MLflowLogger()


# ---------------------------------------------------------------------------- callbacks
@requires_fashion_mnist
def test_early_stopping_ends_the_run_when_the_metric_stalls(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rc, out, _ = train(tmp_path, capsys, "trainer.epochs=5", "trainer.progress=plain",
                       "callbacks=[early_stopping]", "callbacks.early_stopping.patience=2",
                       "callbacks.early_stopping.min_delta=1.0")  # nothing improves by 1.0
    assert rc == 0
    [run] = run_dirs(tmp_path)
    summary = read_summary(run)
    assert summary["status"] == "completed" and summary["step"] == 45  # 3 of 5 epochs
    assert summary["reason"].startswith("early stop: test/acc did not improve by more than 1.0")
    assert "early stop" in out
    again = train(tmp_path, capsys, "trainer.epochs=5", "callbacks=[early_stopping]",
                  "callbacks.early_stopping.patience=2", "callbacks.early_stopping.min_delta=1.0")
    assert "skipping" in again[1]  # a finished run


# ---------------------------------------------------------------------------- Hydra
@requires_fashion_mnist
def test_hydra_run_dir_is_the_run_directory_with_hydra_files_and_a_log(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    target = tmp_path / "here"
    rc, out, _ = train(tmp_path / "root", capsys, "trainer.epochs=1", f"hydra.run.dir={target}")
    assert rc == 0 and f"run dir: {target}" in out
    assert read_summary(target)["status"] == "completed"
    assert {p.name for p in (target / ".hydra").iterdir()} == {"config.yaml", "hydra.yaml",
                                                               "overrides.yaml"}
    assert "trainer.epochs=1" in (target / ".hydra" / "overrides.yaml").read_text()
    log = (target / "train.log").read_text()
    assert "step 15/15" in log and "test/acc" in log
    assert not (tmp_path / "root").exists()


def test_hydra_help_and_missing_launcher_plugin() -> None:
    from hydra.errors import MissingConfigException

    result = ngexp("train", "--hydra-help")
    assert "hydra.run.dir=DIR" in result.stdout and "schema/" not in result.stdout
    error = MissingConfigException("missing", missing_cfg_file="hydra/launcher/joblib")
    assert describe(error, []) == ("hydra/launcher=parallel needs Hydra's joblib launcher "
                                   "plugin: pip install 'ngexp[sweep]'")


@requires_fashion_mnist
def test_sweep_output_has_no_hydra_prefix_on_ngexp_lines(tmp_path: Path) -> None:
    result = ngexp("train", "-m", *SMALL, "trainer.max_steps=3", "seed=0,1",
                   f"output_root={tmp_path}")
    ours = [line for line in (result.stdout + result.stderr).splitlines()
            if "run dir:" in line or line.startswith(("ngexp", "step "))]
    assert ours and not [line for line in ours if "[HYDRA]" in line]


def test_help_lists_every_setting_of_every_schema() -> None:
    register_all()
    text = train_help()
    for group, specs in REGISTRY.items():
        for name, spec in specs.items():
            node = f"{group}.{name}" if group in LIST_GROUPS else group  # callbacks.NAME.key
            for option in spec.options():
                assert f"{node}.{option.name}=" in text, f"{node}.{option.name}"
    assert "trainer.epochs=5" in text  # the composed defaults, not only the schemas'
    assert "$NGEXP_DATA" in text
