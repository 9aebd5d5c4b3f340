"""The dissection figure: 3-D embeddings of 5 vs 10 identities, trained with softmax vs D-Softmax.

The paper's argument: in softmax the intra-class objective (pull a sample to its class) and the
inter-class objective (push it from the others) share one term, so once the classes are easy to
tell apart, with few of them, the loss is near zero and stops pulling samples together: softmax
relaxes the intra-class objective as the inter-class one gets easier. D-Softmax's intra term does
not see the other classes (``softplus(s (d - cos theta_y))``), so its compactness should not
depend on how many classes there are.

For each loss (normface: the normalized softmax with the same scale s; d_softmax_paper: D-Softmax in the
paper's form, d = 0.9 with a constant inter weight) and each class
count (5, 10) and seed, ``dsoft train`` trains an ``mlp`` with a 3-D embedding on synthetic vector
identities (``data.difficulty=hard``). The embedding of --eval-samples samples per identity that
training never saw (sample indices past ``data.samples_per_class``) is measured:

- intra-class angle: the mean angle (degrees) between a sample and its identity's mean direction
  (also over the identity's training samples, what the loss itself saw);
- nearest-class angle: the mean over identities of the angle to the nearest other identity's mean.

    dsoft bench dissection                       # 5 and 10 identities, normface and d_softmax_paper, 3 seeds
    dsoft bench dissection --seeds 0 --out runs/dissection

Writes ``dissection.json`` (one record per run), ``dissection.md`` (mean and spread over seeds) and
``dissection.png`` (the first seed's embeddings on the sphere, one panel per loss and class count).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import numpy as np

from dsoft_dist.bench.accuracy import train
from dsoft_dist.bench.cli import bench_parser
from dsoft_dist.bench.speedup import machine
from dsoft_dist.data.synthetic import SyntheticVectors, vector_difficulty
from dsoft_dist.eval.extract import extract_embeddings
from dsoft_dist.models.checkpoint import load_backbone
from dsoft_dist.utils import int_list

LOSSES = ("normface", "d_softmax_paper")  # the paper's figure: its form, d = 0.9 with a constant inter weight
SAMPLES_PER_CLASS = 200  # training samples of each identity
DIM = 64  # input vector size


def run_config(loss: str, classes: int, seed: int, args, out: str) -> dict:
    return {
        "name": f"dissection-{loss}-{classes}-s{seed}", "seed": seed,
        "model": {"name": "mlp", "embedding_size": 3, "in_features": DIM},
        "head": {"loss": loss, "negatives": "all", "scale": args.scale, "seed": seed},
        "data": {"source": "synthetic", "synthetic_mode": "vectors", "vector_dim": DIM, "difficulty": "hard",
                 "num_classes": classes, "samples_per_class": SAMPLES_PER_CLASS, "batch_size": 64,
                 "num_workers": 0, "seed": seed},
        "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 5.0e-4},
        "schedule": {"steps": args.steps, "warmup_steps": max(1, args.steps // 15), "decay": "cosine"},
        "parallel": {"nproc": 1, "backend": "gloo"},
        "logging": {"output_dir": out, "log_every": max(1, args.steps // 20), "progress": False},
        "checkpoint": {"resume": "never"},
    }


def held_out(classes: int, seed: int, per_identity: int, first: int = SAMPLES_PER_CLASS):
    """Samples ``first, first + 1, ...`` of each training identity, by default those training never drew:
    (vectors, identity of each)."""
    ids = np.repeat(np.arange(classes), per_identity)
    index = np.tile(np.arange(first, first + per_identity), classes)
    src = SyntheticVectors(classes, dim=DIM, seed=seed, **vector_difficulty("hard"))
    return src.batch(ids, index), ids


def angles(emb: np.ndarray, ids: np.ndarray) -> dict:
    """Mean intra-class angle and mean nearest-class angle (degrees) of unit embeddings (N, 3)."""
    classes = int(ids.max()) + 1
    means = np.stack([emb[ids == c].mean(axis=0) for c in range(classes)])
    means /= np.linalg.norm(means, axis=1, keepdims=True)
    intra = np.degrees(np.arccos(np.clip(np.einsum("ij,ij->i", emb, means[ids]), -1.0, 1.0)))
    between = np.degrees(np.arccos(np.clip(means @ means.T, -1.0, 1.0)))
    np.fill_diagonal(between, np.inf)
    return {"intra_deg": float(intra.mean()), "intra_deg_p90": float(np.percentile(intra, 90)),
            "nearest_class_deg": float(between.min(axis=1).mean())}


def measure(loss: str, classes: int, seed: int, args) -> dict:
    out = os.path.join(args.out, "runs", f"{loss}-{classes}-s{seed}")
    train_s = train(run_config(loss, classes, seed, args, out), out)
    model, _ = load_backbone(os.path.join(out, "backbone.pt"))
    inputs, ids = held_out(classes, seed, args.eval_samples)
    emb = extract_embeddings(model, inputs, batch_size=512)
    seen, seen_ids = held_out(classes, seed, SAMPLES_PER_CLASS, first=0)
    trained = angles(extract_embeddings(model, seen, batch_size=512), seen_ids)
    with open(os.path.join(out, "metrics.jsonl"), encoding="utf-8") as fh:
        last = [json.loads(line) for line in fh if line.strip()][-1]
    record = {"loss": loss, "classes": classes, "seed": seed, "train_s": train_s, **angles(emb, ids),
              "train_intra_deg": trained["intra_deg"], "train_nearest_class_deg": trained["nearest_class_deg"],
              "final_loss": last["loss"], "final_intra": last.get("intra"), "final_inter": last.get("inter"),
              "embeddings": emb.round(4).tolist(), "ids": ids.tolist()}
    print(f"{loss} {classes} identities seed {seed}: intra-class {record['intra_deg']:.1f} deg held out, "
          f"{record['train_intra_deg']:.1f} deg on training samples; nearest class {record['nearest_class_deg']:.1f} "
          f"deg ({train_s:.0f} s)", flush=True)
    return record


def summarize(records: list[dict]) -> list[dict]:
    rows = []
    for loss in LOSSES:
        for classes in sorted({r["classes"] for r in records}):
            mine = [r for r in records if (r["loss"], r["classes"]) == (loss, classes)]
            if not mine:
                continue
            row = {"loss": loss, "classes": classes, "seeds": len(mine)}
            for key in ("intra_deg", "intra_deg_p90", "train_intra_deg", "nearest_class_deg"):
                values = [r[key] for r in mine]
                row[key] = statistics.fmean(values)
                row[key + "_sd"] = statistics.stdev(values) if len(values) > 1 else 0.0
            rows.append(row)
    return rows


def format_markdown(result: dict) -> str:
    m = result["machine"]
    lines = [f"`{m['command']}` on {m['host']} ({m['cpu_count']} cores, {m['device']}), torch {m['torch']}, "
             f"{m['date']}; 3-D embeddings of {result['eval_samples']} held-out samples per identity; mean +- "
             "standard deviation over the seeds, degrees", "",
             "| loss | identities | seeds | intra-class angle | its 90th percentile | intra-class angle, training "
             "samples | nearest-class angle |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in result["summary"]:
        cells = [f"{r[k]:.1f} +- {r[k + '_sd']:.1f}"
                 for k in ("intra_deg", "intra_deg_p90", "train_intra_deg", "nearest_class_deg")]
        lines.append(f"| {r['loss']} | {r['classes']} | {r['seeds']} | {' | '.join(cells)} |")
    return "\n".join(lines)


def plot(records: list[dict], path: str) -> None:
    """The first seed's embeddings on the unit sphere: a row per loss, a column per class count."""
    import matplotlib  # noqa: PLC0415 (only when a plot is written)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    seed = min(r["seed"] for r in records)
    counts = sorted({r["classes"] for r in records})
    fig = plt.figure(figsize=(4.2 * len(counts), 4.2 * len(LOSSES)))
    u, v = np.mgrid[0:2 * np.pi:30j, 0:np.pi:15j]
    for i, loss in enumerate(LOSSES):
        for j, classes in enumerate(counts):
            r = next((r for r in records if (r["loss"], r["classes"], r["seed"]) == (loss, classes, seed)), None)
            if r is None:
                continue
            ax = fig.add_subplot(len(LOSSES), len(counts), i * len(counts) + j + 1, projection="3d")
            ax.plot_wireframe(np.cos(u) * np.sin(v), np.sin(u) * np.sin(v), np.cos(v), color="0.85", linewidth=0.4)
            emb, ids = np.asarray(r["embeddings"]), np.asarray(r["ids"])
            ax.scatter(emb[:, 0], emb[:, 1], emb[:, 2], c=ids, cmap="tab10", s=4, depthshade=False)
            ax.set_title(f"{loss}, {classes} identities\nintra-class {r['intra_deg']:.1f} deg", fontsize=9)
            ax.set_box_aspect((1, 1, 1))
            ax.set_axis_off()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    p = bench_parser("dissection", __doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/dissection", help="output folder (default runs/dissection)")
    p.add_argument("--classes", default="5,10", help="identity counts (default 5,10)")
    p.add_argument("--seeds", default="0,1,2", help="seeds (default 0,1,2)")
    p.add_argument("--steps", type=int, default=400, help="training steps of each run (default 400)")
    p.add_argument("--scale", type=float, default=16.0, help="the scale s of both losses (default 16)")
    p.add_argument("--eval-samples", type=int, default=100, help="held-out samples per identity (default 100)")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    counts = int_list(args.classes, "--classes", 2)
    seeds = int_list(args.seeds, "--seeds", 0)
    if args.steps < 1 or args.eval_samples < 2:
        raise ValueError(f"--steps {args.steps} / --eval-samples {args.eval_samples}: need >= 1 step and >= 2 "
                         "samples per identity")
    records = [measure(loss, classes, seed, args) for seed in seeds for loss in LOSSES for classes in counts]
    result = {"machine": machine(argv, "dissection"), "eval_samples": args.eval_samples, "scale": args.scale,
              "steps": args.steps, "records": records, "summary": summarize(records)}
    result["markdown"] = format_markdown(result)
    os.makedirs(args.out, exist_ok=True)
    paths = [os.path.join(args.out, f"dissection.{ext}") for ext in ("json", "md", "png")]
    with open(paths[0], "w", encoding="utf-8") as fh:
        json.dump(result, fh)
    with open(paths[1], "w", encoding="utf-8") as fh:
        fh.write(result["markdown"] + "\n")
    plot(records, paths[2])
    sys.stdout.write(result["markdown"] + "\n\nwrote " + ", ".join(paths) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
