"""The outputs of ``dsoft bench terms`` (``dsoft_dist.bench.terms``): terms.json, terms.md and terms.png.

    paths = write_outputs(result, "runs/terms")   # result: {"machine", "samples", "runs": [...]}

Every run is labelled with its loss and its (s, d, w, m, C), so a set of runs trained with different
settings reads as a sweep: a table per run with a row per checkpoint step, and panels against the step
with a line per run (colour per run, line style per trained loss in the cosine panels, per measured loss
in the gradient and margin panels).
"""
from __future__ import annotations

import json
import os

from dsoft_dist.bench.accuracy_report import _pyplot

STYLES = ("-", "--", ":", "-.")
# the measured losses in the gradient and margin panels: (key, legend name, line style)
PULLS = (("intra", "D-Softmax intra", "-"), ("arcface", "ArcFace (m = 0.5)", "--"), ("trained", "trained loss", ":"))
PUSHES = (("inter", "D-Softmax w x inter", "-"), ("arcface", "ArcFace (m = 0.5)", "--"),
          ("trained", "trained loss", ":"))
MARGINS = (("d_softmax", "D-Softmax", "-"), ("arcface", "ArcFace (m = 0.5)", "--"), ("trained", "trained loss", ":"))


def margin_text(m) -> str:
    """(m1, m2, m3) as the margins that are set, e.g. 'm2=0.5'; 'none' for none or a loss without margins."""
    if m is None:
        return "none"
    set_ = [f"{k}={v:g}" for k, v, off in zip(("m1", "m2", "m3"), m, (1.0, 0.0, 0.0)) if v != off]
    return ",".join(set_) or "none"


def run_label(run: dict) -> str:
    """'<name>: <loss> s=.. d=.. w=.. m=.. C=..' for a measured run (w=1->0.5: the inter-weight schedule)."""
    st = run["settings"]
    end = st.get("inter_weight_end")  # the inter-weight schedule's last weight (None: constant)
    weight = f"{st['inter_weight']:g}" + ("" if end is None else f"->{end:g}")
    return (f"{run['name']}: {st['loss']} s={st['scale']:g} d={st['end_point']:g} w={weight} "
            f"m={margin_text(st['m'])} C={st['num_classes']}")


def _q(stat: dict, digits: int = 3) -> str:
    return f"{stat['median']:.{digits}f} [{stat['q25']:.{digits}f}, {stat['q75']:.{digits}f}]"


def _cell(row: dict, key: str, field: str = "mean", fmt: str = ".3g") -> str:
    return format(row[key][field], fmt) if key in row else "-"


def run_table(run: dict) -> list[str]:
    """A Markdown table of one run: a row per checkpoint step."""
    trained = any("grad_y/trained" in r for r in run["rows"])
    losses = ("intra / ArcFace" + (" / trained" if trained else ""), "inter / ArcFace" + (" / trained" if trained
              else ""), "D-Softmax / ArcFace" + (" / trained" if trained else ""))
    lines = [f"### {run_label(run)}", "",
             f"trained {run['settings']['loss']} ({run['settings']['negatives']} negatives, r = "
             f"{run['settings']['sample_rate']:g}), {run['settings']['model']}, {run['settings']['data']}; "
             f"{run['settings']['samples']} training samples, every class a negative", "",
             "| step | z_y median [q25, q75] | z_h median [q25, q75] | gap deg | z_y > d | LSE_neg | "
             f"mean abs dL/dz_y: {losses[0]} | mean abs dL/dz_h: {losses[1]} | effective margin deg (median): "
             f"{losses[2]} | capped | mean cos W | mean max cos W |",
             "|---:|---|---|---:|---:|---:|---|---|---|---|---:|---:|"]
    for r in run["rows"]:
        names = ("arcface", "trained") if trained else ("arcface",)
        pulls = " / ".join(_cell(r, f"grad_y/{n}") for n in ("intra",) + names)
        pushes = " / ".join(_cell(r, f"grad_h/{n}") for n in ("inter",) + names)
        margins = " / ".join(_cell(r, f"margin_deg/{n}", "median", ".2f") for n in ("d_softmax",) + names)
        capped = " / ".join(f"{r[f'margin_capped/{n}']:.0%}" for n in ("d_softmax",) + names)
        lines.append(f"| {r['step']} | {_q(r['z_y'])} | {_q(r['z_h'])} | {r['gap_deg']['median']:.2f} | "
                     f"{r['saturated']:.1%} | {r['lse_neg']['median']:.2f} | {pulls} | {pushes} | {margins} | "
                     f"{capped} | {r['weights']['mean_cos']:.3f} | {r['weights']['mean_max_cos']:.3f} |")
    return lines


