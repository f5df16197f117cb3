"""Pictures and tables of training runs: ``python -m dsmoe.report RUN [RUN ...] [--out DIR]``.

RUN is a run folder (the one holding ``metrics.jsonl``); it need not have finished.

One run: ``losses.png`` (each loss term over steps), ``lr.png``, ``eval.png`` (zero-shot, validation and test
metrics), ``routing.png`` and ``balance.png`` (runs with experts: expert load per layer, router balance over time)
and ``summary.md``, written to ``RUN/report/`` or ``--out DIR``.

Several runs: ``losses.png`` (the loss terms they share, one line per run), ``eval.png`` (validation curves),
``lr.png`` and ``comparison.md`` (the config keys whose values differ, then the results; "—" for a run without
results.json), written to ``--out DIR`` (default: ``./dsmoe-report``).

A sweep (a folder written by ``python -m dsmoe.sweep``, holding ``sweep.json``): ``table.md`` (each row's test
metrics as mean ± std over its seeds, the untrained model, trainable parameters, training time, the best row and
those within one std of it; also printed) and ``rows.png`` (the ranking metric per row with error bars), written to
``SWEEP_DIR/report/`` or ``--out DIR``.

Each written path is printed, one a line.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from dsmoe.report.figures import balance_figure, eval_figure, losses_figure, lr_figure, routing_figure, save
from dsmoe.report.runs import ReportError, Run, eval_metric_names, load_run, run_labels, shared_keys
from dsmoe.report.tables import comparison_markdown, summary_markdown

if TYPE_CHECKING:
    from matplotlib.figure import Figure



def report_run(run: Run, out_dir: Path) -> list[Path]:
    """One run's pictures (those it has data for) and summary.md, in ``out_dir``; returns the written paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    figures: dict[str, Callable[[], Figure]] = {}
    if run.losses:
        figures["losses.png"] = lambda: losses_figure([run])
    if run.lr.steps:
        figures["lr.png"] = lambda: lr_figure([run])
    if eval_metric_names([run]):
        figures["eval.png"] = lambda: eval_figure([run])
    if run.routing:
        figures["routing.png"] = lambda: routing_figure(run)
        figures["balance.png"] = lambda: balance_figure(run)
    written = [save(draw(), out_dir / name) for name, draw in figures.items()]
    summary = out_dir / "summary.md"
    summary.write_text(summary_markdown(run, [path.name for path in written]), encoding="utf-8")
    return [*written, summary]


def report_runs(runs: list[Run], out_dir: Path) -> list[Path]:
    """Several runs' overlaid curves (what they share) and comparison.md, in ``out_dir``; returns the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    figures: dict[str, Callable[[], Figure]] = {}
    if shared_keys([list(run.losses) for run in runs]):
        figures["losses.png"] = lambda: losses_figure(runs)
    if any(run.lr.steps for run in runs):
        figures["lr.png"] = lambda: lr_figure(runs)
    if eval_metric_names(runs, ("val",)):
        figures["eval.png"] = lambda: eval_figure(runs, events=("val", "test"))
    else:
        print("note: the runs share no validation metric; eval.png not drawn", file=sys.stderr)
    written = [save(draw(), out_dir / name) for name, draw in figures.items()]
    comparison = out_dir / "comparison.md"
    comparison.write_text(comparison_markdown(runs), encoding="utf-8")
    return [*written, comparison]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dsmoe.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, metavar="RUN",
                        help="run folder (holds metrics.jsonl), or one sweep folder (holds sweep.json)")
    parser.add_argument("--out", type=Path, default=None, metavar="DIR",
                        help="output folder (default: RUN/report for one run, ./dsmoe-report for several)")
    args = parser.parse_args(argv)
    try:
        if len(args.runs) == 1 and (args.runs[0] / "sweep.json").is_file():
            from dsmoe.report.sweep import report_sweep

            for path in report_sweep(args.runs[0], args.out or args.runs[0] / "report"):
                print(path)
            return 0
        runs = [load_run(path) for path in args.runs]
        for run, label in zip(runs, run_labels([run.path for run in runs])):
            run.label = label
        if len(runs) == 1:
            written = report_run(runs[0], args.out or runs[0].path / "report")
        else:
            written = report_runs(runs, args.out or Path("dsmoe-report"))
    except (ReportError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0
