"""The report of ``dsoft bench accuracy`` (``dsoft_dist.bench.accuracy`` runs the sweep): the methods and
parts it compares, the summary over seeds, and the files it writes to --out.

    rows = summarize(records)                 # one row per (part, method, rate): mean and spread over seeds
    text = format_markdown(result)            # accuracy.md's tables
    paths = write_outputs(result, out)        # accuracy.json, .csv, .md, accuracy_vs_rate.png, loss_curves.png

``result`` is ``{"settings", "machine", "records", "summary", "markdown"}``: a record per run (its part,
method, rate, K, seed, train seconds, TAR@FAR, 10-fold accuracy and loss curve).
"""
from __future__ import annotations

import csv
import json
import os
import statistics

from dsoft_dist.bench.speedup import SAMPLED
from dsoft_dist.config.schema import rate_text

FULL_LOSSES = ("softmax", "normface", "sphereface", "cosface", "arcface", "d_softmax")
METHODS = (*FULL_LOSSES, "d_softmax_b", *SAMPLED)
FULL_OF = {"d_softmax_k": "d_softmax", "partial_fc": "arcface", "sampled_softmax": "softmax"}  # r = 1
PARTS = ("vectors", "images")


def classes_of(part: str, s: dict) -> int:
    """The training identities (C) of a part under the sweep's settings ``s``."""
    return s["vector_classes"] if part == "vectors" else s["image_classes"]


