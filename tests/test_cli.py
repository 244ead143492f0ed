"""Command-line behaviour: help, and one-line errors for every kind of bad input."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO, ngexp, run_dirs


def test_top_level_help_lists_subcommands() -> None:
    out = ngexp("--help").stdout
    assert "train" in out and "report" in out


def test_train_help_lists_groups_and_options() -> None:
    out = ngexp("train", "--help").stdout
    for expected in ("model:", "vgg16", "resnet20", "optimizer:", "sgd*", "data:",
                     "fashion_mnist*", "lr_schedule:", "trainer.epochs"):
        assert expected in out, expected


def test_train_help_examples_name_existing_experiments() -> None:
    out = ngexp("train", "--help").stdout
    named = {name for match in re.findall(r"\+experiment=(\S+)", out) for name in match.split(",")}
    assert named, out
    for name in named:
        assert (REPO / "conf" / "experiment" / f"{name}.yaml").is_file(), name


def test_help_into_a_closed_pipe_has_no_traceback() -> None:
    """``ngexp train --help | head -1``: the reader closes the pipe after one line."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen([sys.executable, "-m", "ngexp", "train", "--help"], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0)
    assert process.stdout is not None and process.stderr is not None
    process.stdout.close()  # closed before anything is written: the first write fails
    assert process.wait(timeout=60) == 1
    assert process.stderr.read() == b""


@pytest.mark.parametrize(("override", "expected"), [
    ("model=vgg17", ["model='vgg17'", "choices:", "vgg16", "resnet20"]),
    ("optimizer.lr=-1", ["optimizer.lr=-1.0", "> 0"]),
    ("optimizer.lr=abc", ["optimizer.lr=abc", "Float"]),
    ("optimizer.foo=1", ["optimizer.foo", "valid keys:", "momentum"]),
    ("trainer.precision=fp8", ["trainer.precision='fp8'", "fp32, bf16, fp16"]),
    ("trainer.device=tpu", ["trainer.device='tpu'", "auto, cpu, cuda"]),
    ("data.name=cifar11", ["data.name='cifar11'", "cifar10"]),
    ("lr_schedule=warmup", ["lr_schedule='warmup'", "cosine"]),
])
def test_bad_config_is_one_line_error(override: str, expected: list[str], tmp_path: Path) -> None:
    result = ngexp("train", override, f"output_root={tmp_path}", check=False)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ngexp: error:"), result.stderr
    for text in expected:
        assert text in lines[0]
    assert "Traceback" not in result.stderr
    assert not run_dirs(tmp_path)  # nothing was started


def test_bad_sweep_value_fails_before_any_job(tmp_path: Path) -> None:
    result = ngexp("train", "-m", "optimizer=sgd,nope", f"output_root={tmp_path}", check=False)
    assert result.returncode == 2
    assert "optimizer='nope'" in result.stderr and "rmsprop" in result.stderr
    assert not run_dirs(tmp_path)


def test_missing_data_set_names_where_it_looked(tmp_path: Path) -> None:
    result = ngexp("train", "data=cifar10", f"data.root={tmp_path / 'nowhere'}",
                   f"output_root={tmp_path}", check=False)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "cifar10" in lines[0] and "nowhere" in lines[0]
    assert "data.download=true" in lines[0]


def test_unknown_subcommand(tmp_path: Path) -> None:
    result = ngexp("trian", check=False)
    assert result.returncode == 2 and "choices: train, report" in result.stderr
