"""Benchmark the whole training step of the trainer, per sample rate, against a bare loop in the same run.

    dsoft bench train                         # C=1,000,000, D=512, global batch 512, 2 ranks
    dsoft bench train --classes 100000 --sample-rates 1 0.125 --repeats 2

With --checkpoints N it also times N whole checkpoint saves (``Trainer.save_checkpoint``: every
rank writes its head piece, rank 0 the backbone and trainer state, all hash in parallel) and
prints them against the step time.

For each sample rate r (r = 1: negatives "all", the exact D-Softmax; r < 1: "random", D-Softmax-K)
it builds one run (MLP backbone on synthetic vectors, the class-sharded head, SGD on both sides,
DDP, fp32) on --world-size gloo ranks and times, alternately in each repeat:
- trainer: ``Trainer.run_steps`` (data, backbone, head, both optimizers, the gradient
  conventions, the overflow check, a JSONL row every --log-every steps) for --steps steps;
- bare: the smallest loop doing the same work with the same objects: next batch, backbone
  forward, ``emb.register_hook(g * P)``, head forward, one backward, both optimizer steps.
Each repeat's time is the slowest rank's; the table shows medians over repeats, the trainer's
overhead over the bare loop (median of the paired per-repeat ratios), the speedup of each rate
over r = 1, and each loop's time split (data wait / backbone / head / optimizer; the bare
loop's single backward is counted under "head+backbone backward").
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist

from dsoft_dist.bench.cli import bench_parser
from dsoft_dist.config import config_from_dict
from dsoft_dist.parallel.processes import distributed, spawn_local


def run_config(args, rate: float, out_dir: str) -> dict:
    """The benchmark run's config for sample rate ``rate``."""
    local_batch = args.batch // args.world_size
    return {
        "name": f"bench_r{rate:g}", "seed": 0,
        "model": {"name": "mlp", "embedding_size": args.dim, "in_features": args.in_features},
        "head": {"loss": "d_softmax", "negatives": "all" if rate == 1.0 else "random", "sample_rate": rate,
                 "scale": 64.0},
        "data": {"source": "synthetic", "synthetic_mode": "vectors", "vector_dim": args.in_features,
                 "num_classes": args.classes, "samples_per_class": 2, "batch_size": local_batch, "num_workers": 0},
        "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4},
        "schedule": {"steps": 10 ** 6, "warmup_steps": 0, "decay": "constant"},
        "parallel": {"nproc": args.world_size, "backend": "gloo"},
        "logging": {"output_dir": out_dir, "log_every": args.log_every, "progress": False},
        "checkpoint": {"async_save": args.async_checkpoints},
    }


def _bare_steps(t, n: int) -> dict:
    """n steps of the bare loop over the trainer's own objects; returns its time split (seconds)."""
    net, head, opt, head_opt, world = t.engine.net, t.head, t.engine.optimizer, t.head_optimizer, t.env.world_size
    split = {"data": 0.0, "backbone forward": 0.0, "head forward": 0.0, "head+backbone backward": 0.0,
             "optimizer": 0.0}
    for _ in range(n):
        t0 = time.perf_counter()
        x, y = next(t.data)
        t1 = time.perf_counter()
        emb = net(x)
        if world > 1:
            emb.register_hook(lambda g: g * world)
        t2 = time.perf_counter()
        loss = head(emb, y)
        t3 = time.perf_counter()
        loss.backward()
        t4 = time.perf_counter()
        opt.step()
        head_opt.step()
        opt.zero_grad(set_to_none=True)
        head_opt.zero_grad(set_to_none=True)
        t5 = time.perf_counter()
        for key, dt in zip(split, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)):
            split[key] += dt / n
    return split


def _slowest(seconds: float) -> float:
    t = torch.tensor(seconds, dtype=torch.float64)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def _time_rate(args, rate: float, out_dir: str) -> dict:
    """Every rank: build the run, warm up, then alternate timed trainer and bare repeats."""
    from dsoft_dist.train.trainer import Trainer

    with distributed("gloo") as env:
        t = Trainer(config_from_dict(run_config(args, rate, out_dir)), env)
        steps = args.steps if rate < 1.0 else args.steps_full
        t.run_steps(args.warmup)
        _bare_steps(t, args.warmup)
        trainer_s, bare_s, trainer_split, bare_split = [], [], [], []
        for _ in range(args.repeats):
            dist.barrier()
            t0 = time.perf_counter()
            t.run_steps(steps)
            trainer_s.append(_slowest((time.perf_counter() - t0) / steps))
            trainer_split.append(dict(t.last_output.timings))
            dist.barrier()
            t0 = time.perf_counter()
            bare_split.append(_bare_steps(t, steps))
            bare_s.append(_slowest((time.perf_counter() - t0) / steps))
        saves = [_time_save(t, steps) for _ in range(args.checkpoints)]
        t.close()
        if not env.is_main:
            return {}
        result = {"rate": rate, "trainer": trainer_s, "bare": bare_s, "saves": saves,
                  "checkpoint_mib": _folder_mib(t.checkpointer.root),
                  "trainer_split": {k: statistics.median(s[k] for s in trainer_split) for k in trainer_split[0]},
                  "bare_split": {k: statistics.median(s[k] for s in bare_split) for k in bare_split[0]},
                  "rows": t.head.last_num_negatives}
        torch.save(result, os.path.join(out_dir, "result.pt"))
        return result


