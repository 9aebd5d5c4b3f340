"""Device profiles for ``dsoft plan``: measured on this machine, written to / read from JSON.

    prof = measure_profile([inp], device="cpu")        # GEMMs at the plan's shapes, exp2 passes, copy, gloo
    save_profile(prof, "plan-profile.json"); load_profile("plan-profile.json")

What is measured (each the median of a few repeats after one warm-up):
- gemm: GFLOP/s of the head's three GEMM shapes on one chunk, (w, D) x (D, B), (B, w) x (w, D) and
  (w, B) x (B, D), class-major, plain torch.mm (``dsoft_dist.bench.head.matmul_rate``: 6 B w D / time),
  at every distinct (B, D, w) of the plans given; fp32 operands (the torch chunked path's).
- elementwise: elements/s of one fp32 exp2 pass (read a (w, B) block, write another) at each block size.
- memory: copy bandwidth, 2 n / time for an n-byte copy (64 MiB on CPU, 1 GiB on CUDA).
- gather: bytes/s of ``index_select`` of 4096 random rows from a table the size of the largest
  class shard (capped at 256 MiB on CPU, 2 GiB on CUDA): what the sampled rows' gathers cost.
- step: seconds of one real head step (forward, backward, row-sparse SGD; torch chunked path, one rank)
  at each (B, D) with only K = 256 rows, with negatives=all and with random negatives: what a step
  costs besides its K-proportional work (per-row work over B, launches, Python, sampling).
- collective: gloo between 2 local processes on CPU tensors, per op (all_gather, reduce_scatter,
  all_reduce): latency = the time of a 1-element op per ring step, gbps = link bytes per second
  of a 4 MiB op (link bytes as ``estimate.collectives``: (P - 1) / P or 2 (P - 1) / P of the buffer).
"""
from __future__ import annotations

import datetime
import json
import logging
import os
import platform
import statistics
import tempfile
import time

PROFILE_VERSION = 1
_REPEATS = 5
_COLLECTIVE_BYTES = 4 << 20


