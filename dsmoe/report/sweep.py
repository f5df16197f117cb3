"""A sweep's table (``python -m dsmoe.report SWEEP_DIR``): each row's test metrics as mean ± std over its
finished seeds (and n), the untrained model's row, trainable parameters and training time, the best row marked
and the rows within one standard deviation of it flagged; as markdown and as a plot with error bars.
"""
from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from dsmoe.report.runs import ReportError
from dsmoe.report.tables import format_metric, markdown_table

COUNTS = {"images", "captions"}
PRIMARY = ("mAR", "R1", "rsum")  # the metric a row is ranked by: the first of these that the results have


@dataclass
class RowResult:
    name: str
    runs: int  # in the sweep
    metrics: dict[str, list[float]] = field(default_factory=dict)  # over finished seeds
    zero_shot: dict[str, list[float]] = field(default_factory=dict)
    trainable: set[int] = field(default_factory=set)
    minutes: list[float] = field(default_factory=list)

    @property
    def finished(self) -> int:
        return max((len(v) for v in self.metrics.values()), default=0)


def run_results(run_dir: Path) -> dict | None:
    """A finished run's results.json; for a method with stages (DASD), its last stage's."""
    direct = run_dir / "results.json"
    if direct.is_file():
        return json.loads(direct.read_text())
    staged = {p.parent.name: p for p in run_dir.glob("*/results.json")}
    for path in staged.values():
        cfg = json.loads(path.read_text())["config"]
        stages = cfg.get(cfg["method"], {}).get("stages") or []
        if stages and stages[-1] in staged:
            return json.loads(staged[stages[-1]].read_text())
    return None


def training_minutes(run_dir: Path) -> float:
    """Wall time between the first and the last record of each metrics.jsonl under the run (its stages), summed."""
    total = 0.0
    for path in run_dir.rglob("metrics.jsonl"):
        times = [json.loads(line).get("time") for line in path.read_text().splitlines() if line.strip()]
        times = [t for t in times if isinstance(t, (int, float))]
        if len(times) > 1:
            total += max(times) - min(times)
    return total / 60


def first_zero_shot(run_dir: Path) -> dict | None:
    """The untrained model's scores logged by the run (its first stage's, for a method with stages)."""
    for path in sorted(run_dir.rglob("results.json")):
        zero = json.loads(path.read_text()).get("zero_shot")
        if zero:
            return zero
    return None


def numbers(metrics: dict) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in COUNTS}


def load_sweep_results(folder: Path) -> tuple[str, list[RowResult]]:
    index_path = folder / "sweep.json"
    try:
        index = json.loads(index_path.read_text())
    except (OSError, ValueError) as exc:
        raise ReportError(f"{index_path}: {exc}") from None
    rows = []
    for name, runs in index["rows"].items():
        row = RowResult(name, len(runs))
        for entry in runs:
            run_dir = folder / entry["run_dir"]
            results = run_results(run_dir)
            if results is None:
                continue
            for key, value in numbers(results["test"]).items():
                row.metrics.setdefault(key, []).append(value)
            for key, value in numbers(first_zero_shot(run_dir) or {}).items():
                row.zero_shot.setdefault(key, []).append(value)
            row.trainable.add(int(results["trainable_parameters"]))
            row.minutes.append(training_minutes(run_dir))
        rows.append(row)
    return index["name"], rows


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def sweep_markdown(name: str, rows: list[RowResult]) -> tuple[str, str | None]:
    """The table and the metric its rows are ranked by."""
    done = [row for row in rows if row.finished]
    keys = list(dict.fromkeys(k for row in done for k in row.metrics))
    primary = next((k for k in PRIMARY if k in keys), keys[0] if keys else None)
    best = max(done, key=lambda r: mean_std(r.metrics[primary])[0]) if primary else None
    header = ["row", "n", *keys, "trainable", "train min", ""]
    table = []
    zero = next((row.zero_shot for row in rows if row.zero_shot), None)
    if zero:
        table.append(["untrained (zero-shot)", "—", *(format_metric(mean_std(zero[k])[0]) if k in zero else "—"
                                                     for k in keys), "0", "—", ""])
    for row in rows:
        cells = []
        for key in keys:
            values = row.metrics.get(key)
            cells.append(f"{mean_std(values)[0]:.2f} ± {mean_std(values)[1]:.2f}" if values else "—")
        note = ""
        if row is best:
            note = f"best {primary}"
        elif row.finished and primary in row.metrics:
            (m, s), (bm, bs) = mean_std(row.metrics[primary]), mean_std(best.metrics[primary])
            if bm - m <= max(s, bs):
                note = f"within 1 std of the best {primary}"
        n = f"{row.finished}" + ("" if row.finished == row.runs else f" of {row.runs}")
        trainable = format_metric(next(iter(row.trainable))) if len(row.trainable) == 1 else \
            ("—" if not row.trainable else "varies")
        minutes = f"{statistics.fmean(row.minutes):.1f}" if row.minutes else "—"
        table.append([row.name, n, *cells, trainable, minutes, note])
    text = (f"# Sweep {name}\n\nTest metrics as mean ± std over the seeds that finished (n); std is the sample "
            f"standard deviation. Rows are ranked by {primary}; a row within one std of the best is flagged, as its "
            f"difference from the best is within the seeds' noise.\n\n" + markdown_table(header, table))
    return text, primary


def sweep_figure(name: str, rows: list[RowResult], metric: str):
    """The ranking metric per row with ± one std error bars."""
    from dsmoe.report.figures import _pyplot

    done = [row for row in rows if metric in row.metrics]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(4.0, 1.1 * len(done) + 1.5), 3.6), layout="constrained")
    means = [mean_std(row.metrics[metric]) for row in done]
    ax.bar(range(len(done)), [m for m, _ in means], yerr=[s for _, s in means], capsize=4, color="tab:blue",
           alpha=0.8)
    ax.set_xticks(range(len(done)), [row.name for row in done], rotation=30, ha="right")
    ax.set_ylabel(f"test {metric}")
    ax.set_title(f"{name}: mean ± std over seeds")
    return fig


def report_sweep(folder: Path, out_dir: Path) -> list[Path]:
    """table.md (also printed) and rows.png of the sweep in ``folder``, written to ``out_dir``."""
    from dsmoe.report.figures import save

    name, rows = load_sweep_results(folder)
    if not any(row.finished for row in rows):
        raise ReportError(f"{folder}: no run of the sweep has finished yet")
    text, primary = sweep_markdown(name, rows)
    out_dir.mkdir(parents=True, exist_ok=True)
    table = out_dir / "table.md"
    table.write_text(text, encoding="utf-8")
    print(text)
    return [table, save(sweep_figure(name, rows, primary), out_dir / "rows.png")]
