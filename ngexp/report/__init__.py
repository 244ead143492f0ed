"""``ngexp report``: aggregate run directories into tables (terminal, Markdown, CSV) and plots.

Each row groups the completed runs that share the values of the ``--by`` keys (default: the
config keys that tell the runs apart) and shows one metric as mean ± sample std (ddof=1) over
them; a single run shows its value alone. Failed, interrupted, running, stale and unfinished
runs get one row each with their status and are never mixed into a mean.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from rich.console import Console

from ngexp.errors import UserError
from ngexp.metrics import LOWER_IS_BETTER
from ngexp.report.aggregate import aggregate, auto_keys, check_keys, default_metric, metric_names
from ngexp.report.scan import Run, find_run_dirs, load_run
from ngexp.report.tables import console_table, markdown, write_csv


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ngexp report",
        description="Aggregate run directories (searched recursively; sweep dirs' run_dir.txt "
                    "pointers followed) into a table and plots.")
    p.add_argument("paths", nargs="+", help="run directories, sweep directories or any parent")
    p.add_argument("--by", help="comma-separated grouping keys: a config group (optimizer = the "
                                "chosen option) or a dotted config key (optimizer.lr); "
                                "default: the keys whose values differ between runs")
    p.add_argument("--metric", help="metric to report (default: test/acc, else test/loss)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--final", dest="best", action="store_false",
                      help="each run's final value (default)")
    mode.add_argument("--best", dest="best", action="store_true",
                      help=f"each run's best value: min for {'/'.join(LOWER_IS_BETTER)} "
                           "metrics, max otherwise")
    p.set_defaults(best=False)
    p.add_argument("--out", type=Path, default=Path("report"),
                   help="folder for report.md, report.csv and the plots (default: ./report)")
    p.add_argument("--no-plots", action="store_true", help="write no PNG figures")
    return p


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    try:
        report(args, argv)
    except (UserError, OSError) as error:
        print(f"ngexp report: {error}", file=sys.stderr)
        return 2
    return 0


def report(args: argparse.Namespace, argv: list[str]) -> None:
    runs = [load_run(path) for path in find_run_dirs(args.paths)]
    available = metric_names(runs)
    metric = args.metric or default_metric(available)
    if args.metric and available and metric not in available:
        raise UserError(f"--metric {metric!r} was logged by no run; choices: "
                        + ", ".join(available))
    keys = [k.strip() for k in args.by.split(",") if k.strip()] if args.by else auto_keys(runs)
    if message := check_keys(runs, keys):
        raise UserError(message)
    rows = aggregate(runs, keys, metric, args.best)

    states = Counter(run.state for run in runs)
    counts = ", ".join(f"{n} {state}" for state, n in states.most_common())
    how = f"best (min for {'/'.join(LOWER_IS_BETTER)}, else max)" if args.best else "final"
    intro = [f"`ngexp report {' '.join(argv)}`", "",
             f"{len(runs)} runs ({counts}) from " + ", ".join(f"`{p}`" for p in args.paths),
             *provenance(runs), "",
             f"Metric: `{metric}`, the {how} value of each run; a row shows mean ± sample std "
             "(ddof=1) over its runs, a single run its value alone. Runs that did not complete "
             "have a row each and are never averaged in."]
    args.out.mkdir(parents=True, exist_ok=True)
    plots = []
    if not args.no_plots:
        from ngexp.report.plots import plot_all

        plots = plot_all(rows, keys, metric, args.best, args.out)
    (args.out / "report.md").write_text(markdown(rows, keys, metric, args.best, intro, plots))
    write_csv(args.out / "report.csv", rows, keys, metric)

    console = Console()
    console.print(console_table(rows, keys, metric, args.best, f"{len(runs)} runs: {counts}"))
    written = ", ".join(p.name for p in [Path("report.md"), Path("report.csv"), *plots])
    console.print(f"wrote {written} to {args.out}", highlight=False)


def provenance(runs: list[Run]) -> list[str]:
    """Devices, library versions and git commits of the runs (from their summary.json)."""
    def distinct(values: Iterable[str | None]) -> str:
        return "; ".join(sorted({v for v in values if v})) or "unknown"

    versions = distinct(", ".join(f"{k} {v}" for k, v in
                                  (run.summary.get("versions") or {}).items()) for run in runs)
    return [f"- device: {distinct(run.summary.get('device') for run in runs)}",
            f"- versions: {versions}",
            f"- git commit: {distinct((run.summary.get('git_commit') or '')[:12] for run in runs)}"]
