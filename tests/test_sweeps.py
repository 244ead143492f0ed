"""Sweeps: GPU claims per job, launcher presets, a real multirun, its report and its re-run."""

from __future__ import annotations

import csv
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import DictConfig

from ngexp.report import main as report_main
from ngexp.train import devices


def installed(module: str) -> bool:
    """Whether ``module`` imports; False also when its parent package is missing."""
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


HAVE_JOBLIB = installed("hydra_plugins.hydra_joblib_launcher")
HAVE_SUBMITIT = installed("hydra_plugins.hydra_submitit_launcher")


def test_claim_gpu_gives_each_process_its_own_gpu(tmp_path: Path) -> None:
    first = devices.claim_gpu(0, 2, tmp_path)
    second = devices.claim_gpu(0, 2, tmp_path)  # GPU 0 is held: the next one
    assert first is not None and second is not None
    assert (first[0], second[0]) == (0, 1)
    assert devices.claim_gpu(5, 2, tmp_path) is None  # all held
    first[1].close()  # the holder exits
    third = devices.claim_gpu(5, 2, tmp_path)
    assert third is not None and third[0] == 0
    second[1].close()
    third[1].close()


def test_assign_device(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(devices, "lock_dir", lambda: tmp_path)
    monkeypatch.setattr(devices, "_held", [])
    assert devices.assign_device(3, num_gpus=0) == "cpu"
    assert devices.assign_device(3, num_gpus=1) == "cuda"
    other = devices.claim_gpu(0, 4, tmp_path)  # another job holds GPU 1 (job 1 % 4)
    assert other is not None and other[0] == 0
    other = devices.claim_gpu(1, 4, tmp_path)
    assert other is not None and other[0] == 1
    assert devices.assign_device(5, num_gpus=4) == "cuda:2"  # 5 % 4 = 1 is held
    assert devices.assign_device(6, num_gpus=4) == "cuda:2"  # this process keeps its GPU
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert devices.physical_id(1) == "5" and devices.physical_id(2) == "2"


def compose(launcher: str, *overrides: str) -> DictConfig:
    from hydra import compose, initialize_config_dir

    from ngexp.cli import conf_dir
    from ngexp.config import register_all
    from ngexp.hydra_compat import VERSION_BASE

    register_all()
    with initialize_config_dir(str(conf_dir()), **VERSION_BASE):
        return compose("train", overrides=[f"hydra/launcher={launcher}", *overrides],
                       return_hydra_config=True)


@pytest.mark.skipif(not HAVE_JOBLIB, reason="pip install ngexp[sweep]")
def test_parallel_preset_composes() -> None:
    launcher = compose("parallel").hydra.launcher
    assert launcher._target_.endswith("JoblibLauncher")
    assert launcher.n_jobs == 2 and launcher.prefer == "processes"


class Submitted(Exception):
    """Raised instead of calling sbatch; carries the executor the launcher built."""


@pytest.mark.skipif(not HAVE_SUBMITIT, reason="pip install ngexp[sweep]")
def test_slurm_preset_submits_a_requeueable_array(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The sbatch script the preset's launcher writes: time limit, GPU, requeue, signal."""
    import submitit
    from hydra.utils import instantiate

    def capture(executor: submitit.AutoExecutor, *args: object) -> None:
        raise Submitted(executor)

    monkeypatch.setattr(submitit.AutoExecutor, "map_array", capture)
    srun = tmp_path / "bin" / "srun"  # submitit looks for srun to accept the slurm cluster
    srun.parent.mkdir()
    srun.write_text("#!/bin/sh\nexit 1\n")
    srun.chmod(0o755)
    monkeypatch.setenv("PATH", f"{srun.parent}{os.pathsep}{os.environ['PATH']}")
    cfg = compose("slurm", f"output_root={tmp_path}", "hydra.launcher.partition=gpu")
    launcher = instantiate(cfg.hydra.launcher)
    launcher.setup(hydra_context=None, task_function=None, config=cfg)
    with pytest.raises(Submitted) as submitted:
        launcher.launch([["seed=0"], ["seed=1"]], initial_job_idx=0)
    executor = submitted.value.args[0]
    script = executor._executor._make_submission_file_text("python job.py", "0")
    for line in ("#SBATCH --time=240", "#SBATCH --gpus-per-node=1", "#SBATCH --requeue",
                 "#SBATCH --signal=USR2@120", "#SBATCH --partition=gpu",
                 "#SBATCH --cpus-per-task=8"):
        assert line in script
    assert executor._executor.max_num_timeout == 5


def ngexp(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # no thread thrash on a busy 2-core box
    return subprocess.run([sys.executable, "-m", "ngexp", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_multirun_report_and_rerun_skips(tmp_path: Path) -> None:
    sweep = ["train", "-m", "optimizer=sgd,adam", "seed=0", "data.subset=2000",
             "trainer.max_steps=30", "trainer.progress=none", f"output_root={tmp_path / 'runs'}"]
    first = ngexp(*sweep, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    (sweep_dir,) = (tmp_path / "runs" / "sweeps").iterdir()
    pointers = sorted(sweep_dir.glob("*/run_dir.txt"))
    assert len(pointers) == 2
    run_dirs = [Path(p.read_text().strip()) for p in pointers]

    assert report_main([str(sweep_dir), "--out", str(tmp_path / "report")]) == 0
    with (tmp_path / "report" / "report.csv").open() as stream:
        rows = list(csv.DictReader(stream))
    assert [(r["optimizer"], r["status"], r["n"], r["seeds"]) for r in rows] == [
        ("adam", "completed", "1", "0"), ("sgd", "completed", "1", "0")]
    assert all(0.5 < float(r["test/acc_mean"]) <= 1 for r in rows)  # learned: chance is 0.1
    for axis in ("epoch", "step", "time"):
        assert (tmp_path / "report" / f"test-acc_vs_{axis}.png").stat().st_size > 5000

    before = {p: p.read_bytes() for d in run_dirs
              for p in (d / "metrics.jsonl", d / "summary.json")}
    launcher = ["hydra/launcher=parallel"] if HAVE_JOBLIB else []
    again = ngexp(*sweep, *launcher, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout.count("skipping") == 2, again.stdout
    assert {p: p.read_bytes() for p in before} == before