def _timed(fn, device, repeats=_REPEATS) -> float:
    """Median seconds of ``fn()`` over ``repeats`` after one warm-up (CUDA synchronized)."""
    from dsoft_dist.observability.timing import sync_device

    times = []
    for _ in range(repeats + 1):
        sync_device(device)
        t0 = time.perf_counter()
        fn()
        sync_device(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def _elementwise(elements: int, device) -> float:
    """Elements per second of torch.exp2(src, out=dst) over ``elements`` fp32 values."""
    import torch

    src = torch.rand(elements, device=device).neg_()
    dst = torch.empty_like(src)
    return elements / _timed(lambda: torch.exp2(src, out=dst), device)


def _gather_gbps(rows: int, dim: int, device) -> float:
    """GB/s of ``index_select`` of 4096 random rows (fresh ones each repeat) from a (rows, D) fp32 table."""
    import torch

    table = torch.ones(rows, dim, device=device)
    picks = [torch.randint(0, rows, (4096,), device=device) for _ in range(_REPEATS + 1)]
    out = torch.empty(4096, dim, device=device)
    calls = iter(picks)
    return 4096 * dim * 4 / _timed(lambda: torch.index_select(table, 0, next(calls), out=out), device) / 1e9


def _copy_gbps(device) -> float:
    """GB/s of one copy (read + write counted) of a 64 MiB (CPU) or 1 GiB (CUDA) buffer."""
    import torch

    n = (1 << 30 if device.type == "cuda" else 64 << 20) // 4
    src = torch.ones(n, device=device)
    dst = torch.empty_like(src)
    return 2 * 4 * n / _timed(lambda: dst.copy_(src), device) / 1e9


def _step_overhead(batch: int, dim: int, sampled: bool, device) -> float:
    """Seconds of one real head step (forward + backward + row-sparse SGD step, torch chunked path, one rank) at
    (B, D) with K = 256 rows: negatives=all over 256 classes, or random at r = 1/64 of 16384 classes."""
    import torch

    from dsoft_dist.config.schema import OptimizerConfig
    from dsoft_dist.head import ShardedClassifier, build_head_optimizer

    classes = 256 * 64 if sampled else 256
    # the default backend (auto) takes the torch chunked path for fp32 inputs, on CPU and on CUDA
    head = ShardedClassifier(classes, dim, negatives="random" if sampled else "all", sample_rate=1 / 64,
                             device=device, checks=False)
    opt = build_head_optimizer(head, OptimizerConfig(name="sgd", lr=0.1))
    emb = torch.randn(batch, dim, device=device, requires_grad=True)
    labels = torch.randint(0, classes, (batch,), device=device)

    def step():
        head(emb, labels).backward()
        opt.step()
        opt.zero_grad()
        emb.grad = None

    quiet = logging.getLogger("dsoft_dist.head.sharded")  # its one-line path notice is not this command's output
    level = quiet.level
    quiet.setLevel(logging.WARNING)
    try:
        return _timed(step, device)
    finally:
        quiet.setLevel(level)


def _collective_worker(out_path: str) -> None:
    """One of 2 gloo ranks: times each op at 1 element and at 4 MiB; rank 0 writes the JSON figures."""
    import torch
    import torch.distributed as dist

    from dsoft_dist.parallel.processes import distributed

    with distributed("gloo") as env:
        p = env.world_size
        result = {}
        for op in ("all_gather", "reduce_scatter", "all_reduce"):
            points = []
            for nbytes in (4, _COLLECTIVE_BYTES):
                x = torch.ones(max(1, nbytes // 4 // (1 if op == "all_reduce" else p)))
                parts = [torch.empty_like(x) for _ in range(p)]
                run = {"all_gather": lambda: dist.all_gather(parts, x),
                       "reduce_scatter": lambda: dist.reduce_scatter(x, parts),
                       "all_reduce": lambda: dist.all_reduce(x)}[op]
                seconds = _timed(run, torch.device("cpu"))
                buffer = x.numel() * 4 * (1 if op == "all_reduce" else p)
                points.append((seconds, buffer * (2 if op == "all_reduce" else 1) * (p - 1) / p))
            (t_small, _), (t_big, link) = points
            steps = (2 if op == "all_reduce" else 1) * (p - 1)
            result[op] = {"latency_s": t_small / steps, "gbps": link / max(t_big - t_small, 1e-9) / 1e9,
                          "bytes": _COLLECTIVE_BYTES, "seconds": t_big}
        if env.is_main:
            with open(out_path, "w") as fh:
                json.dump(result, fh)


def measure_collective() -> dict:
    """gloo latency and link bandwidth per op between 2 local processes (``_collective_worker``)."""
    from dsoft_dist.parallel.processes import spawn_local

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "collective.json")
        spawn_local(_collective_worker, 2, (out,))
        with open(out) as fh:
            return {"backend": "gloo", "processes": 2, **json.load(fh)}


def measure_profile(plans, device: str = "cpu", collective: bool = True) -> dict:
    """A profile of this machine at the GEMM and block shapes of ``plans`` (PlanInputs) on ``device``."""
    import torch

    from dsoft_dist.observability.timing import matmul_rate
    from dsoft_dist.plan.memory import chunk_width

    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA GPU is available; measure with --device cpu")
    shapes = sorted({(p.global_batch, p.dim, chunk_width(p)) for p in plans})
    gemm = [{"batch": b, "dim": d, "k": w, "gflops": matmul_rate(b, d, w, dev, class_major=True)}
            for b, d, w in shapes]
    blocks = sorted({b * w for b, _, w in shapes})
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else (platform.processor() or platform.machine())
    return {"version": PROFILE_VERSION, "device": dev.type, "device_name": name, "host": platform.node(),
            "torch": torch.__version__, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "gemm": gemm, "elementwise": [{"elements": n, "per_s": _elementwise(n, dev)} for n in blocks],
            "memory": {"gbps": _copy_gbps(dev)},
            "gather": [{"rows": n, "dim": d, "gbps": _gather_gbps(n, d, dev)} for n, d in _tables(plans, dev)],
            "step": [{"batch": b, "dim": d, "sampled": sampled, "rows": 256, "seconds": _step_overhead(b, d, sampled, dev)}
                     for b, d in sorted({(p.global_batch, p.dim) for p in plans}) for sampled in (False, True)],
            "collective": measure_collective() if collective else None}


def _tables(plans, device) -> list[tuple[int, int]]:
    """(rows, D) of the gather table per distinct D: the largest class shard, capped at 256 MiB on CPU and
    2 GiB on CUDA (what the measurement allocates)."""
    from dsoft_dist.plan.estimate import shard_rows

    cap = (2 << 30) if device.type == "cuda" else (256 << 20)
    dims = sorted({p.dim for p in plans})
    return [(max(4096, min(max(shard_rows(p) for p in plans if p.dim == d), cap // (4 * d))), d) for d in dims]


def save_profile(profile: dict, path: str) -> None:
    """Writes the profile as JSON (atomically: a temporary file renamed into place)."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as fh:
        json.dump(profile, fh, indent=1)
        fh.write("\n")
    os.replace(tmp, path)


def load_profile(path: str) -> dict:
    """Reads a profile; ValueError naming the file and the fix when it is not one."""
    with open(path) as fh:
        try:
            profile = json.load(fh)
        except json.JSONDecodeError as err:
            raise ValueError(f"--profile {path}: not a JSON profile ({err.msg} at line {err.lineno}); write one "
                             f"with dsoft plan ... --measure-profile {path}") from err
    missing = [k for k in ("version", "device", "gemm", "elementwise", "memory") if k not in profile] \
        if isinstance(profile, dict) else ["a JSON object"]
    if missing:
        raise ValueError(f"--profile {path}: not a dsoft plan profile (missing {', '.join(missing)}); write one "
                         f"with dsoft plan ... --measure-profile {path}")
    if profile["version"] != PROFILE_VERSION:
        raise ValueError(f"--profile {path}: version {profile['version']!r}, this dsoft reads version "
                         f"{PROFILE_VERSION}; measure it again with --measure-profile")
    return profile
