"""Benchmark the head's local step: the triton backend vs the torch chunked path vs naive full logits.

    dsoft bench kernels --out runs/kernels.json               # CUDA: the issue's sizes
    dsoft bench kernels --classes 100000 --batch 512 --sweep  # pick tiles, then time
    dsoft bench kernels --smoke --out /tmp/k.json             # CPU: tiny, Triton interpreter

One "step" = the local shard statistics (lse, z_y) of the global batch against C_local rows
(all rows = "full", or a random r = 1/64 of them = "sampled"), the D-Softmax loss on top,
and backward to the embeddings and the weight, all in --dtype (bf16 by default):
- triton = dsoft_dist.kernels.triton_local_shard_stats (no logits in memory)
- torch  = dsoft_dist.head.local.torch_local_shard_stats (chunks of B x chunk logits)
- naive  = the full (B, K) logit matrix with autograd, only where it fits (--naive-max-gib)
Time = median of --repeats CUDA-event timings after --warmup; "peak MiB" = the step's
max_memory_allocated minus the memory allocated before it (inputs excluded), reset per case.
"matmul" = plain torch.mm on the step's three GEMM shapes ((B,D)x(D,k), (B,k)x(k,D), (k,B)x(B,D),
k = min(K, 65536)) in --dtype, measured in the same run. "model eff" = 6 B K D / time / matmul
rate; "gemm eff" = the GEMM FLOPs the method executes (triton: (6 + 4 n_d) B K D with n_d the
backward D slices, each recomputing the logits; torch: 8 B K D; naive: 6 B K D) / time / matmul rate.
Without CUDA the script refuses, except --smoke (tiny shapes in the interpreter, for tests).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

import torch

from dsoft_dist.bench.cli import bench_parser
from dsoft_dist.observability import get_logger

log = get_logger(__name__)
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_MATMUL_COLS = 65536
class Clock:
    """Times a callable: CUDA events on GPU, perf_counter on CPU; peak transient memory on GPU."""

    def __init__(self, device):
        self.device = device
        self.cuda = device.type == "cuda"

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def time(self, fn, warmup, repeats):
        """(median seconds, all seconds, peak MiB or None) of ``fn()``."""
        for _ in range(warmup):
            fn()
        self.sync()
        base = torch.cuda.memory_allocated(self.device) if self.cuda else 0
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        times = []
        for _ in range(repeats):
            if self.cuda:
                start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                stop.record()
                stop.synchronize()
                times.append(start.elapsed_time(stop) / 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
        peak = (torch.cuda.max_memory_allocated(self.device) - base) / 2**20 if self.cuda else None
        return statistics.median(times), times, peak


def make_inputs(batch, classes, dim, rate, dtype, device, seed=0):
    """Unit-norm features (B, D), weight (C, D), rows (sorted, r*C of them, or None), targets, valid."""
    gen = torch.Generator(device=device).manual_seed(seed)
    feats = torch.nn.functional.normalize(torch.randn(batch, dim, generator=gen, device=device), dim=1).to(dtype)
    weight = (torch.randn(classes, dim, generator=gen, device=device) * 0.01).to(dtype)
    target = torch.randint(0, classes, (batch,), generator=gen, device=device)
    rows = None
    if rate < 1.0:
        k = max(1, int(round(rate * classes)))
        rows = torch.sort(torch.randperm(classes, generator=gen, device=device)[:k]).values
    return feats, weight, rows, target, torch.ones(batch, dtype=torch.bool, device=device)


def naive_local_shard_stats(features, weight, rows, target_local, valid, scale, normalize, *_):
    """The whole (B, K) logit matrix with autograd: what the triton backend avoids."""
    w = weight if rows is None else weight[rows]
    w_hat = torch.nn.functional.normalize(w, dim=1) if normalize else w
    cos = features @ w_hat.t()  # (B, K)
    cols = torch.arange(weight.shape[0], device=weight.device) if rows is None else rows
    mask = (cols[None, :] == target_local[:, None]) | ~valid[:, None]
    logits = (cos * scale).float().masked_fill(mask, float("-inf"))
    w_t = weight[target_local.clamp(min=0)]
    w_t = torch.nn.functional.normalize(w_t, dim=1) if normalize else w_t
    target = torch.where(target_local >= 0, (features * w_t).sum(dim=1).float(), 0.0)
    return torch.logsumexp(logits, dim=1), target, logits.amax(dim=1).detach()


def make_step(backend, inputs, scale=64.0, end_point=0.9):
    """A closure running one D-Softmax forward + backward through ``backend``."""
    feats, weight, rows, target, valid = inputs

    def step():
        f = feats.detach().requires_grad_(True)
        w = weight.detach().requires_grad_(True)
        lse, tgt, _ = backend(f, w, rows, target, valid, scale, True)
        loss = (torch.nn.functional.softplus(scale * (end_point - tgt)) + torch.nn.functional.softplus(lse)).mean()
        loss.backward()
        return f.grad, w.grad
    return step


def matmul_rate(batch, k, dim, dtype, clock, repeats):
    """FLOP/s of torch.mm on the step's three GEMM shapes with k columns (the reference rate)."""
    dev = clock.device
    a, b = torch.randn(batch, dim, device=dev, dtype=dtype), torch.randn(k, dim, device=dev, dtype=dtype)
    g = torch.randn(batch, k, device=dev, dtype=dtype)

    def gemms():
        torch.mm(a, b.t())
        torch.mm(g, b)
        torch.mm(g.t(), a)
    seconds, _, _ = clock.time(gemms, 1, repeats)
    return 6.0 * batch * k * dim / seconds


