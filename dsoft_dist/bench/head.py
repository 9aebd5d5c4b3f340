"""Benchmark one full head step (forward + backward + optimizer) of ShardedClassifier vs sample rate.

    dsoft bench head --classes 1000000 --dim 512 --batch 512 --sample-rates 1 0.125 0.015625
    dsoft bench head --classes 100000 --world-size 2 --repeats 3      # = python -m dsoft_dist.bench.head ...

For each sample rate r it times ``loss = head(emb, labels); loss.backward(); opt.step(); opt.zero_grad()``
(median over --repeats after --warmup) on rank 0 and prints one table:
- r=1 runs negatives="all" (the exact D-Softmax: same rows as random at r=1, no index gather);
  r<1 runs --negatives (default random: D-Softmax-K). K = rows computed per rank. Each rate gets a
  head of its own. --negatives nearest (D-Softmax-KN) adds each row's --nearest-per-class nearest
  classes: its table is built by the first step (a warm-up: --warmup >= 1), is part of "state", and
  its lookup is the "nearest" all-reduce; the JSON rows give the pairs rank 0 computed last step.
- model FLOP = 6 * B * K * D (forward logits + the two backward GEMMs, B the global batch);
  executed FLOP = 8 * B * K * D, because backward recomputes the logits chunk by chunk
  (6 * B * K * D + 2 * B * D * (rows not in the logit cache) with --logit-cache-mb).
- "matmul" = the same three GEMMs ((B,D)x(D,k), (B,k)x(k,D), (k,B)x(B,D)) timed with plain torch.mm
  right after each timed repeat, at the chunk's width and at one wide chunk (<= 32768 rows), with
  the logit block batch-major and class-major: the fastest of the four (the column: median over
  repeats); "eff" = median over repeats of the repeat's model GFLOP/s / the matmul GFLOP/s
  measured right after it, so each ratio pairs measurements under the same machine load (with
  several ranks: the slowest rank's median step against the median reference).
- memory: "state" = weights + optimizer state from tensor sizes; "transient" = peak memory the
  step adds: on CPU peak RSS (VmHWM, reset through /proc/self/clear_refs before the step) minus
  RSS before the step; on CUDA max_memory_allocated minus memory_allocated before.
- bytes/step = payload bytes of the head's collectives (0 for one rank).
- "step s" is the median, "best s" the fastest repeat (the CPU may be shared); speedup uses medians.
- --step-in-backward applies the head optimizer in backward (ShardedClassifier.step_in_backward):
  rows are updated chunk by chunk and no (C_local, D) weight gradient is allocated.
- --backend auto | torch | cpu-c | triton: the head's backend; "backend" in the header names the
  one that ran, for cpu-c whether its passes were compiled (no C compiler or DSOFT_CPU_KERNELS=0:
  the torch passes).
- --logit-cache-mb N keeps up to N MiB of the forward's exp'd logits so backward skips the
  recompute of those chunks (B * C_local * 4 bytes caches everything: 2 GiB at B=512, C=1M).
- --json FILE also writes the rows with exact bytes (state, transient, bytes/step and per named
  collective) and seconds; ``dsoft plan``'s validation (tests/test_plan.py) reads it.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

from dsoft_dist.bench.cli import bench_parser
from dsoft_dist.config.schema import OptimizerConfig
from dsoft_dist.head import BACKEND_NAMES, ShardedClassifier, auto_chunk_size, build_head_optimizer
from dsoft_dist.losses.negatives import NEAREST_DEFAULTS
from dsoft_dist.observability.timing import matmul_rate, sync_device
from dsoft_dist.parallel.processes import distributed, spawn_local

_MIB = 1 << 20


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


class PeakMemory:
    """Transient peak of one region: CUDA allocator peak, or peak RSS via VmHWM reset (Linux)."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            with open("/proc/self/clear_refs", "w") as fh:  # "5" resets VmHWM to the current RSS
                fh.write("5")
            self.base = _status_kib("VmRSS") * 1024
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.base
        else:
            self.peak = _status_kib("VmHWM") * 1024 - self.base


