"""The logit cache side by side: one head, its steps alternating ``logit_cache_mb`` 0 and the trainer's default.

The same ``ShardedStep`` as ``dsoft bench speedup`` (the trainer's head optimizer inside backward),
the same embeddings and labels every step; even steps recompute the logits in backward, odd
steps keep them (``head.logit_cache_mb``, 64 MiB by default). It prints the median of each
(the slowest rank's) and their ratio.

    dsoft bench logit_cache                                  # C = 1M, r = 1/64, B = 512, 1 rank
    dsoft bench logit_cache --nproc 2 --classes 1000000 --rate 1/64
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.distributed as dist

from dsoft_dist.bench.cli import bench_parser
from dsoft_dist.bench.speedup import ShardedStep, parse_rates
from dsoft_dist.config.schema import HeadConfig
from dsoft_dist.parallel.processes import distributed, spawn_local
from dsoft_dist.registry import LOSSES


def run(args, rank: int = 0, world: int = 1) -> dict[float, list[float]]:
    """Step times (ms, slowest rank) per cache budget."""
    torch.manual_seed(rank)
    step = ShardedStep(args.classes, args.dim, args.loss, "random" if args.rate < 1 else "all", args.rate,
                       torch.device("cpu"))
    emb = torch.randn(args.batch // world, args.dim, requires_grad=True)
    labels = torch.randint(0, args.classes, (args.batch // world,))
    budgets = (0.0, HeadConfig().logit_cache_mb)
    times: dict[float, list[float]] = {b: [] for b in budgets}
    for i in range(2 * (args.warmup + args.repeats)):
        step.head.logit_cache_mb = budgets[i % 2]
        if world > 1:
            dist.barrier()
        t0 = time.perf_counter()
        step.step(emb, labels)
        ms = torch.tensor([(time.perf_counter() - t0) * 1e3])
        if world > 1:
            dist.all_reduce(ms, op=dist.ReduceOp.MAX)
        if i >= 2 * args.warmup:
            times[budgets[i % 2]].append(float(ms[0]))
    return times


def report(times: dict[float, list[float]], args, world: int) -> str:
    (_, off_ms), (_, on_ms) = times.items()
    lines = [f"C = {args.classes:,}, r = {args.rate:g}, D = {args.dim}, global B = {args.batch}, {world} rank(s), "
             f"{args.loss}; median of {args.repeats} alternating steps after {args.warmup} warm-up each"]
    for budget, values in times.items():
        lines.append(f"logit_cache_mb={budget:g}: {statistics.median(values):.1f} ms "
                     f"(all: {', '.join(f'{v:.0f}' for v in values)})")
    lines.append(f"recompute / cache: {statistics.median(off_ms) / statistics.median(on_ms):.2f}x")
    return "\n".join(lines)


def _spawned(args) -> None:
    with distributed("gloo") as env:
        torch.set_num_threads(1)
        times = run(args, env.rank, env.world_size)
        if env.is_main:
            sys.stdout.write(report(times, args, env.world_size) + "\n")
            sys.stdout.flush()


def build_parser() -> argparse.ArgumentParser:
    p = bench_parser("logit_cache", __doc__.split("\n\n")[0])
    p.add_argument("--classes", type=int, default=1_000_000, help="identities C of the head (default 1,000,000)")
    p.add_argument("--dim", type=int, default=512, help="embedding dim D (default 512)")
    p.add_argument("--batch", type=int, default=512, help="global batch (split over the ranks)")
    p.add_argument("--rate", default="1/64", help="sample rate of D-Softmax-K (1 = full D-Softmax)")
    p.add_argument("--loss", default="d_softmax",
                   help=f"the head's loss: {', '.join(LOSSES.names())} (default d_softmax)")
    p.add_argument("--nproc", type=int, default=1, help="gloo ranks started here (one thread each)")
    p.add_argument("--repeats", type=int, default=5, help="timed steps per cache setting (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per cache setting before them (default 1)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rates = parse_rates(args.rate, "--rate")
    if len(rates) != 1:
        raise ValueError(f"--rate {args.rate!r} is invalid: give one rate, e.g. 1/64")
    args.rate = rates[0]
    for name in ("classes", "dim", "batch", "nproc", "repeats"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} {getattr(args, name)} is invalid: must be >= 1")
    if args.batch % args.nproc:
        raise ValueError(f"--batch {args.batch} is not divisible by --nproc {args.nproc}")
    if args.nproc > 1:
        spawn_local(_spawned, args.nproc, (args,))
    else:
        sys.stdout.write(report(run(args), args, 1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
