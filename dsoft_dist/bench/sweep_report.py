"""``sweep.png`` of ``dsoft bench accuracy --sweep KEY=V1,V2``: each verification figure against the grid points.

    paths = write_sweep_plot(result, out)     # {"sweep.png": path} when the records have grid points, else {}

A row of panels per part, a panel per figure (the built-in parts: TAR@FAR=1e-3, TAR@FAR=1e-4, 10-fold
accuracy; a ``--config`` part: the trainer's figures of each verification set), a line per (method, rate)
over the points, error bars the standard deviation over the seeds. The x axis is the swept value itself when
the grid has one numeric key, else a tick per point labelled ``point_text``.
"""
from __future__ import annotations

import os
from numbers import Real

from dsoft_dist.bench.accuracy_report import (
    CONFIG_PART,
    PARTS,
    _pyplot,
    figure_label,
    figures_of,
    point_key,
    point_text,
    resolvable,
)
from dsoft_dist.config.schema import rate_text


def point_axis(rows: list[dict]) -> tuple[dict, list[str] | None, str]:
    """Where each grid point of a part's summary rows goes on the x axis: ({point_key: x}, tick labels or None,
    axis title). One swept key with numeric values: x is the value (no tick labels); otherwise the points in
    the order of the rows (the plan's), x = 0, 1, ... with their ``point_text`` as tick labels."""
    points = {point_key(r): r["point"] for r in rows}
    keys = {key for point in points.values() for key in point}
    values = [point.get(key) for point in points.values() for key in keys]
    if len(keys) == 1 and all(isinstance(v, Real) and not isinstance(v, bool) for v in values):
        (key,) = keys
        return {pk: float(point[key]) for pk, point in points.items()}, None, key
    return {pk: i for i, pk in enumerate(points)}, [point_text(p) for p in points.values()], "grid point"


def _panel(ax, rows: list[dict], figure: str, x_of: dict) -> bool:
    """A line per (method, rate) of one figure over the points at ``x_of``; False when no value was drawn."""
    drawn = False
    for method, rate in dict.fromkeys((r["method"], r["rate"]) for r in rows):
        line = sorted((r for r in rows if (r["method"], r["rate"]) == (method, rate) and figure in r
                       and resolvable(r, figure)), key=lambda r: x_of[point_key(r)])
        if line:
            ax.errorbar([x_of[point_key(r)] for r in line], [r[figure] for r in line],
                        yerr=[r[figure + "_sd"] for r in line], marker="o", capsize=3,
                        label=f"{method} r={rate_text(rate)}", linestyle="-" if len(line) > 1 else "none")
            drawn = True
    if drawn:
        ax.legend(fontsize=6)
    else:
        ax.text(0.5, 0.5, "unresolvable: FAR x impostor pairs < 1", transform=ax.transAxes, ha="center")
    return drawn


def plot_sweep(summary: list[dict], path: str) -> bool:
    """Writes sweep.png of the summary rows that have a grid point (the sampled methods' r = 1 copies of their
    full loss are left out: they are the full loss's line); False, writing nothing, when none has one."""
    rows = [r for r in summary if r.get("point") and "same_as" not in r]
    parts = [p for p in (*PARTS, CONFIG_PART) if any(r["part"] == p for r in rows)]
    if not parts:
        return False
    figures = {p: list(dict.fromkeys(f for r in rows if r["part"] == p for f in figures_of(r))) for p in parts}
    cols = max(len(f) for f in figures.values())
    plt = _pyplot()
    fig, axes = plt.subplots(len(parts), cols, figsize=(4.8 * cols, 3.8 * len(parts)), squeeze=False)
    for axes_row, part in zip(axes, parts):
        mine = [r for r in rows if r["part"] == part]
        x_of, ticks, title = point_axis(mine)
        for ax in axes_row[len(figures[part]):]:
            ax.axis("off")  # a part with fewer figures than the widest row
        for ax, figure in zip(axes_row, figures[part]):
            _panel(ax, mine, figure, x_of)
            if ticks is not None:
                ax.set_xticks(range(len(ticks)), ticks, rotation=30, ha="right", fontsize=7)
            elif min(x_of.values()) > 0 and max(x_of.values()) >= 100 * min(x_of.values()):
                ax.set_xscale("log")  # e.g. a learning rate over decades
            ax.set(xlabel=title, ylabel=f"{figure_label(figure)} (%)")
            ax.set_title(part, fontsize=9)
            ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_sweep_plot(result: dict, out: str) -> dict:
    """sweep.png in ``out`` from ``result["summary"]``; {"sweep.png": path}, or {} without grid points."""
    path = os.path.join(out, "sweep.png")
    return {"sweep.png": path} if plot_sweep(result["summary"], path) else {}
