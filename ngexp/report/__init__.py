"""``ngexp report``: aggregate run directories into tables (terminal, Markdown, CSV) and plots.

Each row groups the completed runs that share the values of the ``--by`` keys (default: the
config keys that tell the runs apart) and shows one metric as mean ± sample std (ddof=1) over
them; a single run shows its value alone. Failed, interrupted, running, stale and unfinished
runs get one row each with their status and are never mixed into a mean; so do unreadable runs
(a file that is not UTF-8, JSON or YAML, or a value of the wrong type), with what is wrong.

With ``--target``/``--target-from``, each group's time to target and performance profiles
(:mod:`ngexp.report.target`); with ``--score`` also the AlgoPerf benchmark score
(:mod:`ngexp.report.score`).

The ``dynamics/`` quantities of the instrument callbacks get a figure each against step and a
table of their first and last values (:mod:`ngexp.report.dynamics`; ``--dynamics`` selects).

Output: ``--out``, else ``report/`` in the scanned directory (with several paths, in their
deepest common directory, or in the first one's when they share none but the root).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import NoReturn

from rich.console import Console

from ngexp.errors import UserError
from ngexp.metrics import LOWER_IS_BETTER
from ngexp.report import dynamics
from ngexp.report.aggregate import (
    Row,
    aggregate,
    auto_keys,
    check_keys,
    default_metric,
    metric_names,
)
from ngexp.report.scan import Run, find_run_dirs, load_run
from ngexp.report.score import algoperf_score
from ngexp.report.tables import RUN_DIRS, console_table, markdown, write_csv
from ngexp.report.target import MEASURES, TargetReport, time_to_target


class _Parser(argparse.ArgumentParser):
    """Bad arguments: one line ``ngexp: error: ...`` and exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"ngexp: error: {message} (see ngexp report --help)\n")


