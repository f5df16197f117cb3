"""A run folder as plain Python structures: loss and learning-rate curves, evaluations, routing counts and the
router's balance, config and results; and how several runs' configs differ."""
from __future__ import annotations

import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

# numeric keys of a training step record that are not loss terms
NON_LOSS_KEYS = frozenset({"time", "step", "epoch", "lr", "samples_per_s", "step_s", "data_wait", "bad_samples",
                           "loss_scale", "skipped_steps"})
# numeric keys of an evaluation record that are not metrics
NON_METRIC_KEYS = frozenset({"time", "step", "epoch", "images", "captions"})
EVAL_EVENTS = ("zero_shot", "val", "test")
# config keys that differ between any two runs without saying anything about them
IGNORED_CONFIG_KEYS = frozenset({"train.output_dir", "wandb.name"})
MISSING = "—"


class ReportError(Exception):
    """A run folder that cannot be reported on; the message says why."""



@dataclass
class Series:
    """Values over training steps."""
    steps: list[int] = field(default_factory=list)
    values: list[float] = field(default_factory=list)

    def add(self, step: int, value: float) -> None:
        self.steps.append(step)
        self.values.append(value)


@dataclass
class EvalPoint:
    """One evaluation: its event (``zero_shot``, ``val`` or ``test``), step and top-level numeric metrics."""
    event: str
    step: int
    metrics: dict[str, float]


@dataclass
class RoutingLog:
    """Tokens routed to each expert, per layer, over the logging interval that ends at ``step``."""
    step: int
    counts: dict[str, list[int]]


