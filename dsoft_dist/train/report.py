"""The end-of-run report: ``report.md`` (read it), ``report.json`` (parse it), ``curves.png`` (look at it).

    text = write_report(out_dir, summary)   # summary: config, world_size, train_seconds, log, evals
    fig = curves_figure(summary["log"], summary["evals"])   # the figure of curves.png, to inspect

``report.json`` is the summary plus ``throughput``: the samples this attempt trained over its
seconds (verification inside the loop included), the one number to compare runs' speed by (a log
row's samples_per_s is one interval's). ``curves.png``: left, the loss and the terms it has (D-Softmax's
intra and inter) over steps; right, every verification accuracy (AUC for pair lists) over the same
step axis (step 0 = the untrained backbone when eval.at_start).
"""
from __future__ import annotations

import json
import math
import os

from dsoft_dist.observability import get_logger

_NAN = float("nan")
log = get_logger(__name__)


def _fmt(x, digits: int = 3) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def global_batch(summary: dict) -> int:
    """Samples per optimizer step: batch per rank x ranks x micro-batches."""
    cfg = summary["config"]
    return cfg["data"]["batch_size"] * summary["world_size"] * cfg["optimizer"]["grad_accum_steps"]


def throughput(summary: dict) -> dict:
    """{"steps", "samples", "seconds", "samples_per_s"} of this attempt: steps from ``start_step`` (0 unless
    the summary says it resumed) to the last logged step, x the global batch, over ``train_seconds``;
    samples_per_s is None when nothing was trained."""
    last = summary["log"][-1]["step"] if summary["log"] else 0
    steps = max(last - summary.get("start_step", 0), 0)
    samples, seconds = steps * global_batch(summary), float(summary["train_seconds"])
    return {"steps": steps, "samples": samples, "seconds": seconds,
            "samples_per_s": samples / seconds if steps and seconds > 0 else None}


def _header(summary: dict) -> list[str]:
    cfg, h, d = summary["config"], summary["config"]["head"], summary["config"]["data"]
    data = (f"{d['num_classes']} synthetic training identities ({d['synthetic_mode']})" if d["source"] == "synthetic"
            else f"{d['num_classes']} identities from WebDataset shards {d['manifest'] or d['shards']}")
    o, batch, done = cfg["optimizer"], global_batch(summary), summary["throughput"]
    timing = f"in {summary['train_seconds']} s ({_fmt(done['samples_per_s'], 0)} samples/s)"
    timing = (f" {timing}" if done["steps"] == cfg["schedule"]["steps"]  # else a resumed run's last attempt
              else f" ({done['steps']} of them trained by this attempt {timing})")
    return [f"# {cfg['name']}: {h['loss']} (negatives={h['negatives']}, r={h['sample_rate']}), {cfg['model']['name']}",
            "",
            f"{data}; {summary['world_size']} {summary['backend']} ranks x {d['batch_size']} samples x "
            f"{o['grad_accum_steps']} micro-batches = {batch} per step; {cfg['schedule']['steps']} steps{timing}; "
            f"engine {summary['engine']}, precision "
            f"{cfg['parallel']['precision']}, head step in backward: {summary['head_step_in_backward']}", ""]


def _train_table(rows: list[dict]) -> list[str]:
    lines = ["| step | loss | intra | inter | target cos | hardest negative cos | lr | samples/s |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['step']} | {_fmt(r['loss'])} | {_fmt(r.get('intra'))} | {_fmt(r.get('inter'))} | "
                     f"{_fmt(r.get('target_cos'))} | {_fmt(r.get('hardest_neg_cos'))} | {r['lr']:.4g} | "
                     f"{r['samples_per_s']:.0f} |")
    return lines


def _eval_table(evals: list[dict]) -> list[str]:
    sets = sorted({k.split("/")[0] for e in evals for k in e if k.endswith("/accuracy")})
    if not sets:
        return []
    lines = ["", "Verification (10-fold accuracy +- std, VAL@FAR=1e-3; step 0 = untrained):", "",
             "| step | " + " | ".join(sets) + " |", "|---:|" + "---:|" * len(sets)]
    for e in evals:
        cells = [f"{_fmt(e.get(f'{s}/accuracy'), 4)} +- {_fmt(e.get(f'{s}/accuracy_std'), 4)}, "
                 f"VAL {_fmt(e.get(f'{s}/val_at_far'), 3)}" for s in sets]
        lines.append(f"| {e['step']} | " + " | ".join(cells) + " |")
    return lines


def _has_values(rows: list[dict], key: str) -> bool:
    return any(isinstance(r.get(key), (int, float)) and not math.isnan(r[key]) for r in rows)


def curves_figure(rows: list[dict], evals: list[dict]):
    """The two panels of curves.png as a matplotlib Figure (no pyplot: no display, no global state).

    Left: the loss and each term the rows have (a loss without intra/inter gets no entry for them).
    Right: every ``<set>/accuracy`` and ``<list>/auc`` over steps. Both panels share the step axis, so
    a single verification sits where it happened in the run, not alone on an axis of its own."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4))
    ax_loss, ax_eval = fig.subplots(1, 2, sharex=True)
    steps = [r["step"] for r in rows]
    for key, label in (("loss", "loss"), ("intra", "intra term"), ("inter", "inter term")):
        if _has_values(rows, key):
            ax_loss.plot(steps, [r.get(key, _NAN) for r in rows], marker=".", label=label)
    ax_loss.set(xlabel="step", ylabel="loss", title="training loss")
    keys = sorted({k for e in evals for k in e if k.endswith(("/accuracy", "/auc"))})
    for key in keys:
        pts = [(e["step"], e[key]) for e in evals if key in e]
        ax_eval.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=key)
    ax_eval.set(xlabel="step", ylabel="accuracy (.bin) / AUC (pair lists)", title="verification")
    for ax in (ax_loss, ax_eval):
        if ax.get_legend_handles_labels()[1]:
            ax.legend()
    all_steps = steps + [e["step"] for e in evals]
    if all_steps and min(all_steps) == max(all_steps):  # one step in all: a unit-wide axis around it
        ax_loss.set_xlim(all_steps[0] - 1, all_steps[0] + 1)
    fig.tight_layout()
    return fig


def plot_curves(rows: list[dict], evals: list[dict], path: str) -> str:
    """Writes ``curves_figure`` as a PNG (the Agg renderer: no display needed)."""
    curves_figure(rows, evals).savefig(path, dpi=100)
    return path


def write_report(out_dir: str, summary: dict) -> str:
    """Writes report.md, report.json and curves.png into ``out_dir``; returns the markdown text. Adds
    ``throughput`` to ``summary``."""
    summary["throughput"] = throughput(summary)
    lines = _header(summary) + _train_table(summary["log"]) + _eval_table(summary["evals"])
    bad = summary.get("bad_samples", 0)
    lines += ["", f"Bad samples skipped (all ranks, all epochs): {bad}; optimizer steps skipped on non-finite "
              f"gradients: {summary.get('skipped_steps', 0)}", ""]
    text = "\n".join(lines)
    with open(os.path.join(out_dir, "report.md"), "w", encoding="utf-8") as f:
        f.write(text)
    with open(os.path.join(out_dir, "report.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)
    try:
        plot_curves(summary["log"], summary["evals"], os.path.join(out_dir, "curves.png"))
    except ImportError as err:  # matplotlib is a dependency; a --no-deps install may lack it
        log.warning("curves.png not written: %s (pip install matplotlib)", err)
    return text