def parser() -> argparse.ArgumentParser:
    p = _Parser(
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
    p.add_argument("--out", type=Path,
                   help="folder for report.md, report.csv and the plots (default: report/ in "
                        "the scanned directory; with several, in their common directory)")
    p.add_argument("--no-plots", action="store_true", help="write no PNG figures")
    target = p.add_mutually_exclusive_group()
    target.add_argument("--target", metavar="METRIC=VALUE",
                        help="time to target: steps, examples and seconds each group takes to "
                             "first reach METRIC=VALUE (e.g. val/loss=0.5), and performance "
                             "profiles (target.csv, performance_profile_*.png)")
    target.add_argument("--target-from", metavar="GROUP",
                        help="time to target where the target is the value of --metric that "
                             "every run of group GROUP (e.g. adam) reaches (the worst of their "
                             "best values)")
    p.add_argument("--score", action="store_true",
                   help="with --target or --target-from: the AlgoPerf benchmark score of each "
                        "group (a submission) over the workloads (data/model; a study per seed, "
                        "its runs the trials): score.csv and a report.md section")
    p.add_argument("--score-measure", choices=MEASURES, default="seconds",
                   help="what --score's time to target is measured in (default: seconds)")
    p.add_argument("--dynamics", choices=dynamics.SELECTIONS, default="all",
                   help="dynamics/ quantities of the instrument callbacks to plot against step "
                        "and tabulate: all (default), model (whole-model ones, no per-layer "
                        "quantities) or none")
    return p


def main(argv: list[str]) -> int:
    options = parser()
    args = options.parse_args(argv)
    if args.score and not (args.target or args.target_from):
        options.error("--score needs a target: --target METRIC=VALUE or --target-from GROUP")
    try:
        report(args, argv)
    except (UserError, OSError) as error:
        print(f"ngexp: error: {error}", file=sys.stderr)
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
    summaries = dynamics.summarize(rows, dynamics.select(available, args.dynamics))
    sections: list[TargetReport] = []

    states = Counter(run.state for run in runs)
    counts = ", ".join(f"{n} {state}" for state, n in
                       sorted(states.items(), key=lambda item: (-item[1], item[0])))
    how = f"best (min for {'/'.join(LOWER_IS_BETTER)}, else max)" if args.best else "final"
    intro = [f"`ngexp report {' '.join(argv)}`", "",
             f"{len(runs)} runs ({counts}) from " + ", ".join(f"`{p}`" for p in args.paths),
             *provenance(runs), "",
             f"Metric: `{metric}`, the {how} value of each run; a row shows mean ± sample std "
             "(ddof=1) over its runs, a single run its value alone. Runs that did not complete "
             "have a row each and are never averaged in.", "",
             f"report.csv has every value at full precision; its `{RUN_DIRS}` column lists "
             "each row's run directories (`;`-separated) relative to this folder."]
    out = (args.out or default_out(args.paths)).resolve()
    try:
        if args.target or args.target_from:
            out.mkdir(parents=True, exist_ok=True)
            sections.append(time_to_target(rows, keys, args.target, args.target_from, metric,
                                           out, plots=not args.no_plots))
        if args.score:
            sections.append(algoperf_score(rows, keys, args.target, args.target_from, metric,
                                           args.score_measure, out))
        written = write_report(out, rows, keys, metric, args.best, intro, summaries,
                               plots=not args.no_plots,
                               sections=[section.lines for section in sections])
        written += [path for section in sections for path in section.paths]
    except OSError as error:
        raise UserError(f"cannot write the report to {out}: {error.strerror or error}; "
                        "choose another folder with --out") from None

    # on a terminal its width; written to a file or pipe, as wide as the table needs
    console = Console(width=None if sys.stdout.isatty() else 1000)
    console.print(console_table(rows, keys, metric, args.best, f"{len(runs)} runs: {counts}"))
    for section in sections:
        console.print(section.table)
    console.print(f"wrote {', '.join(p.name for p in written)} to", highlight=False,
                  soft_wrap=True)
    print(out, flush=True)  # whole, on its own line, for copying


def default_out(paths: Sequence[str]) -> Path:
    """``report/`` in the deepest directory that holds all ``paths`` (a file's directory for
    a file), or in the first path's when they share none but the file system root."""
    folders = [path if path.is_dir() else path.parent for path in
               (Path(p).resolve() for p in paths)]
    common = Path(os.path.commonpath(folders))
    if len(folders) > 1 and common == Path(common.anchor):
        common = folders[0]
    return common / "report"


def write_report(out: Path, rows: Sequence[Row], keys: Sequence[str], metric: str, best: bool,
                 intro: Sequence[str], summaries: Sequence[dynamics.Summary],
                 plots: bool, sections: Sequence[Sequence[str]] = ()) -> list[Path]:
    """report.md (with the lines of ``sections`` at its end), report.csv, dynamics.csv (with
    ``summaries``) and (with ``plots``) the figures in ``out``; their paths."""
    out.mkdir(parents=True, exist_ok=True)
    figures: list[Path] = []
    curves: dict[str, Path] = {}
    if plots:
        from ngexp.report.plots import plot_all, plot_dynamics

        figures = plot_all(rows, keys, metric, best, out)
        curves = plot_dynamics(rows, keys, list(dict.fromkeys(s.metric for s in summaries)),
                               out)
    extra = dynamics.markdown_section(summaries, keys, curves) + [
        line for section in sections for line in ["", *section]]
    (out / "report.md").write_text(markdown(rows, keys, metric, best, intro, figures, extra),
                                   encoding="utf-8")
    write_csv(out / "report.csv", rows, keys, metric)
    written = [out / "report.md", out / "report.csv"]
    if summaries:
        dynamics.write_csv(out / "dynamics.csv", summaries, keys)
        written.append(out / "dynamics.csv")
    return [*written, *figures, *curves.values()]


def provenance(runs: list[Run]) -> list[str]:
    """Devices, library versions and git commits of the runs (from their summary.json)."""
    def distinct(values: Iterable[str | None]) -> str:
        return "; ".join(sorted({v for v in values if v})) or "unknown"

    versions = distinct(", ".join(f"{k} {v}" for k, v in
                                  (run.summary.get("versions") or {}).items()) for run in runs)
    return [f"- device: {distinct(run.summary.get('device') for run in runs)}",
            f"- versions: {versions}",
            f"- git commit: {distinct((run.summary.get('git_commit') or '')[:12] for run in runs)}"]
