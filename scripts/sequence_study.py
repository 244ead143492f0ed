"""Tables of a BN-LSTM comparison (results/bnlstm_*.md) from its run directories.

Groups the completed runs under PATHS by task (``data`` choice and ``data.downsample``), model
and ``model.gamma_init``; per group and per evaluation step, the mean +- sample std over seeds
of ``--metric`` (validation accuracy by default), the final test accuracy, and, for runs with
``callbacks=[gradient_flow]``, the gradient norm reaching the first and the last hidden state
and their ratio at the first and the last measurement (the paper's gradient-flow argument).
Prints Markdown.

    python scripts/sequence_study.py results/runs/bnlstm_t196 --no-flow
    python scripts/sequence_study.py results/runs/bnlstm_gamma
"""

from __future__ import annotations

import argparse
import statistics
from collections import defaultdict
from collections.abc import Sequence

from ngexp.report.aggregate import series
from ngexp.report.scan import Run, find_run_dirs, load_run

FLOW = "dynamics/flow/"


def cell(values: Sequence[float], scale: float = 100.0, digits: int = 1) -> str:
    """``mean ± std`` (sample std over seeds) of ``values`` times ``scale``."""
    if not values:
        return "-"
    mean = statistics.fmean(values) * scale
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values) * scale:.{digits}f}"


def group_of(run: Run) -> tuple[str, str, str]:
    """(task, model, gamma): e.g. ``("pseq_fashion_mnist 14x14", "bnlstm", "0.1")``."""
    size = run.config.get("data.downsample") or 28
    gamma = run.config.get("model.gamma_init")
    bn = run.config.get("model.bn")
    return (f"{run.choices.get('data')} {size}x{size}", str(run.choices.get("model")),
            "-" if bn == "none" or gamma is None else f"{gamma:g}")


def flow_endpoints(run: Run) -> dict[str, tuple[float, float]]:
    """First and last measured value of each whole-run flow quantity."""
    found = {}
    for key in ("grad_h_t1", "first_over_last"):
        _, values = series(run, FLOW + key, "step")
        if len(values):
            found[key] = (float(values[0]), float(values[-1]))
    last = [k for r in run.records for k in r if k.startswith(FLOW + "grad_h_t")]
    if last:
        final = max(last, key=lambda k: int(k.removeprefix(FLOW + "grad_h_t")))
        _, values = series(run, final, "step")
        found["grad_h_tT"] = (float(values[0]), float(values[-1]))
    return found


def tables(runs: list[Run], metric: str, flow: bool = True) -> str:
    groups: dict[tuple[str, str, str], list[Run]] = defaultdict(list)
    for run in runs:
        groups[group_of(run)].append(run)
    lines: list[str] = []
    for task in sorted({key[0] for key in groups}):
        keys = sorted(key for key in groups if key[0] == task)
        epochs = sorted({round(float(e), 2) for key in keys for run in groups[key]
                         for e in series(run, metric, "epoch")[0]})
        lines += [f"### {task}: {metric} (%) by epoch, final test/acc (%)", "",
                  "| model | gamma_init | seeds | " + " | ".join(f"ep {e:g}" for e in epochs)
                  + " | test/acc | wall (s) |",
                  "|---|---|---:|" + "---:|" * len(epochs) + "---:|---:|"]
        for key in keys:
            members = groups[key]
            by_epoch = defaultdict(list)
            for run in members:
                for epoch, value in zip(*series(run, metric, "epoch"), strict=True):
                    by_epoch[round(float(epoch), 2)].append(float(value))
            tests = [v[-1] for run in members if len(v := series(run, "test/acc", "step")[1])]
            walls = [run.wall_time for run in members if run.wall_time is not None]
            lines.append(f"| {key[1]} | {key[2]} | {len(members)} | "
                         + " | ".join(cell(by_epoch.get(e, [])) for e in epochs)
                         + f" | {cell(tests)} | {statistics.fmean(walls):.0f} |")
        flows = {key: [flow_endpoints(run) for run in groups[key]] for key in keys}
        if flow and any(f for values in flows.values() for f in values):
            lines += ["", f"### {task}: gradient flow, first -> last measurement", "",
                      "Norms of dL/dh_1 and dL/dh_T and their ratio, mean ± std over seeds "
                      "(probe of 256 training sequences):", "",
                      "| model | gamma_init | dL/dh_1 | dL/dh_T | dL/dh_1 / dL/dh_T |",
                      "|---|---|---|---|---|"]
            for key in keys:
                found = [f for f in flows[key] if f]
                if not found:
                    continue

                def span(name: str, runs: list[dict[str, tuple[float, float]]] = found) -> str:
                    first = [f[name][0] for f in runs]
                    last = [f[name][1] for f in runs]
                    return (f"{cell(first, 1, 3 if name == 'first_over_last' else 4)} -> "
                            f"{cell(last, 1, 3 if name == 'first_over_last' else 4)}")

                lines.append(f"| {key[1]} | {key[2]} | {span('grad_h_t1')} | "
                             f"{span('grad_h_tT')} | {span('first_over_last')} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+")
    parser.add_argument("--metric", default="val/acc")
    parser.add_argument("--flow", action=argparse.BooleanOptionalAction, default=True,
                        help="the gradient-flow table (runs with callbacks=[gradient_flow])")
    args = parser.parse_args()
    runs = [run for run in map(load_run, find_run_dirs(args.paths)) if run.completed]
    print(tables(runs, args.metric, args.flow))


if __name__ == "__main__":
    main()