def _triton_backend(config):
    from dsoft_dist.kernels import triton_local_shard_stats

    def run(*args):
        return triton_local_shard_stats(*args[:7], config=config)
    return run


def _fits_naive(batch, k, args, device):
    need = 4 * batch * k * 4  # fp32 logits, their exp and grads: about 4 (B, K) fp32 buffers
    if device.type != "cuda":
        return need < 64 << 20
    return need <= args.naive_max_gib * 2**30 and need < 0.8 * torch.cuda.mem_get_info(device)[0]


def run_case(method, batch, classes, rate, args, clock, rate_ref, config):
    """One (method, B, C, r) row of the table (dict)."""
    from dsoft_dist.head.local import torch_local_shard_stats
    from dsoft_dist.kernels.config import default_config, next_pow2
    inputs = make_inputs(batch, classes, args.dim, rate, _DTYPES[args.dtype], clock.device)
    k = classes if inputs[2] is None else inputs[2].numel()
    backend = {"triton": lambda: _triton_backend(config), "torch": lambda: torch_local_shard_stats,
               "naive": lambda: naive_local_shard_stats}[method]()
    row = dict(method=method, batch=batch, classes=classes, rate=rate, k=k, dim=args.dim, dtype=args.dtype)
    if method == "naive" and not _fits_naive(batch, k, args, clock.device):
        return {**row, "skipped": "full logits do not fit (--naive-max-gib)"}
    seconds, times, peak = clock.time(make_step(backend, inputs), args.warmup, args.repeats)
    cfg = config or default_config(args.dim, clock.device.type != "cuda")
    n_d = -(-args.dim // (cfg.block_d or next_pow2(args.dim)))  # backward recomputes the logits per D slice
    executed = {"triton": 6 + 4 * n_d, "torch": 8, "naive": 6}[method] * batch * k * args.dim
    model = 6.0 * batch * k * args.dim
    return {**row, "seconds": seconds, "times": times, "peak_mib": peak, "model_tflops": model / seconds / 1e12,
            "model_eff": model / seconds / rate_ref, "gemm_eff": executed / seconds / rate_ref,
            "matmul_tflops": rate_ref / 1e12}


def sweep(args, clock, rate_ref):
    """Times the triton backend's full head with each SWEEP_CONFIGS config at the first size; (best config, rows)."""
    from dsoft_dist.kernels import KernelConfig
    from dsoft_dist.kernels.config import SWEEP_CONFIGS
    rows, best = [], None
    for i, params in enumerate(SWEEP_CONFIGS):
        cfg = KernelConfig(**params)
        try:
            row = run_case("triton", args.batch[0], args.classes[0], 1.0, args, clock, rate_ref, cfg)
        except Exception as exc:  # a config that does not compile on this GPU is reported, not fatal
            row = dict(method="triton", error=f"{type(exc).__name__}: {exc}"[:300])
        rows.append({**row, "config": params, "config_index": i})
        if "seconds" in row and (best is None or row["seconds"] < best[1]):
            best = (cfg, row["seconds"])
        log.info("sweep config %d: %s", i, f"{row['seconds']:.4f} s" if "seconds" in row else row.get("error"))
    return (best[0] if best else None), rows


def format_table(result) -> str:
    """The cases as a fixed-width table, with the triton/torch speedup per size."""
    head = f"{'method':<6} {'head':<7} {'B':>5} {'C_local':>8} {'K':>8} {'step s':>9} {'peak MiB':>9} " \
           f"{'TFLOP/s':>8} {'model eff':>9} {'gemm eff':>8}"
    lines = [f"device: {result['device']}  dtype: {result['dtype']}  D={result['dim']}", head]
    by_key = {}
    for r in result["cases"]:
        kind = "full" if r["rate"] >= 1.0 else "sampled"
        if "seconds" not in r:
            lines.append(f"{r['method']:<6} {kind:<7} {r['batch']:>5} {r['classes']:>8} {r['k']:>8} "
                         f"skipped: {r.get('skipped', r.get('error'))}")
            continue
        by_key.setdefault((kind, r["batch"], r["classes"]), {})[r["method"]] = r["seconds"]
        peak = "-" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}"
        lines.append(f"{r['method']:<6} {kind:<7} {r['batch']:>5} {r['classes']:>8} {r['k']:>8} "
                     f"{r['seconds']:>9.4f} {peak:>9} {r['model_tflops']:>8.2f} {r['model_eff']:>9.1%} "
                     f"{r['gemm_eff']:>8.1%}")
    for (kind, b, c), t in by_key.items():
        if "triton" in t and "torch" in t:
            lines.append(f"speedup triton vs torch, {kind} B={b} C_local={c}: {t['torch'] / t['triton']:.2f}x")
    return "\n".join(lines)


