"""The pictures of a report, drawn with matplotlib (imported on first use): curves of losses, learning rate and
evaluations (one line per run), the expert load per layer as heat-maps, the router's balance over time."""
from __future__ import annotations

import math
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

from dsmoe.report.runs import (EVAL_EVENTS, Run, Series, balance_series, encoders, eval_metric_names, imbalance,
                               load_cv, routing_shares, shared_keys, thirds)

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

EVAL_NAMES = {"zero_shot": "zero-shot", "val": "val", "test": "test"}
EVAL_STYLE = {"val": {"marker": "o", "linestyle": "-", "markersize": 4},
              "zero_shot": {"marker": "s", "linestyle": "none", "markersize": 7},
              "test": {"marker": "*", "linestyle": "none", "markersize": 12}}
# config keys that differ between any two runs without saying anything about them
LINE_STYLES = ("-", "--", ":", "-.")  # one per run, so that identical runs' lines stay visible


def _pyplot() -> ModuleType:
    """matplotlib's pyplot on the non-interactive Agg backend (imported on first use: the module loads fast)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _grid(count: int, title: str, width: float = 4.6, height: float = 3.2) -> tuple[Figure, list[Axes]]:
    """A figure of ``count`` subplots, up to three a row."""
    cols = min(3, max(1, count))
    rows = max(1, math.ceil(count / cols))
    fig, axes = _pyplot().subplots(rows, cols, figsize=(width * cols, height * rows + 0.5), squeeze=False,
                                   layout="constrained")
    flat = list(axes.flat)
    for ax in flat[count:]:
        fig.delaxes(ax)
    fig.suptitle(title)
    return fig, flat[:count]


def curves_figure(panels: dict[str, dict[str, Series]], title: str, ylabels: dict[str, str] | None = None,
                  legend: bool = False, width: float = 4.6) -> Figure:
    """One subplot per panel (``width`` inches wide), titled by its key, with one line per labelled series over
    steps (a line style each)."""
    fig, axes = _grid(len(panels), title, width=width)
    for ax, (name, lines) in zip(axes, panels.items()):
        for index, (label, series) in enumerate(lines.items()):
            ax.plot(series.steps, series.values, label=label, linewidth=1.2, linestyle=LINE_STYLES[index % 4])
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.set_ylabel((ylabels or {}).get(name, name))
        ax.grid(alpha=0.3)
        if legend:
            ax.legend(fontsize="small")
    return fig


def _title(runs: list[Run], what: str) -> str:
    return f"{runs[0].label}: {what}" if len(runs) == 1 else what


def losses_figure(runs: list[Run]) -> Figure:
    """The loss terms all the runs log (each subplot titled by its key), one line per run."""
    terms = shared_keys([list(run.losses) for run in runs])
    panels = {term: {run.label: run.losses[term] for run in runs if term in run.losses} for term in terms}
    return curves_figure(panels, _title(runs, "training losses"), legend=len(runs) > 1)


def lr_figure(runs: list[Run]) -> Figure:
    """The learning rate over steps, one line per run."""
    return curves_figure({"lr": {run.label: run.lr for run in runs}}, _title(runs, "learning rate"),
                         ylabels={"lr": "learning rate"}, legend=len(runs) > 1, width=6.4)


def eval_figure(runs: list[Run], events: tuple[str, ...] = EVAL_EVENTS) -> Figure:
    """One subplot per metric the runs share: validation as a line with markers, zero-shot (square) and test
    (star) as single markers at their steps; one colour per run, one legend for the figure."""
    names = eval_metric_names(runs, events)
    fig, axes = _grid(len(names), _title(runs, "evaluation"))
    for ax, name in zip(axes, names):
        for index, run in enumerate(runs):
            prefix = f"{run.label} " if len(runs) > 1 else ""
            for event in events:
                points = [(p.step, p.metrics[name]) for p in run.evals if p.event == event and name in p.metrics]
                if points:
                    steps, values = zip(*points)
                    style = dict(EVAL_STYLE[event])
                    if event == "val":
                        style["linestyle"] = LINE_STYLES[index % 4]
                    ax.plot(steps, values, color=f"C{index % 10}", label=prefix + EVAL_NAMES[event], **style)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    handles = {label: handle for ax in axes for handle, label in zip(*ax.get_legend_handles_labels())}
    fig.legend(list(handles.values()), list(handles), loc="outside lower center", ncols=max(1, min(6, len(handles))))
    return fig


def _annotate(ax: Axes, shares: list[list[float]], vmax: float) -> None:
    """Write each cell's share in it (small heat-maps only)."""
    if sum(map(len, shares)) > 160:
        return
    for y, row in enumerate(shares):
        for x, share in enumerate(row):
            if not math.isnan(share):
                ax.text(x, y, f"{share:.2f}", ha="center", va="center", fontsize=7,
                        color="black" if share > 0.6 * vmax else "white")