@dataclass
class Run:
    """What a run folder holds: its curves, evaluations, routing, config and (once finished) results."""
    path: Path
    label: str
    losses: dict[str, Series]
    lr: Series
    evals: list[EvalPoint]
    routing: list[RoutingLog]
    config: dict
    results: dict | None
    skipped_lines: list[int]

    @property
    def method(self) -> str:
        return str(self.config.get("method", "unknown"))

    @property
    def last_step(self) -> int | None:
        steps = [s for series in self.losses.values() for s in series.steps[-1:]] + self.lr.steps[-1:]
        return max(steps) if steps else None


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def read_records(path: Path) -> tuple[list[dict], list[int]]:
    """The JSON objects of a metrics.jsonl file, and the numbers of the lines that are not one (a crash mid-write)."""
    records, bad = [], []
    with path.open(encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                record = None
            if isinstance(record, dict):
                records.append(record)
            else:
                bad.append(number)
    return records, bad


def step_records(records: list[dict]) -> list[dict]:
    """The training step records (those without an ``event``)."""
    return [r for r in records if "event" not in r and is_number(r.get("step"))]


def loss_series(records: list[dict]) -> dict[str, Series]:
    """Each loss term over steps: every numeric key of the step records that is not in NON_LOSS_KEYS."""
    out: dict[str, Series] = {}
    for record in step_records(records):
        for key, value in record.items():
            if key not in NON_LOSS_KEYS and is_number(value):
                out.setdefault(key, Series()).add(record["step"], value)
    return out


def lr_series(records: list[dict]) -> Series:
    """The learning rate over steps."""
    series = Series()
    for record in step_records(records):
        if is_number(record.get("lr")):
            series.add(record["step"], record["lr"])
    return series


def numeric_metrics(record: dict | None) -> dict[str, float]:
    """The top-level numeric metrics of an evaluation (per-language dicts, counts and bookkeeping left out)."""
    return {k: v for k, v in (record or {}).items() if k not in NON_METRIC_KEYS and is_number(v)}


def eval_points(records: list[dict]) -> list[EvalPoint]:
    """The zero-shot, validation and test evaluations, in the order they were logged. A record without a step
    (older runs) takes the step of the last training record before it (0 before any)."""
    points, last_step = [], 0
    for record in records:
        if record.get("event") in EVAL_EVENTS:
            step = record["step"] if is_number(record.get("step")) else last_step
            points.append(EvalPoint(record["event"], int(step), numeric_metrics(record)))
        elif "event" not in record and is_number(record.get("step")):
            last_step = record["step"]
    return points


def routing_logs(records: list[dict]) -> list[RoutingLog]:
    """The routing counts of the step records that have them, by step."""
    logs = []
    for record in step_records(records):
        routing = record.get("routing")
        if not isinstance(routing, dict):
            continue
        counts = {layer: [int(c) for c in values] for layer, values in routing.items()
                  if isinstance(values, list) and values and all(is_number(c) for c in values)}
        if counts:
            logs.append(RoutingLog(int(record["step"]), counts))
    return sorted(logs, key=lambda log: log.step)


def _layer_order(name: str) -> tuple[str, int, str]:
    """``image.10`` sorts after ``image.2``: (encoder, layer index, name)."""
    encoder, _, index = name.rpartition(".")
    return encoder, int(index) if index.isdigit() else -1, name


def encoders(logs: list[RoutingLog]) -> dict[str, list[str]]:
    """Each encoder's layer names (``{"image": ["image.0", ...], "text": [...]}``), in layer order."""
    out: dict[str, list[str]] = {}
    for name in sorted({layer for log in logs for layer in log.counts}, key=_layer_order):
        out.setdefault(name.rpartition(".")[0] or name, []).append(name)
    return out


def summed_counts(logs: list[RoutingLog], layer: str) -> list[int]:
    """A layer's tokens per expert, summed over ``logs``."""
    total: list[int] = []
    for log in logs:
        counts = log.counts.get(layer, [])
        total += [0] * (len(counts) - len(total))
        for expert, count in enumerate(counts):
            total[expert] += count
    return total


def routing_shares(logs: list[RoutingLog], layers: list[str]) -> list[list[float]]:
    """One row per layer: the share of its tokens (over ``logs``) that went to each expert. Rows are padded with
    NaN to the widest layer; a layer that routed no tokens is all NaN."""
    totals = [summed_counts(logs, layer) for layer in layers]
    width = max((len(counts) for counts in totals), default=0)
    rows = []
    for counts in totals:
        total = sum(counts)
        row = [count / total for count in counts] if total else [math.nan] * len(counts)
        rows.append(row + [math.nan] * (width - len(row)))
    return rows


def thirds(logs: list[RoutingLog]) -> tuple[list[RoutingLog], list[RoutingLog]]:
    """The first and the last third of the logs (at least one log each)."""
    size = max(1, math.ceil(len(logs) / 3))
    return logs[:size], logs[-size:]


def imbalance(counts: list[int]) -> float | None:
    """The busiest expert's share over the uniform share (1.0 = balanced); None when no token was routed."""
    total = sum(counts)
    return max(counts) * len(counts) / total if total else None


def load_cv(counts: list[int]) -> float | None:
    """The coefficient of variation of the experts' load, std / mean (0.0 = balanced); None without tokens."""
    mean = sum(counts) / len(counts)
    if not mean:
        return None
    return math.sqrt(sum((c - mean) ** 2 for c in counts) / len(counts)) / mean


def balance_series(logs: list[RoutingLog], stat: Callable[[list[int]], float | None] = imbalance
                   ) -> dict[str, Series]:
    """Per encoder, at each logged step: the mean of ``stat`` over the encoder's layers."""
    out = {}
    for encoder, layers in encoders(logs).items():
        series = Series()
        for log in logs:
            values = [stat(log.counts[layer]) for layer in layers if layer in log.counts]
            values = [v for v in values if v is not None]
            if values:
                series.add(log.step, sum(values) / len(values))
        out[encoder] = series
    return out


def _read_mapping(path: Path, kind: str) -> dict | None:
    """The JSON or YAML object in ``path`` (None when there is no such file)."""
    if not path.is_file():
        return None
    try:
        text = path.read_text(encoding="utf-8")
        data = json.loads(text) if kind == "JSON" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise ReportError(f"{path} is not valid {kind} ({exc})") from None
    if kind == "JSON" and not isinstance(data, dict):
        raise ReportError(f"{path} does not hold a JSON object")
    return data if isinstance(data, dict) else None


def load_run(path: Path | str) -> Run:
    """Read a run folder; a metrics.jsonl line that does not parse is skipped with a warning on stderr."""
    path = Path(path)
    if not path.exists():
        raise ReportError(f"no such run folder: {path}")
    metrics = path / "metrics.jsonl"
    if not metrics.is_file():
        raise ReportError(f"not a run folder: {path} (no metrics.jsonl)")
    records, skipped = read_records(metrics)
    for number in skipped:
        print(f"warning: {metrics} line {number} is not a JSON record; skipped", file=sys.stderr)
    results = _read_mapping(path / "results.json", "JSON")
    config = _read_mapping(path / "config.yaml", "YAML") or (results or {}).get("config") or {}
    return Run(path=path.resolve(), label=path.resolve().name, losses=loss_series(records), lr=lr_series(records),
               evals=eval_points(records), routing=routing_logs(records), config=config, results=results,
               skipped_lines=skipped)


def run_labels(paths: list[Path]) -> list[str]:
    """Each run's folder name, preceded by as many parent folders as it takes to tell same-named runs apart."""
    parts = [Path(p).resolve().parts for p in paths]
    depth = [1] * len(parts)
    while True:
        labels = ["/".join(p[-d:]).lstrip("/") for p, d in zip(parts, depth)]
        clashing = [i for i, label in enumerate(labels) if labels.count(label) > 1 and depth[i] < len(parts[i])]
        if not clashing:
            return labels
        for i in clashing:
            depth[i] += 1


def selection_metric(run: Run) -> str | None:
    """The metric the run selected its model by ("best validation R1 (...)" -> R1), else R1 or mAR if logged."""
    match = re.match(r"best validation (\S+)", str((run.results or {}).get("model_selection", "")))
    if match:
        return match.group(1)
    names = [name for point in run.evals if point.event == "val" for name in point.metrics]
    return next((name for name in ("R1", "mAR") if name in names), names[0] if names else None)


def best_validation(run: Run) -> tuple[str, EvalPoint] | None:
    """The selection metric and the validation with its highest value (the first one on a tie)."""
    metric = selection_metric(run)
    points = [p for p in run.evals if p.event == "val" and metric in p.metrics]
    if not points:
        return None
    return metric, max(points, key=lambda p: p.metrics[metric])


def final_metrics(run: Run, event: str) -> dict[str, float]:
    """The zero-shot or test metrics: from results.json, else the last such evaluation in metrics.jsonl."""
    if run.results is not None:
        return numeric_metrics(run.results.get(event))
    points = [p for p in run.evals if p.event == event]
    return points[-1].metrics if points else {}


def flatten(config: dict, prefix: str = "") -> dict[str, Any]:
    """Nested sections as dotted keys: ``{"optim": {"lr": 1e-3}}`` -> ``{"optim.lr": 1e-3}``."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def config_differences(configs: list[dict]) -> dict[str, list[Any]]:
    """The dotted config keys whose values are not the same in every run (a key a run lacks counts as
    different), minus IGNORED_CONFIG_KEYS; ``MISSING`` stands for an absent key."""
    flat = [flatten(config) for config in configs]
    keys = list(dict.fromkeys(key for config in flat for key in config))
    out = {}
    for key in keys:
        values = [config.get(key, MISSING) for config in flat]
        if key not in IGNORED_CONFIG_KEYS and any(v != values[0] for v in values):
            out[key] = values
    return out


def shared_keys(key_lists: list[list[str]]) -> list[str]:
    """The keys found in every non-empty list, in first-seen order."""
    present = [set(keys) for keys in key_lists if keys]
    order = dict.fromkeys(key for keys in key_lists for key in keys)
    return [key for key in order if present and all(key in keys for keys in present)]


def eval_metric_names(runs: list[Run], events: tuple[str, ...] = EVAL_EVENTS) -> list[str]:
    """The metrics of the given evaluations that every run with such evaluations logs."""
    return shared_keys([[name for p in run.evals if p.event in events for name in p.metrics] for run in runs])
