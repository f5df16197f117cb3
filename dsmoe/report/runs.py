"""A run folder as plain Python structures: loss and learning-rate curves, evaluations, routing counts and the
router's balance, config and results; and how several runs' configs differ."""
from __future__ import annotations

import json
import math
import re
import sys
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
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
    """Values over training steps (compact arrays: a run of a million steps is read in bounded memory)."""
    steps: array = field(default_factory=lambda: array("q"))
    values: array = field(default_factory=lambda: array("d"))

    def add(self, step: int, value: float) -> None:
        self.steps.append(int(step))
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
    warnings: list[str] = field(default_factory=list)

    @property
    def method(self) -> str:
        return str(self.config.get("method", "unknown"))

    @property
    def last_step(self) -> int | None:
        steps = [s for series in (*self.losses.values(), self.lr) for s in series.steps[-1:]]
        return max(steps) if steps else None


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


MAX_ROUTING_LOGS = 4096
"""Routing logs kept per run; past twice this, neighbours are merged (counts summed over both intervals)."""
MAX_SKIPPED_LINES = 100


class _RecordReader:
    """One pass over a run's metrics.jsonl records, keeping only what the report draws: loss and lr curves,
    evaluations and (thinned) routing counts, and what is wrong with the records (non-finite values, steps that
    repeat or go back)."""

    def __init__(self) -> None:
        self.losses: dict[str, Series] = {}
        self.lr = Series()
        self.evals: list[EvalPoint] = []
        self.routing = _RoutingLogs()
        self.skipped: list[int] = []
        self.skipped_count = 0
        self.last_step: float | None = None  # of the last step record
        self.non_finite: dict[str, list] = {}  # key -> [count, first step]
        self.backwards: list = [0, None]  # [count, (line, step, previous step) of the first]

    def add_line(self, number: int, line: str) -> None:
        if not line.strip():
            return
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if not isinstance(record, dict):
            self.skipped_count += 1
            if len(self.skipped) < MAX_SKIPPED_LINES:
                self.skipped.append(number)
            return
        event = record.get("event")
        if event in EVAL_EVENTS:
            step = record["step"] if is_number(record.get("step")) else (self.last_step or 0)
            self.evals.append(EvalPoint(event, int(step), numeric_metrics(record)))
        elif event is None and is_number(record.get("step")):
            self._step(number, record)

    def _step(self, number: int, record: dict) -> None:
        step = record["step"]
        if self.last_step is not None and step <= self.last_step:
            self.backwards[0] += 1
            if self.backwards[1] is None:
                self.backwards[1] = (number, step, self.last_step)
        self.last_step = step
        for key, value in record.items():
            if type(value) not in _COUNT_TYPES or key in ("time", "step"):
                continue
            if not math.isfinite(value):
                self.non_finite.setdefault(key, [0, step])[0] += 1
            if key == "lr":
                self.lr.add(step, value)
            elif key not in NON_LOSS_KEYS:
                self.losses.setdefault(key, Series()).add(step, value)
        routing = record.get("routing")
        if isinstance(routing, dict) and routing:
            self.routing.add(int(step), routing)

    def warnings(self, path: Path) -> list[str]:
        out = []
        if self.skipped_count == 1:
            out.append(f"{path} line {self.skipped[0]} is not a JSON record; skipped")
        elif self.skipped_count:
            shown = ", ".join(map(str, self.skipped)) + (" ..." if self.skipped_count > len(self.skipped) else "")
            out.append(f"{path} lines {shown} are not JSON records ({self.skipped_count} in all); skipped")
        for key, (count, first) in self.non_finite.items():
            out.append(f"{path}: '{key}' is not finite (NaN or infinite) at {count} logged steps, the first at step "
                       f"{first}")
        count, first = self.backwards
        if count:
            line, step, previous = first
            out.append(f"{path}: steps repeat or go back {count} times (the first at line {line}: step {step} after "
                       f"step {previous}): two runs may have written into this folder, or a crashed run's records "
                       f"were not cut")
        return out


