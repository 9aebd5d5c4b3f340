"""Evaluation reports: a text table for the terminal, Markdown + JSON files and the ROC PNG.

    paths = write_report({"bins": [...], "pairs": [...], "identification": [...]}, "out/")  # .json, .md, roc.png
"""
from __future__ import annotations

import os

from dsoft_dist.eval.roc import plot_roc, write_json


def _fmt(x, digits: int = 4) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def bin_rows(bins: list[dict]) -> list[list[str]]:
    """Header + one row per .bin result (evaluate_bin)."""
    header = ["set", "pairs", "accuracy", "std", "threshold", "VAL@FAR", "FAR"]
    rows = [[r["name"], str(r["num_pairs"]), _fmt(r["accuracy"]), _fmt(r["accuracy_std"]), _fmt(r["threshold"], 3),
             _fmt(r["val"]), f"{r['far']:.1e} (target {r['far_target']:.0e})"] for r in bins]
    return [header] + rows


def pair_rows(pairs: list[dict]) -> list[list[str]]:
    """Header + one row per pair-list result (evaluate_pairs); '*' marks unresolvable FARs."""
    keys = list(pairs[0]["tar_at_far"]) if pairs else []
    header = ["list", "pairs"] + [f"TAR@{k}" for k in keys] + ["AUC", "EER"]
    rows = []
    for r in pairs:
        tars = [_fmt(r["tar_at_far"][k]["tar"]) + ("" if r["tar_at_far"][k]["resolvable"] else "*") for k in keys]
        rows.append([r["name"], str(r["num_pairs"])] + tars + [_fmt(r["auc"]), _fmt(r["eer"])])
    return [header] + rows


def identification_rows(results: list[dict]) -> list[list[str]]:
    """Header + one row per identification result (evaluate_identification): set sizes, then rank-k rates."""
    keys = list(results[0]["rank"]) if results else []
    header = ["identification", "probes", "gallery", "distractors"] + [f"rank-{k}" for k in keys]
    rows = [[r["name"], str(r["num_probes"]), str(r["num_gallery"]), str(r["num_distractors"])]
            + [_fmt(r["rank"][k]) for k in keys] for r in results]
    return [header] + rows


def _markdown(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows[1:]])


def _plain(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows)


def format_tables(results: dict, markdown: bool = False) -> str:
    """The verification (.bin), pair-list and identification tables as text; '*' marks FARs below 1 / n_different."""
    render, parts = (_markdown if markdown else _plain), []
    if results.get("bins"):
        parts.append(render(bin_rows(results["bins"])))
    if results.get("pairs"):
        parts.append(render(pair_rows(results["pairs"])))
        interp = results["pairs"][0]["interpolation"]
        parts.append(f"TAR@FAR interpolation: {interp} (see docs/eval.md); * = FAR below 1/#different pairs")
    if results.get("identification"):
        parts.append(render(identification_rows(results["identification"])))
    return "\n\n".join(parts)


def write_report(results: dict, out_dir: str) -> dict:
    """Writes results.json, results.md and (with pair lists) roc.png into out_dir. Returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {}
    pairs = results.get("pairs") or []
    curves = {r["name"]: r["curve"] for r in pairs if "curve" in r}
    results = {**results, "pairs": [{k: v for k, v in r.items() if k != "curve"} for r in pairs]}
    if curves:
        paths["roc"] = plot_roc(curves, os.path.join(out_dir, "roc.png"), title="ROC (pair lists)")
    paths["json"] = write_json(results, os.path.join(out_dir, "results.json"))
    with open(os.path.join(out_dir, "results.md"), "w", encoding="utf-8") as f:
        f.write("# Evaluation\n\n" + format_tables(results, markdown=True) + "\n")
    paths["markdown"] = os.path.join(out_dir, "results.md")
    return paths
