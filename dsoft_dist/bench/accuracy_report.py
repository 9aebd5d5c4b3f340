"""The report of ``dsoft bench accuracy`` (``dsoft_dist.bench.accuracy`` runs the sweep): the methods and
parts it compares, the summary over seeds, and the files it writes to --out.

    rows = summarize(records)                 # one row per (part, method, rate, point): mean and spread over seeds
    text = format_markdown(result)            # accuracy.md's tables
    paths = write_outputs(result, out)        # accuracy.json, .csv, .md, accuracy_vs_rate.png, loss_curves.png

``result`` is ``{"settings", "machine", "records", "summary", "markdown"}`` (plus ``"config"``, the file of a
``--config`` sweep): a record per run (its part, method, rate, K, seed, grid point, train seconds, verification
figures and loss curve). A built-in part's figures are the bench's own (``PART_FIGURES``); a ``--config`` run's
are the trainer's final verification, named in the record's ``"figures"``. ``sweep.png``, the figures against
the grid points, is ``dsoft_dist.bench.sweep_report``'s.
"""
from __future__ import annotations

import csv
import json
import os
import statistics

from dsoft_dist.bench.speedup import SAMPLED
from dsoft_dist.config.schema import rate_text

FULL_LOSSES = ("softmax", "normface", "sphereface", "cosface", "arcface", "d_softmax_paper", "d_softmax")
# the sampled methods of this bench: the speed table's, and D-Softmax over Partial-FC's negative set (which costs
# what partial_fc costs at the same r, so the speed table leaves it out)
SAMPLED_HEADS = {**SAMPLED, "d_softmax_partial": ("d_softmax", "partial")}
METHODS = (*FULL_LOSSES, "d_softmax_b", *SAMPLED_HEADS)
FULL_OF = {"d_softmax_k": "d_softmax", "d_softmax_kn": "d_softmax", "d_softmax_partial": "d_softmax",
           "partial_fc": "arcface", "sampled_softmax": "softmax"}  # r = 1
PARTS = ("vectors", "images", "glyphs")
PART_OPTION = {"vectors": "vector", "images": "image", "glyphs": "glyph"}  # --<option>-classes, -steps
CONFIG_PART = "config"  # the runs of the user's own --config
PART_FIGURES = ("tar_at_1e-03", "tar_at_1e-04", "accuracy")  # the built-in parts' verification, fractions


def classes_of(part: str, s: dict) -> int:
    """The training identities (C) of a built-in part under the sweep's settings ``s``."""
    return s[f"{PART_OPTION[part]}_classes"]


def figures_of(record: dict) -> list[str]:
    """The verification figures (fractions) of a record or summary row: the bench's own three for a built-in part,
    the trainer's (``<set>/accuracy``, ``<set>/val_at_far``, ``<list>/tar@<far>``) for a --config run."""
    return list(record.get("figures") or PART_FIGURES)


def _far_text(far: str) -> str:
    mantissa, exponent = f"{float(far):.0e}".split("e")
    return f"{mantissa}e{int(exponent)}"  # 1e-03 -> 1e-3


def figure_label(name: str) -> str:
    """A figure's column title: tar_at_1e-03 -> TAR@FAR=1e-3, lfw/val_at_far -> lfw TAR@FAR=1e-3 (VAL: the
    trainer verifies .bin sets at FAR = 1e-3), pairs/tar@1e-04 -> pairs TAR@FAR=1e-4."""
    where, _, metric = name.rpartition("/")
    if metric == "accuracy":
        text = "10-fold accuracy"
    elif metric == "val_at_far":
        text = "TAR@FAR=1e-3 (VAL)"
    elif metric.startswith(("tar_at_", "tar@")):
        text = "TAR@FAR=" + _far_text(metric.removeprefix("tar_at_").removeprefix("tar@"))
    else:
        text = metric
    return f"{where} {text}" if where else text


def value_text(value) -> str:
    """A grid value as folder-safe text: 48 and 48.0 -> 48, 0.8 -> 0.8, true, a list as compact JSON; any
    character but letters, digits and . _ + - becomes _."""
    if isinstance(value, bool) or value is None:
        text = json.dumps(value)
    elif isinstance(value, float):
        text = repr(value).removesuffix(".0")
    elif isinstance(value, (int, str)):
        text = str(value)
    else:
        text = json.dumps(value, separators=(",", ":"), sort_keys=True)
    return "".join(c if c.isascii() and (c.isalnum() or c in "._+-") else "_" for c in text)


def point_text(point: dict) -> str:
    """A grid point as text for run names and labels: ``end_point=0.8,scale=48`` (sorted; each key by its last
    component, or in full where two keys share it); "" for no point."""
    last = [key.rpartition(".")[2] for key in point]
    labels = {key: (short if last.count(short) == 1 else key) for key, short in zip(point, last)}
    return ",".join(f"{labels[k]}={value_text(v)}" for k, v in sorted(point.items(), key=lambda kv: labels[kv[0]]))