def _time_save(t, steps: int) -> dict:
    """One Trainer.save_checkpoint, then ``steps`` training steps, then the wait for the save: the seconds the
    save blocked training, the s/step of the steps that ran beside a background save, the whole save."""
    dist.barrier()
    t0 = time.perf_counter()
    t.save_checkpoint()
    block = time.perf_counter() - t0
    t1 = time.perf_counter()
    t.run_steps(steps)
    during = (time.perf_counter() - t1) / steps
    t.checkpointer.wait()
    return {"block": _slowest(block), "during": _slowest(during), "total": _slowest(time.perf_counter() - t0)}


def _folder_mib(root: str) -> float:
    latest = open(os.path.join(root, "latest")).read().strip()
    folder = os.path.join(root, latest)
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(folder) for f in fs) / 2 ** 20


def _fmt_split(split: dict) -> str:
    return ", ".join(f"{k} {1000 * v:.0f} ms" for k, v in split.items())


def format_table(results: list[dict], args) -> str:
    """The markdown table and the split, checkpoint and per-repeat lines of every rate's results."""
    base = statistics.median(results[0]["trainer"]) if results and results[0]["rate"] == 1.0 else None
    lines = [f"dsoft bench train: C={args.classes:,}, D={args.dim}, global batch {args.batch} on {args.world_size} "
             f"gloo ranks, MLP on synthetic vectors "
             f"(in_features {args.in_features}), SGD both sides, fp32; medians over {args.repeats} repeats",
             "", "| r | rows/rank | trainer s/step | bare s/step | trainer overhead | speedup vs r=1 (trainer) |",
             "|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        tr, br = statistics.median(r["trainer"]), statistics.median(r["bare"])
        over = statistics.median(a / b - 1.0 for a, b in zip(r["trainer"], r["bare"]))
        speed = f"{base / tr:.1f}x" if base else "-"
        lines.append(f"| {r['rate']:g} | {r['rows']:,} | {tr:.3f} | {br:.3f} | {100 * over:+.1f}% | {speed} |")
    lines.append("")
    for r in results:
        lines.append(f"r={r['rate']:g} trainer split: {_fmt_split(r['trainer_split'])}")
        lines.append(f"r={r['rate']:g} bare split:    {_fmt_split(r['bare_split'])}")
    for r in results:
        if r["saves"]:
            step = statistics.median(r["trainer"])
            block = statistics.median(s["block"] for s in r["saves"])
            total = statistics.median(s["total"] for s in r["saves"])
            during = statistics.median(s["during"] for s in r["saves"])
            kind = "in the background" if args.async_checkpoints else "synchronous"
            lines.append(f"r={r['rate']:g} checkpoint ({kind}, {r['checkpoint_mib']:.0f} MiB): training blocked "
                         f"{block:.2f} s = {block / step:.1f} steps; "
                         f"steps beside it {during:.3f} s/step (vs {step:.3f}); "
                         f"save done after {total:.2f} s; every 1000 steps the blocked time adds "
                         f"{100 * block / (1000 * step):.2f}% to the run")
    lines.append("per repeat (s/step): " + "; ".join(
        f"r={r['rate']:g}: trainer " + ", ".join(f"{x:.3f}" for x in r["trainer"]) + " / bare " +
        ", ".join(f"{x:.3f}" for x in r["bare"]) for r in results))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """``dsoft bench train``'s arguments."""
    p = bench_parser("train", __doc__.split("\n")[0])
    p.add_argument("--classes", type=int, default=1_000_000, help="identities C of the head (default 1,000,000)")
    p.add_argument("--dim", type=int, default=512, help="embedding dim D (default 512)")
    p.add_argument("--in-features", type=int, default=512, help="synthetic vector size (the MLP's input)")
    p.add_argument("--batch", type=int, default=512, help="global batch (split over the ranks)")
    p.add_argument("--world-size", type=int, default=2, help="gloo ranks on this machine (default 2)")
    p.add_argument("--sample-rates", type=float, nargs="+", default=[1.0, 0.015625],
                   help="sample rates r to time, one run each; 1 = negatives all (default 1 0.015625)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per repeat for r < 1")
    p.add_argument("--steps-full", type=int, default=1, help="timed steps per repeat for r = 1")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps of each loop before timing (default 1)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per loop; the table shows medians (default 3)")
    p.add_argument("--log-every", type=int, default=1, help="the trainer's logging.log_every (1 = a row every step)")
    p.add_argument("--checkpoints", type=int, default=0,
                   help="also time this many whole checkpoint saves per rate (checkpoint folder in a temp dir)")
    p.add_argument("--async-checkpoints", action="store_true", help="with --checkpoints: checkpoint.async_save")
    return p


def main(argv=None) -> int:
    """Spawns a run per sample rate, prints the table; 2 for a batch the world size does not divide."""
    args = build_parser().parse_args(argv)
    if args.batch % args.world_size:
        sys.stderr.write(f"--batch {args.batch} must be divisible by --world-size {args.world_size}\n")
        return 2
    os.environ.setdefault("WANDB_MODE", "disabled")
    for rate in args.sample_rates:  # a bad value raises ConfigError here, before any rank is spawned
        config_from_dict(run_config(args, rate, tempfile.gettempdir()))
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for rate in args.sample_rates:
            out = os.path.join(tmp, f"r{rate:g}")
            os.makedirs(out)
            spawn_local(_time_rate, args.world_size, (args, rate, out))
            results.append(torch.load(os.path.join(out, "result.pt")))
    sys.stdout.write(format_table(results, args) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