def environment(device) -> dict:
    """Versions, device name and date for the report."""
    import triton
    info = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                python=platform.python_version(), torch=torch.__version__, triton=triton.__version__,
                host=platform.node(), device=str(device))
    if device.type == "cuda":
        info.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                    sm_count=torch.cuda.get_device_properties(device).multi_processor_count)
    return info


def run(args) -> dict:
    """Runs the matmul reference, the optional sweep and every case; returns the JSON-able result."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    clock = Clock(device)
    dtype = _DTYPES[args.dtype]
    result = dict(environment(device), dtype=args.dtype, dim=args.dim, sweep=[], cases=[], matmul={})
    config = None
    if args.sweep:
        k = min(args.classes[0], _MATMUL_COLS)
        config, result["sweep"] = sweep(args, clock, matmul_rate(args.batch[0], k, args.dim, dtype, clock, 3))
        result["config"] = None if config is None else config.__dict__
    for batch in args.batch:
        for classes in args.classes:
            for rate in (1.0, args.sample_rate):
                k = classes if rate >= 1.0 else max(1, int(round(rate * classes)))
                ref = matmul_rate(batch, min(k, _MATMUL_COLS), args.dim, dtype, clock, args.repeats)
                result["matmul"][f"B{batch}_K{min(k, _MATMUL_COLS)}"] = ref / 1e12
                for method in args.methods:
                    row = run_case(method, batch, classes, rate, args, clock, ref, config)
                    result["cases"].append(row)
                    log.info("%s", {k_: v for k_, v in row.items() if k_ != "times"})
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
    return result


def build_parser() -> argparse.ArgumentParser:
    p = bench_parser("kernels", __doc__.split("\n")[0])
    p.add_argument("--classes", type=int, nargs="+", default=[100_000, 1_000_000], help="C_local values")
    p.add_argument("--batch", type=int, nargs="+", default=[512, 4096], help="global batch values")
    p.add_argument("--dim", type=int, default=512, help="embedding dim D (default 512)")
    p.add_argument("--dtype", default="bf16", choices=sorted(_DTYPES),
                   help="dtype of embeddings, weights and the step (default bf16)")
    p.add_argument("--sample-rate", type=float, default=1 / 64, help="rate of the sampled head")
    p.add_argument("--methods", nargs="+", default=["triton", "torch", "naive"], choices=("triton", "torch", "naive"),
                   help="the methods to time (default all three)")
    p.add_argument("--repeats", type=int, default=5, help="timed steps per case; the median is shown (default 5)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per case before them (default 2)")
    p.add_argument("--naive-max-gib", type=float, default=24.0, help="largest full-logit footprint to try")
    p.add_argument("--sweep", action="store_true", help="time the fixed tile configs first and use the best")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU in Triton's interpreter (tests)")
    p.add_argument("--out", default="", help="write the result JSON here")
    return p


def _smoke_args(args):
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are imported
    args.classes, args.batch, args.dim, args.dtype = [300], [48], 32, "fp32"
    args.sample_rate, args.repeats, args.warmup = 0.25, 1, 1
    return args


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.out:  # a bad --out folder fails now (OSError naming it), not after the whole run
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    if args.smoke and not torch.cuda.is_available():
        args = _smoke_args(args)
    elif not torch.cuda.is_available():
        log.error("the kernel benchmark needs a CUDA GPU (none found); use --smoke for a tiny CPU run "
                  "in Triton's interpreter")
        return 2
    from dsoft_dist.kernels import triton_available
    if not triton_available():
        log.error("the kernel benchmark needs Triton: pip install 'dsoft_dist[kernels]'")
        return 2
    result = run(args)
    table = format_table(result)
    result["table"] = table
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=1)
    sys.stdout.write(table + "\n")  # the script's product: the table on stdout (logs go to stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