def routing_figure(run: Run) -> Figure:
    """Expert load, the paper's figure: for each encoder (a row) a heat-map with layers on the y axis and experts on
    the x axis, colour = share of the layer's tokens routed to that expert. The columns show the whole run, then
    its first and last third of logged steps: how the routing changed over training. One colour scale (0 to the
    largest share) for all panels."""
    groups = encoders(run.routing)
    first, last = thirds(run.routing)
    periods = [("whole run", run.routing),
               (f"first third (steps {first[0].step}–{first[-1].step})", first),
               (f"last third (steps {last[0].step}–{last[-1].step})", last)]
    shares = {(encoder, name): routing_shares(logs, layers)
              for encoder, layers in groups.items() for name, logs in periods}
    values = [v for matrix in shares.values() for row in matrix for v in row if not math.isnan(v)]
    vmax = max(values, default=1.0) or 1.0
    experts = max(len(row) for matrix in shares.values() for row in matrix)
    layers = max(len(names) for names in groups.values())
    fig, axes = _pyplot().subplots(len(groups), 3, squeeze=False, layout="constrained",
                                   figsize=(3 * max(3.2, 0.55 * experts + 1.3) + 1.2,
                                            len(groups) * max(2.4, 0.4 * layers + 1.3) + 0.5))
    for row, (encoder, names) in enumerate(groups.items()):
        for col, (period, _) in enumerate(periods):
            ax, matrix = axes[row][col], shares[encoder, period]
            image = ax.imshow(matrix, cmap="viridis", vmin=0.0, vmax=vmax, aspect="auto")
            _annotate(ax, matrix, vmax)
            ax.set_title(f"{encoder}: {period}", fontsize="medium")
            ax.set_xlabel("expert")
            ax.set_ylabel("layer")
            ax.set_xticks(range(len(matrix[0])))
            ax.set_yticks(range(len(names)), labels=names)
        fig.colorbar(image, ax=list(axes[row]), label=f"share of the layer's tokens\n(uniform = 1/{experts})")
    fig.suptitle(f"{run.label}: expert load per layer")
    return fig


def balance_figure(run: Run) -> Figure:
    """The router's balance at each logged step, per encoder (mean over its layers): the busiest expert's share
    over the uniform share (1 = balanced), and the coefficient of variation of the experts' load (0 = balanced)."""
    ratio, cv = "busiest expert / uniform share", "coefficient of variation of expert load"
    panels = {ratio: balance_series(run.routing, imbalance), cv: balance_series(run.routing, load_cv)}
    fig = curves_figure(panels, f"{run.label}: router balance (mean over each encoder's layers)",
                        ylabels={ratio: "max share × experts (1 = balanced)", cv: "std / mean (0 = balanced)"},
                        legend=True)
    for ax, reference in zip(fig.axes, (1.0, 0.0)):
        ax.axhline(reference, color="grey", linestyle="--", linewidth=0.8)
    return fig


def save(fig: Figure, path: Path) -> Path:
    """Write the figure as a PNG and free it."""
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path
