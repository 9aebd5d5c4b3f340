"""Evaluation reports: a text table for the terminal, Markdown + JSON files and the ROC PNG.

    paths = write_report({"bins": [...], "pairs": [...], "identification": [...], "ijb": {...}}, "out/")
    # results.json, results.md, roc.png (pair lists), ijb_roc.png (IJB 1:1)
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


def _pct(x) -> str:
    return "-" if x is None else f"{100.0 * x:.2f}"


def ijb_rows(ijb: dict) -> list[list[str]]:
    """Header + one row per IJB target (evaluate_ijb): sizes, then TAR in percent at each FAR and the AUC.

    The FAR columns are arcface_torch's (TAR of the ROC point nearest each FAR, two decimals in percent).
    """
    keys = list(next(iter(ijb.values()))["tar_at_far"]) if ijb else []
    header = ["IJB 1:1", "images", "templates", "pairs"] + [f"TAR%@{k}" for k in keys] + ["AUC%"]
    rows = [[name, str(r["images"]), str(r["templates"]), str(r["pairs"])]
            + [_pct(r["tar_at_far"][k]) for k in keys] + [_pct(r["auc"])] for name, r in ijb.items()]
    return [header] + rows


def ijb_identification_rows(ijb: dict) -> list[list[str]]:
    """Header + one row per IJB target with the 1:N lists: probes, gallery, TPIR@FPIR and rank-k, in percent."""
    found = {name: r["identification"] for name, r in ijb.items() if r.get("identification")}
    first = next(iter(found.values()), {"tpir_at_fpir": {}, "rank": {}})
    fpirs, ranks = list(first["tpir_at_fpir"]), list(first["rank"])
    header = (["IJB 1:N", "probes", "gallery"] + [f"TPIR%@FPIR={k}" for k in fpirs]
              + [f"rank-{k}%" for k in ranks])
    rows = [[name, str(r["probes"]), str(r["gallery"])] + [_pct(r["tpir_at_fpir"][k]) for k in fpirs]
            + [_pct(r["rank"][k]) for k in ranks] for name, r in found.items()]
    return [header] + rows


def _markdown(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows[1:]])


def _plain(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows)


def format_tables(results: dict, markdown: bool = False) -> str:
    """The verification (.bin), pair-list, identification and IJB tables as text; '*' marks FARs below
    1 / n_different (pair lists); IJB figures are in percent."""
    render, parts = (_markdown if markdown else _plain), []
    if results.get("bins"):
        parts.append(render(bin_rows(results["bins"])))
    if results.get("pairs"):
        parts.append(render(pair_rows(results["pairs"])))
        interp = results["pairs"][0]["interpolation"]
        parts.append(f"TAR@FAR interpolation: {interp} (see docs/eval.md); * = FAR below 1/#different pairs")
    if results.get("identification"):
        parts.append(render(identification_rows(results["identification"])))
    if results.get("ijb"):
        parts.append(render(ijb_rows(results["ijb"])))
        if len(ijb_identification_rows(results["ijb"])) > 1:
            parts.append(render(ijb_identification_rows(results["ijb"])))
        parts.append("IJB: percent; TAR is read at the ROC point nearest each FAR, as arcface_torch's IJB tables "
                     "(TAR%@0.0001 is their IJB-C(1E-4) column); results.json holds fractions")
    return "\n\n".join(parts)


def write_report(results: dict, out_dir: str) -> dict:
    """Writes results.json, results.md, roc.png (with pair lists) and ijb_roc.png (with --ijb) into out_dir.
    Returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {}
    pairs = results.get("pairs") or []
    curves = {r["name"]: r["curve"] for r in pairs if "curve" in r}
    results = {**results, "pairs": [{k: v for k, v in r.items() if k != "curve"} for r in pairs]}
    if curves:
        paths["roc"] = plot_roc(curves, os.path.join(out_dir, "roc.png"), title="ROC (pair lists)")
    ijb = results.get("ijb") or {}
    ijb_curves = {f"{name} 1:1": r["curve"] for name, r in ijb.items() if "curve" in r}
    if ijb_curves:
        paths["ijb_roc"] = plot_roc(ijb_curves, os.path.join(out_dir, "ijb_roc.png"), title="ROC on IJB (1:1)")
        results["ijb"] = {name: {k: v for k, v in r.items() if k != "curve"} for name, r in ijb.items()}
    paths["json"] = write_json(results, os.path.join(out_dir, "results.json"))
    with open(os.path.join(out_dir, "results.md"), "w", encoding="utf-8") as f:
        f.write("# Evaluation\n\n" + format_tables(results, markdown=True) + "\n")
    paths["markdown"] = os.path.join(out_dir, "results.md")
    return paths