_COUNT_TYPES = {int, float}


class _RoutingLogs:
    """Routing logs in step order, at most ``2 * MAX_ROUTING_LOGS``: past that, neighbours are merged and later logs
    are summed in groups as large, so each kept log covers an interval and every count is kept in some sum."""

    def __init__(self) -> None:
        self.logs: list[RoutingLog] = []
        self.group = 1  # logs summed into each kept one
        self.pending: tuple | None = None  # (layers, summed counts, logs in it, last step)

    def add(self, step: int, routing: dict) -> None:
        layers = tuple(routing)
        try:
            counts = np.array(list(routing.values()), dtype=np.float64)
            if counts.ndim != 2 or not counts.size:
                raise ValueError("not a table")
        except (ValueError, TypeError):  # experts differ per layer, or something else: one by one
            self._close()
            checked = {layer: list(map(int, values)) for layer, values in routing.items()
                       if isinstance(values, list) and values and set(map(type, values)) <= _COUNT_TYPES}
            if checked:
                self._keep(RoutingLog(step, checked))
            return
        pending = self.pending
        if pending and pending[0] == layers and pending[1].shape == counts.shape and pending[2] < self.group:
            self.pending = (layers, pending[1] + counts, pending[2] + 1, step)
        else:
            self._close()
            self.pending = (layers, counts, 1, step)

    def _close(self) -> None:
        if self.pending is not None:
            layers, counts, _, step = self.pending
            self.pending = None
            self._keep(RoutingLog(step, dict(zip(layers, counts.astype(np.int64).tolist()))))

    def _keep(self, log: RoutingLog) -> None:
        self.logs.append(log)
        if len(self.logs) >= 2 * MAX_ROUTING_LOGS:
            self.logs = [_merged(a, b) for a, b in zip(self.logs[::2], self.logs[1::2])] + self.logs[
                len(self.logs) // 2 * 2:]
            self.group *= 2

    def finish(self) -> list[RoutingLog]:
        self._close()
        return sorted(self.logs, key=lambda log: log.step)


def _merged(a: RoutingLog, b: RoutingLog) -> RoutingLog:
    """Two neighbouring routing logs as one over both intervals (ending at the later step)."""
    counts = dict(a.counts)
    for layer, values in b.counts.items():
        mine = counts.get(layer, [])
        if len(mine) < len(values):
            mine = mine + [0] * (len(values) - len(mine))
        counts[layer] = [x + y for x, y in zip(mine, values)] + mine[len(values):]
    return RoutingLog(b.step, counts)


def read_metrics(path: Path) -> _RecordReader:
    """A metrics.jsonl file read line by line (memory bounded by what the report keeps, not by the file)."""
    reader = _RecordReader()
    with path.open(encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, start=1):
            reader.add_line(number, line)
    return reader


def numeric_metrics(record: dict | None) -> dict[str, float]:
    """The top-level numeric metrics of an evaluation (per-language dicts, counts and bookkeeping left out)."""
    return {k: v for k, v in (record or {}).items() if k not in NON_METRIC_KEYS and is_number(v)}


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
    """Read a run folder; what is wrong with its metrics.jsonl (lines that are not JSON, non-finite values, steps
    that repeat or go back) is said on stderr and kept in ``Run.warnings``."""
    path = Path(path)
    if not path.exists():
        raise ReportError(f"no such run folder: {path}")
    metrics = path / "metrics.jsonl"
    if not metrics.is_file():
        raise ReportError(f"not a run folder: {path} (no metrics.jsonl)")
    read = read_metrics(metrics)
    warnings = read.warnings(metrics)
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    results = _read_mapping(path / "results.json", "JSON")
    config = _read_mapping(path / "config.yaml", "YAML") or (results or {}).get("config") or {}
    return Run(path=path.resolve(), label=path.resolve().name, losses=read.losses, lr=read.lr, evals=read.evals,
               routing=read.routing.finish(), config=config, results=results, skipped_lines=read.skipped,
               warnings=warnings)


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