def format_markdown(result: dict) -> str:
    """The machine and the command, the definitions in one line, then ``run_table`` of each run."""
    m = result["machine"]
    lines = [f"`{m['command']}` on {m['host']} ({m['cpu_count']} cores, {m['device']}), torch {m['torch']}, "
             f"{m['date']}", "",
             "Per checkpoint step: cosines of the measured training samples' embeddings with the class weights; "
             "z_h the hardest negative; gap = theta_h - theta_y; z_y > d: D-Softmax's intra term saturated; "
             "LSE_neg = LSE_{k != y} s z_k; the effective margin is theta_h - acos(z*), z* the target cosine where "
             "|dL/dz_y| falls to half its value at z_y = z_h with the negatives fixed (capped: it never does "
             "below 1). ArcFace and D-Softmax are measured at the run's s (D-Softmax also at its d, w)."]
    for run in result["runs"]:
        lines += [""] + run_table(run)
    return "\n".join(lines)


def _series(run: dict, key: str, field: str = "mean") -> list | None:
    if not all(key in r for r in run["rows"]):
        return None
    return [r[key] if field is None else r[key][field] for r in run["rows"]]


def _quartile_panel(ax, runs: list[dict], key: str, title: str, colors, loss_style) -> None:
    for run, color in zip(runs, colors):
        steps = run["steps"]
        ax.plot(steps, _series(run, key, "median"), color=color, linestyle=loss_style[run["settings"]["loss"]],
                marker="o", markersize=3, label=run_label(run))
        ax.fill_between(steps, _series(run, key, "q25"), _series(run, key, "q75"), color=color, alpha=0.15)
    ax.set_title(title, fontsize=9)


def _loss_panel(ax, runs: list[dict], prefix: str, what: tuple, field: str, colors, title: str,
                log: bool = False) -> None:
    from matplotlib.lines import Line2D  # noqa: PLC0415 (only when a plot is written)

    drawn = []
    for key, name, style in what:
        for run, color in zip(runs, colors):
            ys = _series(run, f"{prefix}/{key}", field)
            if ys is not None:
                ax.plot(run["steps"], ys, color=color, linestyle=style, marker=".", markersize=4)
                drawn.append((name, style))
    if log and all(y > 0 for line in ax.get_lines() for y in line.get_ydata()):
        ax.set_yscale("log")
    handles = [Line2D([], [], color="0.2", linestyle=s, label=n) for n, s in dict.fromkeys(drawn)]
    ax.legend(handles=handles, fontsize=7)
    ax.set_title(title, fontsize=9)


def plot(result: dict, path: str) -> None:
    """terms.png: z_y, z_h (median, quartile band), the saturated fraction, mean |dL/dz_y| of intra vs ArcFace,
    mean |dL/dz_h| of w x inter vs ArcFace and the median effective margins, each against the step."""
    plt = _pyplot()
    runs = result["runs"]
    colors = [plt.get_cmap("tab10")(i % 10) for i in range(len(runs))]
    losses = list(dict.fromkeys(r["settings"]["loss"] for r in runs))
    loss_style = {loss: STYLES[i % len(STYLES)] for i, loss in enumerate(losses)}
    fig, axes = plt.subplots(2, 3, figsize=(17, 9.5))
    _quartile_panel(axes[0, 0], runs, "z_y", "target cosine z_y (median, quartiles)", colors, loss_style)
    _quartile_panel(axes[0, 1], runs, "z_h", "hardest negative z_h (median, quartiles)", colors, loss_style)
    ax = axes[0, 2]
    for run, color in zip(runs, colors):
        ax.plot(run["steps"], _series(run, "saturated", None), color=color,
                linestyle=loss_style[run["settings"]["loss"]], marker="o", markersize=3)
    ax.set_title("fraction of rows with z_y > d (intra term saturated)", fontsize=9)
    _loss_panel(axes[1, 0], runs, "grad_y", PULLS, "mean", colors, "mean |dL/dz_y| (pull on the target)", log=True)
    _loss_panel(axes[1, 1], runs, "grad_h", PUSHES, "mean", colors, "mean |dL/dz_h| (push on the hardest negative)",
                log=True)
    _loss_panel(axes[1, 2], runs, "margin_deg", MARGINS, "median", colors, "effective margin, degrees (median)")
    for a in axes.flat:
        a.set_xlabel("step")
        a.grid(True, alpha=0.3)
    fig.legend(*axes[0, 0].get_legend_handles_labels(), loc="lower center", ncol=1, fontsize=8,
               title="runs (line style in the top row: the trained loss)", title_fontsize=8)
    fig.tight_layout(rect=(0, 0.04 + 0.025 * len(runs), 1, 1))  # a legend row per run: sweep names are long
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(result: dict, out: str) -> list[str]:
    """Sets result["markdown"] and writes terms.json, terms.md and terms.png into ``out``; returns their paths."""
    result["markdown"] = format_markdown(result)
    os.makedirs(out, exist_ok=True)
    paths = [os.path.join(out, f"terms.{ext}") for ext in ("json", "md", "png")]
    with open(paths[0], "w", encoding="utf-8") as fh:
        json.dump(result, fh, indent=1)
    with open(paths[1], "w", encoding="utf-8") as fh:
        fh.write(result["markdown"] + "\n")
    plot(result, paths[2])
    return paths
