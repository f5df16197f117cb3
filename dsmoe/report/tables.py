"""The markdown of a report: one run's summary, several runs' comparison (config differences, then results)."""
from __future__ import annotations

import json
from typing import Any

from dsmoe.report.runs import (IGNORED_CONFIG_KEYS, MISSING, EvalPoint, Run, best_validation, config_differences,
                               final_metrics)

def format_metric(value: Any) -> str:
    """A metric or count for a table: 2 decimals for a float, thousands separated for an int."""
    if value is None:
        return MISSING
    if isinstance(value, float):
        return f"{value:.2f}"
    return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value)


def format_value(value: Any) -> str:
    """A config value as YAML would spell it (null, true, [64, 32]), safe inside a markdown table."""
    text = value if isinstance(value, str) else json.dumps(value)
    return text.replace("|", "\\|")


def format_best(best: tuple[str, EvalPoint] | None) -> str:
    """The best validation as ``30.56 (step 72)``."""
    return f"{format_metric(best[1].metrics[best[0]])} (step {best[1].step})" if best else MISSING


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A markdown table of already formatted cells."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def status(run: Run) -> str:
    """finished, or unfinished and how far it got."""
    if run.results is not None:
        return "finished"
    step = run.last_step
    return "unfinished (no results.json" + (f"; last logged step {step})" if step is not None else ")")


def summary_markdown(run: Run, pictures: list[str]) -> str:
    """The run at a glance: where, which method, its results and the pictures drawn of it."""
    best = best_validation(run)
    params = (run.results or {}).get("trainable_parameters")
    lines = [f"# {run.label}", "",
             f"- Run: `{run.path}`",
             f"- Method: {run.method}",
             f"- Status: {status(run)}",
             f"- Model selection: {(run.results or {}).get('model_selection', MISSING)}",
             f"- Best validation: {best[0] + ' ' if best else ''}{format_best(best)}",
             f"- Trainable parameters: {format_metric(params)}"]
    if run.skipped_lines:
        lines.append(f"- Skipped metrics.jsonl lines (not JSON): {', '.join(map(str, run.skipped_lines))}")
    lines += [f"- Warning: {warning.split(': ', 1)[-1]}" for warning in run.warnings if "JSON record" not in warning]
    zero_shot, test = final_metrics(run, "zero_shot"), final_metrics(run, "test")
    names = list(dict.fromkeys([*zero_shot, *test]))
    if names:
        source = "results.json" if run.results is not None else "metrics.jsonl so far"
        rows = [[name, format_metric(zero_shot.get(name)), format_metric(test.get(name))] for name in names]
        lines += ["", f"## Results ({source})", "", markdown_table(["metric", "zero-shot", "test"], rows).rstrip()]
    lines += ["", "## Pictures", ""] + [f"- [{name}]({name})" for name in pictures]
    return "\n".join(lines) + "\n"


def comparison_markdown(runs: list[Run]) -> str:
    """Two tables, columns = runs: the config keys that differ between them, then their results."""
    labels = [run.label for run in runs]
    header = ["key", *labels]
    differences = config_differences([run.config for run in runs])
    lines = ["# Comparison", ""] + [f"- {run.label}: `{run.path}`" for run in runs] + ["", "## Config differences", ""]
    if differences:
        lines.append(markdown_table(header, [[f"`{key}`", *map(format_value, values)]
                                             for key, values in differences.items()]))
    else:
        lines += ["The configs are the same (" + ", ".join(sorted(IGNORED_CONFIG_KEYS)) + " aside).", ""]
    lines += ["## Results", "", markdown_table(["", *labels], results_rows(runs))]
    return "\n".join(lines)


def results_rows(runs: list[Run]) -> list[list[str]]:
    """Rows of the results table: status, test metrics, best validation, zero-shot, trainable parameters."""
    cells: dict[str, dict[int, str]] = {"status": {i: status(run) for i, run in enumerate(runs)}}
    finished = [(i, run) for i, run in enumerate(runs) if run.results is not None]
    for i, run in finished:
        for name, value in final_metrics(run, "test").items():
            cells.setdefault(f"test {name}", {})[i] = format_metric(value)
    for i, run in finished:
        best = best_validation(run)
        if best:
            cells.setdefault(f"best val {best[0]}", {})[i] = format_best(best)
    for i, run in finished:
        for name, value in final_metrics(run, "zero_shot").items():
            cells.setdefault(f"zero-shot {name}", {})[i] = format_metric(value)
    cells["trainable parameters"] = {i: format_metric(run.results.get("trainable_parameters")) for i, run in finished}
    return [[row, *(values.get(i, MISSING) for i in range(len(runs)))] for row, values in cells.items()]
