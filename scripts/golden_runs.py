"""Golden runs: the same CLI commands give the same final weights and ``metrics.jsonl``.

Issue 23 restructures the engine, the preconditioners' state and the schedules while keeping
behaviour exactly as it was. This script records, with the code of the day, a set of short
deterministic CPU runs on Fashion-MNIST (``record``), and later checks (``check``) that the
same commands still give bitwise-identical final weights (every tensor of the final
checkpoint's model and optimizer state that the golden run has; state added since is listed)
and identical ``metrics.jsonl`` rows apart from the timing fields. One run is stopped by
SIGTERM part-way and resumed, as a user's killed run is.

    python scripts/golden_runs.py record     # writes results/golden_runs/<run>.json
    python scripts/golden_runs.py check      # prints a table; exit 1 on any difference
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
GOLDEN = REPO / "results" / "golden_runs"
#: Fields of a metrics row that measure time or memory, not behaviour.
TIMING = ("time", "per_s", "_ms", "peak_mem")
COMMON = ("trainer.deterministic=true", "trainer.device=cpu", "trainer.progress=none",
          "data.subset=4096", "trainer.log_every=5")
#: name -> overrides; each run is 100-200 steps.
RUNS: dict[str, tuple[str, ...]] = {
    "mlp_sgd": ("trainer.max_steps=150",),
    "lenet5_kfac": ("model=lenet5", "optimizer=kfac", "trainer.max_steps=100"),
    "mlp_ekfac": ("optimizer=ekfac", "trainer.max_steps=150"),
    "mlp_natural_gradient": ("optimizer=natural_gradient", "trainer.max_steps=100"),
    "mlp_gradual_pruning": ("prune=gradual", "trainer.max_steps=160", "trainer.epochs=5"),
    "lenet5_taylor_filter": ("model=lenet5", "prune=filter", "trainer.max_steps=128",
                             "trainer.epochs=4"),
    "lenet5_variational": ("model=lenet5", "prune=variational_bernoulli",
                           "trainer.max_steps=128", "trainer.epochs=4"),
    "bnlstm_row": ("+experiment=bnlstm_row_fashion_mnist", "trainer.max_steps=100"),
    "mlp_kfac_killed": ("optimizer=kfac", "trainer.max_steps=150", "trainer.log_every=1"),
}
#: Runs stopped by SIGTERM once their metrics reach this step, then resumed.
KILL_AT = {"mlp_kfac_killed": 60}


def is_timing(key: str) -> bool:
    return any(part in key for part in TIMING)


def digest(tensor: torch.Tensor) -> str:
    data = tensor.detach().cpu().contiguous().reshape(-1)
    return hashlib.sha256(str((data.dtype, tuple(tensor.shape))).encode()
                          + data.view(torch.uint8).numpy().tobytes()).hexdigest()[:16]


def tensors(value: Any, path: str = "") -> dict[str, str]:
    """``path -> digest`` of every tensor in nested dicts/lists of a checkpoint."""
    if isinstance(value, torch.Tensor):
        return {path: digest(value)}
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, (list, tuple)):
        items = enumerate(value)
    else:
        return {}
    found: dict[str, str] = {}
    for key, item in items:
        found.update(tensors(item, f"{path}/{key}"))
    return found


def train(overrides: tuple[str, ...], root: Path, kill_at: int | None) -> Path:
    """Run ``ngexp train``; with ``kill_at``, SIGTERM it once ``metrics.jsonl`` reaches that
    step and run the same command again (it resumes). The run directory."""
    command = [sys.executable, "-m", "ngexp", "train", *COMMON, *overrides,
               f"output_root={root}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    if kill_at is not None:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True)
        while process.poll() is None:
            metrics = list(root.rglob("metrics.jsonl"))
            if metrics and any(json.loads(line).get("step", 0) >= kill_at
                               for line in metrics[0].read_text().splitlines() if line):
                process.send_signal(signal.SIGTERM)
                break
            time.sleep(0.05)
        output = process.communicate()[0]
        summary = json.loads(next(root.rglob("summary.json")).read_text())
        if summary["status"] != "interrupted":
            raise SystemExit(f"the run was not interrupted ({summary['status']}):\n{output}")
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stdout}\n{result.stderr}")
    return next(path.parent for path in root.rglob("summary.json"))


def observe(name: str, work: Path) -> dict[str, Any]:
    """The behaviour of run ``name``: its final checkpoint's tensor digests and its metrics rows
    without timing fields."""
    run_dir = train(RUNS[name], work / name, KILL_AT.get(name))
    checkpoint = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    rows = [{key: value for key, value in json.loads(line).items() if not is_timing(key)}
            for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    return {"command": "ngexp train " + " ".join((*COMMON, *RUNS[name])),
            "tensors": tensors({key: checkpoint[key] for key in checkpoint
                                if key not in ("elapsed",)}),
            "metrics": rows}


def new_state(got: dict[str, Any], golden: dict[str, Any]) -> list[str]:
    """The checkpoint's tensors that the golden run did not have (state added since: they
    cannot differ from it), by their top three path levels."""
    added = set(got["tensors"]) - set(golden["tensors"])
    return sorted({"/".join(path.split("/")[:4]) for path in added})


def compare(name: str, got: dict[str, Any], golden: dict[str, Any]) -> str:
    """``""`` when every golden tensor and metrics row is the same, else the first
    difference."""
    for path, value in golden["tensors"].items():
        if got["tensors"].get(path) != value:
            return f"tensor {path}"
    for index, (row, expected) in enumerate(zip(got["metrics"], golden["metrics"], strict=False)):
        if row != expected:
            keys = sorted(k for k in row.keys() | expected.keys() if row.get(k) != expected.get(k))
            return f"metrics row {index}: {', '.join(keys)}"
    if len(got["metrics"]) != len(golden["metrics"]):
        return f"{len(got['metrics'])} metrics rows, golden {len(golden['metrics'])}"
    return ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("record", "check"))
    parser.add_argument("--runs", default=",".join(RUNS), help="comma-separated subset")
    args = parser.parse_args()
    names = args.runs.split(",")
    if unknown := sorted(set(names) - set(RUNS)):
        parser.error(f"--runs: unknown {', '.join(unknown)}; choices: {', '.join(RUNS)}")
    GOLDEN.mkdir(parents=True, exist_ok=True)
    failures = 0
    print(f"| run | {'recorded' if args.mode == 'record' else 'identical to golden'} | tensors "
          "| metrics rows |\n|---|---|---|---|")
    with tempfile.TemporaryDirectory() as work:
        for name in names:
            got = observe(name, Path(work))
            path = GOLDEN / f"{name}.json"
            if args.mode == "record":
                path.write_text(json.dumps(got, indent=None, sort_keys=True) + "\n")
                verdict = "yes"
            else:
                golden = json.loads(path.read_text())
                difference = compare(name, got, golden)
                failures += bool(difference)
                added = new_state(got, golden)
                verdict = f"NO: {difference}" if difference else "yes" + (
                    f" (state added since: {', '.join(added)})" if added else "")
            print(f"| {name} | {verdict} | {len(got['tensors'])} | {len(got['metrics'])} |",
                  flush=True)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
