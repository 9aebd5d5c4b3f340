"""The end-of-run report: ``report.md`` (read it), ``report.json`` (parse it), ``curves.png`` (look at it).

    text = write_report(out_dir, summary)   # summary: config, world_size, train_seconds, log, evals

``curves.png``: left, the loss and its intra and inter terms over steps; right, every
verification accuracy over steps (step 0 = the untrained backbone when eval.at_start).
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


def _header(summary: dict) -> list[str]:
    cfg, h, d = summary["config"], summary["config"]["head"], summary["config"]["data"]
    data = (f"{d['num_classes']} synthetic training identities ({d['synthetic_mode']})" if d["source"] == "synthetic"
            else f"{d['num_classes']} identities from WebDataset shards {d['manifest'] or d['shards']}")
    o = cfg["optimizer"]
    batch = d["batch_size"] * summary["world_size"] * o["grad_accum_steps"]
    return [f"# {cfg['name']}: {h['loss']} (negatives={h['negatives']}, r={h['sample_rate']}), {cfg['model']['name']}",
            "",
            f"{data}; {summary['world_size']} {summary['backend']} ranks x {d['batch_size']} samples x "
            f"{o['grad_accum_steps']} micro-batches = {batch} per step; {cfg['schedule']['steps']} steps in "
            f"{summary['train_seconds']} s; engine {summary['engine']}, precision "
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
                 f"VAL {_fmt(e.get(f'{s}/val'), 3)}" for s in sets]
        lines.append(f"| {e['step']} | " + " | ".join(cells) + " |")
    return lines


def plot_curves(rows: list[dict], evals: list[dict], path: str) -> str:
    """Writes the two-panel PNG (matplotlib's Agg backend: no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_eval) = plt.subplots(1, 2, figsize=(11, 4))
    steps = [r["step"] for r in rows]
    for key, label in (("loss", "loss"), ("intra", "intra term"), ("inter", "inter term")):
        ax_loss.plot(steps, [r.get(key, _NAN) for r in rows], marker=".", label=label)
    ax_loss.set(xlabel="step", ylabel="loss", title="training loss")
    ax_loss.legend()
    keys = sorted({k for e in evals for k in e if k.endswith(("/accuracy", "/auc"))})
    for key in keys:
        pts = [(e["step"], e[key]) for e in evals if key in e]
        ax_eval.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=key)
    ax_eval.set(xlabel="step", ylabel="accuracy (.bin) / AUC (pair lists)", title="verification")
    if keys:
        ax_eval.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_report(out_dir: str, summary: dict) -> str:
    """Writes report.md, report.json and curves.png into ``out_dir``; returns the markdown text."""
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