def _hashable(value):
    if isinstance(value, dict):
        return tuple(sorted((k, _hashable(v)) for k, v in value.items()))
    return tuple(_hashable(v) for v in value) if isinstance(value, list) else value


def point_key(record: dict) -> tuple:
    """The grid point of a record or summary row as a sorted tuple of (key, value) items (() without a sweep)."""
    return _hashable(record.get("point") or {})


def _spread(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(records: list[dict]) -> list[dict]:
    """One row per (part, method, rate, point): mean and sample standard deviation over the seeds of each figure
    (in %); the sampled methods' r = 1 rows are their full loss's runs at the same point."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["part"], r["method"], r["rate"], point_key(r)), []).append(r)
    rows = []
    for (part, method, rate, _), mine in groups.items():
        figures = [f for f in figures_of(mine[0]) if all(f in r for r in mine)]
        row = {"part": part, "method": method, "rate": rate, "point": mine[0].get("point") or {}, "k": mine[0]["k"],
               "seeds": len(mine), "train_s": statistics.fmean(r["train_s"] for r in mine), "figures": figures}
        if "impostor_pairs" in mine[0]:
            row["impostor_pairs"] = mine[0]["impostor_pairs"]
        for metric in figures:
            row[metric], row[metric + "_sd"] = _spread([100 * r[metric] for r in mine])
        rows.append(row)
    for part, point in dict.fromkeys((r["part"], point_key(r)) for r in rows):
        mine = [r for r in rows if (r["part"], point_key(r)) == (part, point)]
        for method, full_loss in FULL_OF.items():
            full = [r for r in mine if (r["method"], r["rate"]) == (full_loss, 1.0)]
            if full and any(r["method"] == method for r in mine):
                rows.append({**full[0], "method": method, "same_as": full_loss})
    return rows


def _intro(result: dict) -> str:
    """accuracy.md's first line: the command, the machine and how the runs were verified."""
    m, s, parts = result["machine"], result["settings"], {r["part"] for r in result["summary"]}
    protocol = []
    if parts - {CONFIG_PART}:
        protocol.append(f"verification on {s['eval_identities']} unseen identities x {s['eval_samples']} samples "
                        "(TAR over all pairs, unresolvable where FAR x impostor pairs < 1; 10-fold accuracy over the "
                        "genuine pairs + as many impostors)")
    if CONFIG_PART in parts:
        protocol.append(f"the runs of {result.get('config', 'the --config file')} verified by the trainer at the end "
                        "of training on its eval sets (10-fold accuracy and VAL at FAR = 1e-3 of each .bin set, "
                        "TAR@FAR of each pair list)")
    return (f"`{m['command']}` on {m['host']} ({m['cpu_count']} cores, {m['device']}), torch {m['torch']}, "
            f"{m['date']}; {'; '.join(protocol)}; mean +- standard deviation over the seeds, in %")


def _shown(value) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def resolvable(row: dict, figure: str) -> bool:
    """False for a built-in part's TAR at a FAR below one impostor pair (FAR x impostor pairs < 1): a figure
    the pairs cannot measure. The trainer's figures (--config) are as it reports them."""
    far = {"tar_at_1e-03": 1e-3, "tar_at_1e-04": 1e-4}.get(figure)
    return far is None or "impostor_pairs" not in row or far * row["impostor_pairs"] >= 1


def _cells(r: dict, figures: list[str]) -> list[str]:
    """A summary row's figure cells: mean +- spread, "unresolvable" (``resolvable``), "-" where the row lacks
    the figure."""
    return [("-" if f not in r else "unresolvable" if not resolvable(r, f) else f"{r[f]:.2f} +- {r[f + '_sd']:.2f}")
            for f in figures]


def _part_table(part: str, rows: list[dict], result: dict, point_keys: list[str]) -> list[str]:
    """The title and table of one part: a row per (method, rate, point), the point's keys as columns."""
    s = result["settings"]
    figures = list(dict.fromkeys(f for r in rows for f in figures_of(r)))
    if part == CONFIG_PART:
        title, classes = f"**config: {result.get('config', '--config')}**", None
    else:
        classes, steps = classes_of(part, s), s[f"{PART_OPTION[part]}_steps"]
        title = f"**{part}: C = {classes:,} training identities, {steps} steps**"
    lines = ["", title, "", "| " + " | ".join(["method", "r", "K", "seeds", *point_keys,
                                                *map(figure_label, figures), "train s"]) + " |",
             "|---|" + "---:|" * (4 + len(point_keys) + len(figures))]
    for r in rows:
        name = r["method"] + (f" (= {r['same_as']})" if "same_as" in r else "")
        rate, k = rate_text(r["rate"]), f"{r['k']:,}"
        if r["method"] == "d_softmax_b":
            rate, k = (f"<= {r['k'] / classes:.3g}" if classes else "batch"), f"<= {r['k']:,}"
        elif SAMPLED_HEADS.get(r["method"], ("", ""))[1] == "partial" and r["rate"] < 1:
            k = f">= {r['k']:,}"  # every class of the batch is kept too: r C is K's floor
        point = [_shown(r["point"][key]) if key in r["point"] else "-" for key in point_keys]
        cells = [name, rate, k, str(r["seeds"]), *point, *_cells(r, figures), f"{r['train_s']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def format_markdown(result: dict) -> str:
    """accuracy.md: the machine and protocol, then a table per part of the summary rows (mean +- spread, in %),
    with a column per swept key when there is a grid."""
    lines = [_intro(result)]
    order = {m: i for i, m in enumerate(METHODS)}
    point_keys = list(dict.fromkeys(key for r in result["summary"] for key in r.get("point") or {}))
    for part in (*PARTS, CONFIG_PART):
        rows = sorted((r for r in result["summary"] if r["part"] == part),
                      key=lambda r: (order.get(r["method"], len(order)), r["method"], -r["rate"]))
        if rows:
            lines += _part_table(part, rows, result, point_keys)
    return "\n".join(lines)


def write_csv(records: list[dict], path: str) -> None:
    """accuracy.csv: one row per run (its settings, a column per swept key, its figures; no loss curve)."""
    fields = ["part", "method", "rate", "k", "seed", "train_s", "accuracy", "accuracy_std", "tar_at_1e-03",
              "tar_at_1e-04", "genuine_pairs", "impostor_pairs"]
    fields = fields[:6] + [f for f in fields[6:] if any(f in r for r in records)]  # none of these in --config runs
    point_keys = list(dict.fromkeys(key for r in records for key in r.get("point") or {}))
    fields += [*point_keys, *dict.fromkeys(f for r in records for f in figures_of(r) if f not in fields)]
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows({**r, **{k: _shown(v) for k, v in (r.get("point") or {}).items()}} for r in records)


def _pyplot():
    import matplotlib  # noqa: PLC0415 (only when a plot is written)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    return plt


def plot_rates(summary: list[dict], settings: dict, path: str) -> bool:
    """TAR@FAR=1e-3 against the sample rate, a line per sampled method (its r = 1 point is its full loss),
    the full losses as points at r = 1, d_softmax_b at its K / C; error bars are the spread over seeds.
    Only the built-in parts' rows without a grid point (a grid's figures are sweep.png's): False, writing
    nothing, when there are none."""
    summary = [r for r in summary if r["part"] in PARTS and not r.get("point")]
    if not summary:
        return False
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
    return True


def plot_losses(records: list[dict], path: str) -> None:
    """The training loss of each (method, rate, point), first seed, a panel per part (each loss on its own scale:
    the curves show convergence, not a comparison of values)."""
    plt = _pyplot()
    parts = [p for p in (*PARTS, CONFIG_PART) if any(r["part"] == p for r in records)]
    fig, axes = plt.subplots(1, len(parts), figsize=(6 * len(parts), 4.4), squeeze=False)
    for ax, part in zip(axes[0], parts):
        first = min(r["seed"] for r in records if r["part"] == part)
        ax.set_prop_cycle(color=plt.cm.tab20.colors)  # a color for each of up to 20 runs
        for r in records:
            if r["part"] == part and r["seed"] == first and r["loss_curve"]:
                steps, losses = zip(*r["loss_curve"])
                label = f"{r['method']} {rate_text(r['rate'])} {point_text(r.get('point') or {})}"
                ax.plot(steps, losses, label=label.strip())
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.set_title(f"{part} (seed {first})")
        ax.grid(True, which="both", alpha=0.3)
        # below the panel: a grid point's name is long, and inside the panel the legend hid the curves
        ax.legend(fontsize=6, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=1)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def write_outputs(result: dict, out: str) -> dict:
    """Writes the report files into ``out`` (accuracy_vs_rate.png only where ``plot_rates`` has rows); returns
    {file name: path} of those written."""
    paths = {name: os.path.join(out, name) for name in ("accuracy.json", "accuracy.csv", "accuracy.md",
                                                        "accuracy_vs_rate.png", "loss_curves.png")}
    with open(paths["accuracy.json"], "w", encoding="utf-8") as fh:
        json.dump(result, fh, indent=1)
    write_csv(result["records"], paths["accuracy.csv"])
    with open(paths["accuracy.md"], "w", encoding="utf-8") as fh:
        fh.write(result["markdown"] + "\n")
    if not plot_rates(result["summary"], result["settings"], paths["accuracy_vs_rate.png"]):
        del paths["accuracy_vs_rate.png"]
    plot_losses(result["records"], paths["loss_curves.png"])
    return paths