def reference_rate(batch, dim, k, chunk, device) -> float:
    """The plain-matmul reference: the fastest of the step's GEMM shapes at the chunk's width and as one
    wide GEMM (<= 32768 rows), each in both layouts of the logit block.

    Taking the best keeps a small chunk size or one layout from lowering the bar.
    """
    widths = {chunk, min(max(k, 1), 32768)}
    return max(matmul_rate(batch, dim, width, device, class_major) for width in widths
               for class_major in (False, True))


def state_bytes(weight: torch.Tensor, opt, table=None) -> int:
    """Bytes of a classifier's state: its weight, every tensor in the optimizer's state and the rows of its
    table of nearest classes (``table``: the head's ``nearest``, negatives="nearest"; None without)."""
    rows = list(table.rows().values()) if table is not None else []
    tensors = [weight, *rows] + [t for s in opt.state.values() for t in s.values() if torch.is_tensor(t)]
    return sum(t.numel() * t.element_size() for t in tensors)


def build_head(args, rate, device, group=None):
    """The head and its optimizer for one sample rate: negatives="all" at r = 1, else --negatives (with
    nearest, its table of --nearest-per-class classes, built by the first forward: a warm-up step)."""
    negatives = "all" if rate >= 1.0 else args.negatives
    nearest = {"nearest_per_class": args.nearest_per_class} if negatives == "nearest" else {}
    head = ShardedClassifier(args.classes, args.dim, loss=args.loss, negatives=negatives, sample_rate=rate,
                             chunk_size=args.chunk_size, group=group, device=device,
                             checks="never" if args.no_validate else "first", logit_cache_mb=args.logit_cache_mb,
                             backend=args.backend, **nearest)
    opt = build_head_optimizer(head, OptimizerConfig(name=args.optimizer, lr=0.1, momentum=0.9, weight_decay=5e-4,
                                                     head_mode=args.head_mode,
                                                     head_step_in_backward=args.step_in_backward))
    return head, opt


def nearest_pairs(head) -> int | None:
    """The (row, nearest class) pairs the last forward computed on this rank (their class is this shard's);
    None without negatives="nearest"."""
    if head.nearest is None:
        return None
    local = head.neighbours - head.class_start
    return int(((head.neighbours >= 0) & (local >= 0) & (local < head.num_local_classes)).sum())