def _spread(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(records: list[dict]) -> list[dict]:
    """One row per (part, method, rate): mean and sample standard deviation over the seeds; the sampled
    methods' r = 1 rows are their full loss's runs."""
    rows = []
    keys = []
    for r in records:
        key = (r["part"], r["method"], r["rate"])
        if key not in keys:
            keys.append(key)
    for part, method, rate in keys:
        mine = [r for r in records if (r["part"], r["method"], r["rate"]) == (part, method, rate)]
        row = {"part": part, "method": method, "rate": rate, "k": mine[0]["k"], "seeds": len(mine),
               "train_s": statistics.fmean(r["train_s"] for r in mine), "impostor_pairs": mine[0]["impostor_pairs"]}
        for metric in ("accuracy", "tar_at_1e-03", "tar_at_1e-04"):
            row[metric], row[metric + "_sd"] = _spread([100 * r[metric] for r in mine])
        rows.append(row)
    for part, method in {(r["part"], m) for r in rows for m in FULL_OF}:
        full = [r for r in rows if (r["part"], r["method"], r["rate"]) == (part, FULL_OF[method], 1.0)]
        if full and any(r["part"] == part and r["method"] == method for r in rows):
            rows.append({**full[0], "method": method, "same_as": FULL_OF[method]})
    return rows


def format_markdown(result: dict) -> str:
    """accuracy.md: the machine and protocol, then a table per part of the summary rows (mean +- spread, in %)."""
    m, s = result["machine"], result["settings"]
    lines = [f"`{m['command']}` on {m['host']} ({m['cpu_count']} cores, {m['device']}), torch {m['torch']}, "
             f"{m['date']}; verification on {s['eval_identities']} unseen identities x {s['eval_samples']} samples "
             "(TAR over all pairs, unresolvable where FAR x impostor pairs < 1; 10-fold accuracy over the genuine "
             "pairs + as many impostors); mean +- standard deviation over the seeds, in %"]
    order = {m: i for i, m in enumerate(METHODS)}
    for part in PARTS:
        rows = sorted((r for r in result["summary"] if r["part"] == part),
                      key=lambda r: (order[r["method"]], -r["rate"]))
        if not rows:
            continue
        classes, steps = classes_of(part, s), s["vector_steps" if part == "vectors" else "image_steps"]
        lines += ["", f"**{part}: C = {classes:,} training identities, {steps} steps**", "",
                  "| method | r | K | seeds | TAR@FAR=1e-3 | TAR@FAR=1e-4 | 10-fold accuracy | train s |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            cells = [f"{r[k]:.2f} +- {r[k + '_sd']:.2f}" if far * r["impostor_pairs"] >= 1 else "unresolvable"
                     for k, far in (("tar_at_1e-03", 1e-3), ("tar_at_1e-04", 1e-4), ("accuracy", 1.0))]
            name = r["method"] + (f" (= {r['same_as']})" if "same_as" in r else "")
            rate, k = rate_text(r["rate"]), f"{r['k']:,}"
            if r["method"] == "d_softmax_b":
                rate, k = f"<= {r['k'] / classes:.3g}", f"<= {r['k']:,}"
            lines.append(f"| {name} | {rate} | {k} | {r['seeds']} | {' | '.join(cells)} | {r['train_s']:.0f} |")
    return "\n".join(lines)


def write_csv(records: list[dict], path: str) -> None:
    """accuracy.csv: one row per run (its settings and figures; no loss curve)."""
    fields = ["part", "method", "rate", "k", "seed", "train_s", "accuracy", "accuracy_std", "tar_at_1e-03",
              "tar_at_1e-04", "genuine_pairs", "impostor_pairs"]
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(records)


def _pyplot():
    import matplotlib  # noqa: PLC0415 (only when a plot is written)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    return plt


def plot_rates(summary: list[dict], settings: dict, path: str) -> None:
    """TAR@FAR=1e-3 against the sample rate, a line per sampled method (its r = 1 point is its full loss),
    the full losses as points at r = 1, d_softmax_b at its K / C; error bars are the spread over seeds."""
    plt = _pyplot()
    parts = [p for p in PARTS if any(r["part"] == p for r in summary)]
    fig, axes = plt.subplots(1, len(parts), figsize=(6 * len(parts), 4.4), squeeze=False)
    for ax, part in zip(axes[0], parts):
        mine = [r for r in summary if r["part"] == part]
        if all(r["method"] in FULL_LOSSES for r in mine):  # no rates to plot against: one point per method
            ax.errorbar(range(len(mine)), [r["tar_at_1e-03"] for r in mine], yerr=[r["tar_at_1e-03_sd"] for r in mine],
                        marker="o", capsize=3, linestyle="none")
            ax.set_xticks(range(len(mine)), [r["method"] for r in mine])
            ax.set_ylabel("TAR @ FAR = 1e-3 (%) on unseen identities")
            ax.set_title(f"{part} (all classes in every method)")
            ax.grid(True, alpha=0.3)
            continue
        for method in METHODS:
            rows = sorted((r for r in mine if r["method"] == method), key=lambda r: r["rate"])
            if not rows or (method in FULL_OF.values() and any(r["part"] == part and r["method"] in FULL_OF
                                                                and r.get("same_as") == method for r in summary)):
                continue  # a full loss drawn as the r = 1 end of its sampled line
            x = [r["k"] / classes_of(part, settings) if method == "d_softmax_b" else r["rate"] for r in rows]
            ax.errorbar(x, [r["tar_at_1e-03"] for r in rows], yerr=[r["tar_at_1e-03_sd"] for r in rows],
                        marker="o", capsize=3, label=method, linestyle="-" if len(rows) > 1 else "none")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sample rate r (classes in the inter term / C)")
        ax.set_ylabel("TAR @ FAR = 1e-3 (%) on unseen identities")
        ax.set_title(part)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_losses(records: list[dict], path: str) -> None:
    """The training loss of each (method, rate), first seed, a panel per part (each loss on its own scale:
    the curves show convergence, not a comparison of values)."""
    plt = _pyplot()
    parts = [p for p in PARTS if any(r["part"] == p for r in records)]
    fig, axes = plt.subplots(1, len(parts), figsize=(6 * len(parts), 4.4), squeeze=False)
    for ax, part in zip(axes[0], parts):
        first = min(r["seed"] for r in records if r["part"] == part)
        ax.set_prop_cycle(color=plt.cm.tab20.colors)  # a color for each of up to 20 runs
        for r in records:
            if r["part"] == part and r["seed"] == first and r["loss_curve"]:
                steps, losses = zip(*r["loss_curve"])
                ax.plot(steps, losses, label=f"{r['method']} {rate_text(r['rate'])}")
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.set_title(f"{part} (seed {first})")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(result: dict, out: str) -> dict:
    """Writes the five report files into ``out``; returns {file name: path}."""
    paths = {name: os.path.join(out, name) for name in ("accuracy.json", "accuracy.csv", "accuracy.md",
                                                        "accuracy_vs_rate.png", "loss_curves.png")}
    with open(paths["accuracy.json"], "w", encoding="utf-8") as fh:
        json.dump(result, fh, indent=1)
    write_csv(result["records"], paths["accuracy.csv"])
    with open(paths["accuracy.md"], "w", encoding="utf-8") as fh:
        fh.write(result["markdown"] + "\n")
    plot_rates(result["summary"], result["settings"], paths["accuracy_vs_rate.png"])
    plot_losses(result["records"], paths["loss_curves.png"])
    return paths
