"""Draws docs/results/parity-three-seeds.png: TAR@FAR=1e-3 per seed of D-Softmax's schedule, ArcFace and D-Softmax-K
at r = 1/8 on the three image tasks of about 20 epochs and more (and D-Softmax-KN: both forms on glyphs, the second
at C = 500 and C = 2,000), from the records `dsoft bench accuracy` wrote. A run name holds neither the class count nor
the steps, so a record file may hold one name for two budgets: each task picks its records by steps and K.

    python docs/benchmarks/parity-2026-12-07/seeds_plot.py    # from the repository root
"""
from __future__ import annotations

import json
import math
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
SCHEDULE = "@end_point=1,inter_weight=1,inter_weight_end=0"
K8 = "D-Softmax-K, r = 1/8, the schedule"
# (title, (classes C, steps), {label: (records, run name with {seed})})
TASKS = [
    ("faces, C = 500, 2,700 steps (43 epochs)", (500, 2700),
     {"D-Softmax, the schedule": ("../parity-2026-12-06/results-steps-2700.jsonl",
                                  "images-d_softmax-1-s{seed}" + SCHEDULE),
      "ArcFace, m = 0.6 (its best)": ("../parity-2026-12-06/results-steps-2700.jsonl",
                                      "images-arcface-1-s{seed}@m2=0.6"),
      K8: ("../parity-2026-12-06/results-steps-2700.jsonl", "images-d_softmax_k-1of8-s{seed}" + SCHEDULE),
      "D-Softmax-KN, r = 1/8 (each row's nearest)": ("results-kn-rows.jsonl", "images-d_softmax_kn-1of8-s{seed}")}),
    ("glyphs, C = 1,000, 2,400 steps (19 epochs)", (1000, 2400),
     {"D-Softmax, the schedule": ("results.jsonl", "glyphs-d_softmax-1-s{seed}" + SCHEDULE + ",lr=0.02"),
      "ArcFace, m = 0.5 (lr 0.01, its best)": ("results.jsonl", "glyphs-arcface-1-s{seed}@lr=0.01"),
      K8: ("results-sampled.jsonl", "glyphs-d_softmax_k-1of8-s{seed}@lr=0.02"),
      "D-Softmax-KN as first built (a shared set)": ("results-kn.jsonl", "glyphs-d_softmax_kn-1of8-s{seed}@lr=0.02"),
      "D-Softmax-KN, r = 1/8 (each row's nearest)": ("results-kn-rows.jsonl",
                                                     "glyphs-d_softmax_kn-1of8-s{seed}@lr=0.02")}),
    ("faces, C = 2,000, 5,400 steps (21.6 epochs)", (2000, 5400),
     {"D-Softmax, the schedule": ("results.jsonl", "images-d_softmax-1-s{seed}" + SCHEDULE),
      "ArcFace, m = 0.5": ("results.jsonl", "images-arcface-1-s{seed}"),
      K8: ("results-sampled.jsonl", "images-d_softmax_k-1of8-s{seed}"),
      "D-Softmax-KN, r = 1/8 (each row's nearest)": ("results-kn-rows.jsonl", "images-d_softmax_kn-1of8-s{seed}")}),
]


def records(path: str, classes: int, steps: int) -> dict[str, dict]:
    """One task's records of a file by run name, known by its steps and K = ceil(r C); a name twice among them is
    refused."""
    with open(os.path.join(HERE, path), encoding="utf-8") as fh:
        recs = [json.loads(line) for line in fh if line.strip()]
    recs = [r for r in recs if r["loss_curve"][-1][0] == steps and r["k"] == math.ceil(r["rate"] * classes)]
    names = [r["name"] for r in recs]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"{path} holds {twice} more than once for one task")
    return {r["name"]: r for r in recs}


def main() -> None:
    fig, axes = plt.subplots(1, len(TASKS), figsize=(5 * len(TASKS), 3.6))
    for ax, (title, task, series) in zip(axes, TASKS):
        for (label, (path, name)), marker in zip(series.items(), ("o", "s", "^", "D", "v")):
            recs = records(path, *task)
            seeds = [s for s in range(3) if name.format(seed=s) in recs]
            tars = [100 * recs[name.format(seed=s)]["tar_at_1e-03"] for s in seeds]
            ax.plot(seeds, tars, marker=marker, label=label)
            ax.axhline(sum(tars) / len(tars), ls=":", lw=1, color=ax.lines[-1].get_color())
        ax.set_title(title, fontsize=9)
        ax.set_xticks(range(3))
        ax.set_xlabel("seed (dotted: the mean)")
        ax.set_ylabel("TAR@FAR=1e-3 (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    out = os.path.join(HERE, "..", "..", "results", "parity-three-seeds.png")
    fig.savefig(out, dpi=110)
    print("wrote", os.path.normpath(out))


if __name__ == "__main__":
    main()