def _time_rate(head, opt, rate, args, device, rank, world_size):
    """Runs warmup + repeats full steps at one sample rate; returns a result row."""
    b_global = args.batch * world_size

    def chunk_for(h):
        return min(max(h.last_num_negatives, 1), auto_chunk_size(b_global, args.chunk_size, device))

    gen = torch.Generator().manual_seed(rank)
    times, peaks, refs, nbytes, by_name = [], [], [], 0, {}
    for i in range(args.warmup + args.repeats):
        emb = torch.randn(args.batch, args.dim, generator=gen).to(device).requires_grad_(True)
        labels = torch.randint(0, args.classes, (args.batch,), generator=gen).to(device)
        head.comm.reset()
        with PeakMemory(device) as mem:
            sync_device(device)
            t0 = time.perf_counter()
            head(emb, labels).backward()
            opt.step()
            opt.zero_grad()
            sync_device(device)
            elapsed = time.perf_counter() - t0
        if i >= args.warmup:
            times.append(elapsed)
            peaks.append(mem.peak)
            nbytes = head.comm.bytes
            by_name = dict(getattr(head.comm, "by_name", {}))  # bytes per named collective (the last repeat)
            # the reference right after each repeat: the pair sees the same load on a shared machine
            refs.append(reference_rate(b_global, args.dim, head.last_num_negatives, chunk_for(head), device))
    step = statistics.median(times)
    if world_size > 1:  # the step is as slow as the slowest rank
        t = torch.tensor([step], dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        step = float(t)
    k = head.last_num_negatives
    chunk = chunk_for(head)
    cached_rows = min(k, chunk * int(args.logit_cache_mb * _MIB // (b_global * chunk * 4)))
    model_flop = 6 * b_global * k * args.dim
    executed = model_flop + 2 * b_global * (k - cached_rows) * args.dim  # + the recompute
    if world_size == 1:  # each repeat against its own reference
        effs = [model_flop / t / 1e9 / ref for t, ref in zip(times, refs)]
    else:  # the step is the slowest rank's median: against the median reference
        effs = [model_flop / step / 1e9 / statistics.median(refs)]
    return {"rate": rate, "negatives": head.negatives, "k": k, "step": step, "times": times, "best": min(times),
            "model": model_flop / step / 1e9, "exec": executed / step / 1e9, "matmul": statistics.median(refs),
            "eff": statistics.median(effs), "effs": effs, "state": state_bytes(head.weight, opt, head.nearest),
            "transient": max(peaks), "bytes": nbytes, "bytes_by_name": by_name, "nearest_pairs": nearest_pairs(head)}


def _backend_state(head) -> str:
    """The head's backend (after DSOFT_HEAD_BACKEND); for cpu-c whether its passes were compiled."""
    if head.backend != "cpu-c":
        return head.backend
    from dsoft_dist.kernels.cpu import cpu_epilogues
    return "cpu-c (compiled)" if cpu_epilogues() is not None else "cpu-c (no compiler: torch passes)"


def _format(rows, args, world_size, backend) -> str:
    base = rows[0]["step"]
    lines = [f"head step: C={args.classes} D={args.dim} B={args.batch * world_size} (global) loss={args.loss} "
             f"optimizer={args.optimizer}/{args.head_mode} world_size={world_size} threads={torch.get_num_threads()} "
             f"repeats={args.repeats} logit_cache_mb={args.logit_cache_mb:g} "
             f"step_in_backward={args.step_in_backward} backend={backend}",
             f"{'r':>9} {'negatives':>9} {'K/rank':>8} {'step s':>8} {'best s':>7} {'speedup':>8} {'model GF/s':>10} "
             f"{'exec GF/s':>9} {'matmul GF/s':>11} {'eff %':>6} {'state MiB':>9} {'trans MiB':>9} {'bytes/step':>10}"]
    for r in rows:
        lines.append(f"{r['rate']:>9.6g} {r['negatives']:>9} {r['k']:>8} {r['step']:>8.3f} {r['best']:>7.3f} "
                     f"{base / r['step']:>7.1f}x "
                     f"{r['model']:>10.1f} {r['exec']:>9.1f} {r['matmul']:>11.1f} {100 * r['eff']:>6.1f} "
                     f"{r['state'] / _MIB:>9.0f} {r['transient'] / _MIB:>9.0f} {r['bytes']:>10}")
    lines.append("step times (s): " + "; ".join(f"r={r['rate']:g}: " + ", ".join(f"{t:.3f}" for t in r["times"])
                                                for r in rows))
    lines.append("eff per repeat (%): " + "; ".join(
        f"r={r['rate']:g}: " + ", ".join(f"{100 * e:.1f}" for e in r["effs"]) for r in rows))
    return "\n".join(lines)


def run(args, rank=0, world_size=1, group=None) -> str | None:
    """Benchmarks every sample rate on this rank; returns the table on rank 0."""
    device = torch.device(args.device)
    rows = []
    for rate in args.sample_rates:
        head, opt = build_head(args, rate, device, group)
        rows.append(_time_rate(head, opt, rate, args, device, rank, world_size))
        backend = _backend_state(head)
        del head, opt  # the next rate's head replaces this one
    if rank == 0 and args.json:
        write_json(args.json, rows, args, world_size, backend)
    return _format(rows, args, world_size, backend) if rank == 0 else None


def write_json(path, rows, args, world_size, backend) -> None:
    """The rows with exact figures (bytes, seconds) and the arguments, for plots and ``dsoft plan``'s check."""
    import json

    with open(path, "w") as fh:
        json.dump({"args": vars(args), "world_size": world_size, "threads": torch.get_num_threads(),
                   "backend": backend, "rows": rows}, fh, indent=1)
        fh.write("\n")


def _spawned(args, out_path):
    with distributed("gloo") as env:
        if args.threads:
            torch.set_num_threads(args.threads)
        table = run(args, env.rank, env.world_size)
        if env.is_main:
            with open(out_path, "w") as fh:
                fh.write(table)



def build_parser() -> argparse.ArgumentParser:
    p = bench_parser("head", __doc__.split("\n")[0])
    p.add_argument("--classes", type=int, default=100_000, help="C: classes of the whole head (default 100000)")
    p.add_argument("--dim", type=int, default=512, help="D: embedding size (default 512)")
    p.add_argument("--batch", type=int, default=512, help="local batch per rank")
    p.add_argument("--loss", default="d_softmax",
                   help="head.loss (default d_softmax; any of dsoft_dist.registry LOSSES)")
    p.add_argument("--negatives", default="random", choices=("random", "batch", "partial", "nearest"),
                   help="negatives for r < 1 (r = 1 always runs 'all'; nearest: D-Softmax-KN)")
    p.add_argument("--nearest-per-class", type=int, default=NEAREST_DEFAULTS["nearest_per_class"],
                   help="with --negatives nearest: M, the nearest classes each row adds (default "
                   f"{NEAREST_DEFAULTS['nearest_per_class']})")
    p.add_argument("--sample-rates", type=float, nargs="+", default=[1.0, 0.125, 0.015625], metavar="R",
                   help="sample rates r in (0, 1], one table row each (default 1 0.125 0.015625)")
    p.add_argument("--world-size", type=int, default=1, help="gloo ranks spawned on this machine")
    p.add_argument("--optimizer", default="sgd", choices=("sgd", "adamw"), help="the head's optimizer")
    p.add_argument("--head-mode", default="sparse", choices=("sparse", "dense"),
                   help="optimizer.head_mode: update only the rows a step touched (sparse) or the whole weight")
    p.add_argument("--chunk-size", type=int, default=0, help="head.chunk_size: classes per chunk (0 = automatic)")
    p.add_argument("--logit-cache-mb", type=float, default=0.0,
                   help="keep this many MiB of exp'd logit chunks for backward instead of recomputing (0 = off)")
    p.add_argument("--backend", default="auto", choices=BACKEND_NAMES, help="the head's backend (docs/head.md)")
    p.add_argument("--step-in-backward", action="store_true",
                   help="the step in backward: the head optimizer applied chunk by chunk (no weight gradient is kept)")
    p.add_argument("--repeats", type=int, default=3, help="timed steps per rate; the median is reported")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps before the timed ones")
    p.add_argument("--threads", type=int, default=0, help="torch threads per rank (0 = cores / world size)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    p.add_argument("--json", metavar="FILE", default=None, help="also write the rows with exact bytes and seconds")
    p.add_argument("--no-validate", action="store_true",
                   help="skip the first step's input check too (the head checks only its first forward)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.negatives == "nearest" and args.warmup < 1 and min(args.sample_rates) < 1:
        sys.stderr.write(f"--warmup {args.warmup} is invalid with --negatives nearest: the first step builds the "
                         "table of nearest classes; give --warmup 1 or more so the timed steps are steady ones\n")
        return 2
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        sys.stderr.write(f"--device {args.device}: no CUDA GPU is available; use --device cpu\n")
        return 2
    if args.world_size == 1:
        if args.threads:
            torch.set_num_threads(args.threads)
        table = run(args)
    else:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "table.txt")
            spawn_local(_spawned, args.world_size, (args, out))
            with open(out) as fh:
                table = fh.read()
    sys.stdout.write(table + "\n")  # the script's product: the table on stdout (logs go to stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
