"""Plots of a run report as PNG bytes (matplotlib, Agg): training curves and evaluation sweeps.

A report draws few figures, each a grid of small panels: layout is fixed margins rather than
``tight_layout`` (which measured half of the drawing time). Every figure has a fixed size and DPI
and no PNG metadata, so the same inputs give the same bytes and the report can be diffed.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

Series = dict[str, list[tuple[float, float]]]  # line label -> [(x, y), ...]


@dataclass
class Panel:
    """One small plot: a line per label of ``series``."""

    title: str
    series: Series
    xlabel: str = "step"
    ylabel: str = ""
    logx: bool = False
    logy: bool | None = None  # None: log when the positive values span more than two decades
    colors: dict[str, str] | None = None  # label -> colour, so a run keeps its colour in every panel


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _draw(ax, panel: Panel) -> None:
    ys = [y for points in panel.series.values() for _, y in points if math.isfinite(y)]
    logy = panel.logy if panel.logy is not None else bool(ys) and min(ys) > 0 and max(ys) / min(ys) > 100
    for label, points in panel.series.items():
        xs, vs = zip(*points) if points else ((), ())
        ax.plot(xs, vs, marker="o" if len(points) < 12 else None, markersize=3, linewidth=1.4, label=label,
                color=(panel.colors or {}).get(label))
    if panel.logx:  # ticks at the measured x (sampler steps), written plainly rather than as 10^k
        ax.set_xscale("log")
        xs = sorted({x for points in panel.series.values() for x, _ in points})
        ax.set_xticks(xs, [f"{x:g}" for x in xs], minor=False)
        ax.set_xticks([], minor=True)
    if logy:
        ax.set_yscale("log")
    ax.set_title(panel.title, fontsize=10)
    ax.set_xlabel(panel.xlabel, fontsize=8)
    if panel.ylabel:
        ax.set_ylabel(panel.ylabel, fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(True, which="both", alpha=0.3)
    if len(panel.series) > 1:
        ax.legend(fontsize=7)


def panels_png(panels: list[Panel], cols: int = 4) -> bytes:
    """Panels in a grid of ``cols`` columns, as PNG bytes without metadata (Software would vary by version)."""
    plt = _pyplot()
    cols = min(cols, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols if cols > 2 else 3.9 * cols, 2.6 * rows), squeeze=False)
    margin = rows ** 0.5  # margins are fractions of the figure: smaller for taller figures
    fig.subplots_adjust(left=0.08 if cols > 1 else 0.14, right=0.98, bottom=0.17 / margin, top=1 - 0.1 / margin,
                        wspace=0.3, hspace=0.55)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, panel in zip(axes.flat, panels):
        _draw(ax, panel)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=96, metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()
