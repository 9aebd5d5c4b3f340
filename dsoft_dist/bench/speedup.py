"""The paper's speedup comparison: the whole head step of every method against full softmax and full D-Softmax.

For each class count C, at embedding size D and global batch B on 1..N ranks, it times the
whole classifier step (forward, backward and the optimizer) and measures its memory for:

| method | what | rates |
|---|---|---|
| softmax_naive | what users write by hand: a (C, D) ``nn.Linear``-style weight on every rank, logits materialized, ``F.cross_entropy``, the gradient all-reduced as DDP would, dense SGD | 1 |
| arcface | the class-sharded head, ArcFace over all classes | 1 |
| d_softmax | the class-sharded head, D-Softmax over all classes | 1 |
| d_softmax_b | D-Softmax-B: the inter term over the batch's classes | its K / C |
| d_softmax_k | D-Softmax-K: the inter term over a random r of the classes | --rates |
| d_softmax_kn | D-Softmax-K whose every row adds its class's nearest classes | --rates |
| partial_fc | Partial-FC-style sampled softmax: ArcFace over the batch's positives + random others up to r C | --rates |
| sampled_softmax | plain sampled softmax: softmax over a random r of the classes (positives not kept) | --rates |

Every sharded method uses the trainer's default head optimizer (row-sparse SGD with
momentum, applied inside backward). ``step_ms`` is the median over --repeats after --warmup
of the slowest rank (d_softmax_kn: plus one build of its nearest-class table, timed apart as
``build_ms``, over the draws between builds, ``build_every``); ``transient_mb`` the most memory
one step adds on a rank (CUDA: peak allocated minus allocated before; CPU: peak RSS minus
RSS before); ``peak_mb`` = the head's state (weights + optimizer state) + transient, per rank.
Speedups are ratios of medians measured in the same run, against ``softmax_naive`` and
``d_softmax`` at the same C and ranks.
A method whose memory would not fit is skipped with the reason (e.g. softmax_naive's
replicated (C, D) weight, gradient and momentum on every rank).

    dsoft bench speedup                                         # C = 100k, 1M; D = 512; B = 512; 1 rank
    dsoft bench speedup --classes 1000000 --nproc 2 --rates 1/8,1/64 --out runs/speedup
    torchrun --nproc-per-node 8 -m dsoft_dist.bench.speedup --device cuda --classes 1000000,10000000
    dsoft bench speedup --end-to-end --backbone iresnet_tiny    # + the backbone's share of the step

Writes ``speedup.json`` (one record per (method, rate, classes, ranks)), ``speedup.csv``,
``speedup.md`` and ``speedup.png`` (speedup vs rate, one line per method) to --out.
"""
from __future__ import annotations

import argparse
import csv
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

from dsoft_dist.bench.cli import bench_parser
from dsoft_dist.bench.head import PeakMemory, state_bytes
from dsoft_dist.config.schema import HeadConfig, OptimizerConfig, parse_fraction, rate_text
from dsoft_dist.head import ShardedClassifier, build_head_optimizer
from dsoft_dist.observability.timing import sync_device
from dsoft_dist.parallel.processes import distributed, spawn_local, under_launcher
from dsoft_dist.registry import MODELS
from dsoft_dist.utils import int_list

SAMPLED = {"d_softmax_k": ("d_softmax", "random"), "d_softmax_kn": ("d_softmax", "nearest"),
           "partial_fc": ("arcface", "partial"),
           "sampled_softmax": ("softmax", "random")}
FULL = {"arcface": ("arcface", "all"), "d_softmax": ("d_softmax", "all"), "d_softmax_b": ("d_softmax", "batch")}
METHODS = ("softmax_naive", *FULL, *SAMPLED)
DEFAULT_RATES = "1/2,1/4,1/8,1/16,1/32,1/64"
_MIB = 1 << 20


def parse_rates(text: str, option: str = "--rates") -> list[float]:
    """'1,1/8,1/64' -> [1.0, 0.125, 0.015625], each parsed as head.sample_rate is (parse_fraction);
    ValueError naming the option and the value unless each is in (0, 1]."""
    try:
        rates = [parse_fraction(v, option) for v in text.split(",") if v.strip()]
    except ValueError:  # parse_fraction's ConfigError: one message for the whole list, with an example
        rates = []
    if not rates or not all(0 < r <= 1 for r in rates):
        raise ValueError(f"{option} {text!r} is invalid: give comma-separated rates in (0, 1], e.g. 1,1/8,1/64")
    return rates


def _free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 1 << 62


def _naive_needs(classes: int, dim: int, b_local: int, world: int, device: torch.device) -> int:
    """Bytes softmax_naive needs on this machine: weight, gradient and momentum (C, D) per rank, plus the
    (B, C) logits, their softmax and gradient; every rank of this machine holds its own copy."""
    per_rank = 3 * classes * dim * 4 + 3 * b_local * classes * 4
    return per_rank * (world if device.type == "cpu" else 1)


class NaiveSoftmax:
    """The hand-written baseline: logits = emb W^T (B, C) materialized, F.cross_entropy, DDP-style all-reduce."""

    def __init__(self, classes: int, dim: int, device: torch.device, world: int):
        self.weight = (torch.randn(classes, dim, device=device) * 0.01).requires_grad_(True)
        self.opt = torch.optim.SGD([self.weight], lr=0.1, momentum=0.9, weight_decay=5e-4)
        self.world = world

    def step(self, emb: torch.Tensor, labels: torch.Tensor) -> None:
        logits = emb @ self.weight.t()  # (B_local, C)
        F.cross_entropy(logits, labels).backward()
        if self.world > 1:  # a replicated classifier under DDP: its gradient is averaged over ranks
            dist.all_reduce(self.weight.grad)
            self.weight.grad.div_(self.world)
        self.opt.step()
        self.opt.zero_grad()

    def state(self) -> int:
        return state_bytes(self.weight, self.opt)


class ShardedStep:
    """One class-sharded head and its optimizer as the trainer builds them by default (row-sparse SGD inside
    backward, the default logit cache)."""

    def __init__(self, classes: int, dim: int, loss: str, negatives: str, rate: float, device: torch.device):
        self.head = ShardedClassifier(classes, dim, loss=loss, negatives=negatives, sample_rate=rate, device=device,
                                      logit_cache_mb=HeadConfig().logit_cache_mb)
        self.opt = build_head_optimizer(self.head, OptimizerConfig(name="sgd", lr=0.1, momentum=0.9,
                                                                   weight_decay=5e-4, head_mode="sparse",
                                                                   head_step_in_backward=True))

    def step(self, emb: torch.Tensor, labels: torch.Tensor) -> None:
        self.head(emb, labels).backward()
        self.opt.step()
        self.opt.zero_grad()

    def state(self) -> int:
        return state_bytes(self.head.weight, self.opt)


def _build(method: str, rate: float, classes: int, args, device: torch.device, world: int):
    if method == "softmax_naive":
        return NaiveSoftmax(classes, args.dim, device, world)
    loss, negatives = FULL.get(method) or SAMPLED[method]
    return ShardedStep(classes, args.dim, loss, negatives, rate if method in SAMPLED else 1.0, device)


def _max_over_ranks(values: list[float], device: torch.device, world: int) -> list[float]:
    if world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def time_method(method: str, rate: float, classes: int, args, device: torch.device, rank: int, world: int) -> dict:
    """Warmup + repeats whole head steps of one method on every rank; the record of the slowest rank."""
    b_local = args.batch // world
    record = {"method": method, "rate": rate, "classes": classes, "ranks": world}
    need = _naive_needs(classes, args.dim, b_local, world, device) if method == "softmax_naive" else 0
    free = int(_max_over_ranks([float(-_free_bytes(device))], device, world)[0] * -1)
    if need > 0.85 * free:
        return {**record, "skipped": f"needs ~{need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB available"}
    model = _build(method, rate, classes, args, device, world)
    gen = torch.Generator().manual_seed(1000 + rank)
    times, peaks, k = [], [], classes
    for i in range(args.warmup + args.repeats):
        emb = torch.randn(b_local, args.dim, generator=gen).to(device).requires_grad_(True)
        labels = torch.randint(0, classes, (b_local,), generator=gen).to(device)
        with PeakMemory(device) as mem:
            sync_device(device)
            start = time.perf_counter()
            model.step(emb, labels)
            sync_device(device)
            elapsed = time.perf_counter() - start
        if i >= args.warmup:
            times.append(elapsed)
            peaks.append(mem.peak)
    build = 0.0
    if isinstance(model, ShardedStep):
        k = model.head.last_num_negatives * world  # rows computed over all ranks
        build = _build_seconds(model.head, device)
    step, transient, state, build = _max_over_ranks([statistics.median(times), max(peaks), model.state(), build],
                                                    device, world)
    if build:  # the steady step, plus this step's share of the table's builds
        table = model.head.nearest
        record.update(build_ms=1e3 * build, build_every=table.every, steady_ms=1e3 * step)
        step += build / table.every
    del model
    gc.collect()
    if method == "d_softmax_b":
        record["rate"] = k / classes  # its effective rate: the batch's classes
    return {**record, "k": int(k), "step_ms": 1e3 * step, "transient_mb": transient / _MIB,
            "peak_mb": (state + transient) / _MIB, "state_mb": state / _MIB,
            "times_ms": [1e3 * t for t in times]}


def _build_seconds(head, device: torch.device) -> float:
    """One build of a d_softmax_kn head's nearest-class table, in seconds (0 for the other heads)."""
    if head.nearest is None:
        return 0.0
    sync_device(device)
    start = time.perf_counter()
    head.nearest.build(head)
    sync_device(device)
    return time.perf_counter() - start


def backbone_step_ms(args, device: torch.device, world: int) -> float:
    """--end-to-end: median forward + backward (+ SGD) of the backbone on the local batch."""
    from dsoft_dist.models import build_model

    vectors = MODELS.get(args.backbone).inputs == "vectors"
    model = build_model(args.backbone, embedding_size=args.dim, input_size=args.input_size,
                        in_features=args.dim if vectors else 0).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    b_local = args.batch // world
    shape = (b_local, args.dim) if vectors else (b_local, 3, args.input_size, args.input_size)
    times = []
    for i in range(args.warmup + args.repeats):
        x = torch.randn(shape, device=device)
        sync_device(device)
        start = time.perf_counter()
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
        sync_device(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    return 1e3 * _max_over_ranks([statistics.median(times)], device, world)[0]


def exact_cpu_peaks() -> None:
    """Makes CPU transients count each step's own allocations: glibc returns a freed block to the system
    only if it came from mmap, and it raises its mmap threshold as blocks are freed, so a later step could
    reuse resident pages and read as ~0. A fixed 128 KiB threshold keeps every large tensor mmap'd."""
    import ctypes  # noqa: PLC0415

    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
    except OSError:  # not glibc: transients may read low, as the docs say
        pass


def run(args, rank: int = 0, world: int = 1) -> dict | None:
    """Every (classes, method, rate) on this rank; returns the results on rank 0."""
    device = torch.device(args.device)
    if device.type == "cpu":
        exact_cpu_peaks()
    records = []
    for classes in args.class_counts:
        for method in args.method_list:
            rates = args.rate_list if method in SAMPLED else [1.0]
            for rate in rates:
                records.append(time_method(method, rate, classes, args, device, rank, world))
                if rank == 0 and args.progress:
                    r = records[-1]
                    sys.stderr.write(f"C={classes} {method} r={rate:g}: "
                                     f"{r.get('skipped') or format(r['step_ms'], '.1f') + ' ms'}\n")
    add_speedups(records)
    backbone = backbone_step_ms(args, device, world) if args.end_to_end else None
    if backbone is not None:
        for r in records:
            if "step_ms" in r:
                r["head_share"] = r["step_ms"] / (r["step_ms"] + backbone)
    return {"records": records, "backbone_ms": backbone} if rank == 0 else None


def add_speedups(records: list[dict]) -> None:
    """speedup_vs_softmax / speedup_vs_d_softmax: median step ratios at the same (classes, ranks)."""
    base = {(r["method"], r["classes"], r["ranks"]): r.get("step_ms") for r in records}
    for r in records:
        if "step_ms" not in r:
            continue
        for name, method in (("speedup_vs_softmax", "softmax_naive"), ("speedup_vs_d_softmax", "d_softmax")):
            ref = base.get((method, r["classes"], r["ranks"]))
            r[name] = ref / r["step_ms"] if ref else None


def _spawned(args, out_path: str) -> None:
    with distributed("gloo" if args.device == "cpu" else "auto") as env:
        if args.threads:
            torch.set_num_threads(args.threads)
        result = run(args, env.rank, env.world_size)
        if env.is_main:
            with open(out_path, "w", encoding="utf-8") as fh:
                json.dump(result, fh)


def machine(argv: list[str], bench: str = "speedup") -> dict:
    """What ran it: host, cores, device, versions, the command (``argv``: the benchmark's own arguments)."""
    device = "cpu"
    if torch.cuda.is_available():
        device = torch.cuda.get_device_name(0)
    return {"host": platform.node(), "cpu_count": os.cpu_count(), "device": device, "torch": torch.__version__,
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "command": " ".join([f"dsoft bench {bench}", *argv])}


def format_markdown(result: dict, args) -> str:
    """A Markdown table per (classes, ranks), the machine and the command above them."""
    m = result["machine"]
    lines = [f"`{m['command']}` on {m['host']} ({m['cpu_count']} cores, {m['device']}), torch {m['torch']}, "
             f"{m['date']}; D = {args.dim}, global batch B = {args.batch}, median of {args.repeats} after "
             f"{args.warmup} warm-up"]
    if result.get("backbone_ms") is not None:
        lines.append(f"backbone {args.backbone} forward + backward: {result['backbone_ms']:.1f} ms per step")
    groups = sorted({(r["classes"], r["ranks"]) for r in result["records"]})
    share = result.get("backbone_ms") is not None
    for classes, ranks in groups:
        lines += ["", f"**C = {classes:,}, {ranks} rank{'s' if ranks > 1 else ''}**", "",
                  "| method | r | K | step ms | vs softmax_naive | vs d_softmax | transient MiB | peak MiB |"
                  + (" head share |" if share else ""),
                  "|---|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if share else "")]
        for r in result["records"]:
            if (r["classes"], r["ranks"]) != (classes, ranks):
                continue
            if "skipped" in r:
                lines.append(f"| {r['method']} | {rate_text(r['rate'])} | | skipped: {r['skipped']} | | | | |"
                             + (" |" if share else ""))
                continue
            vs = [f"{v:.1f}x" if v else "" for v in (r["speedup_vs_softmax"], r["speedup_vs_d_softmax"])]
            lines.append(f"| {r['method']} | {rate_text(r['rate'])} | {r['k']:,} | {r['step_ms']:,.1f} | {vs[0]} | "
                         f"{vs[1]} | {r['transient_mb']:,.0f} | {r['peak_mb']:,.0f} |"
                         + (f" {100 * r['head_share']:.0f}% |" if share else ""))
        builds = [r for r in result["records"]
                  if (r["classes"], r["ranks"]) == (classes, ranks) and "build_ms" in r]
        lines += [""] * bool(builds) + [
            f"{r['method']} at r = {rate_text(r['rate'])}: a steady step {r['steady_ms']:,.1f} ms plus its share "
            f"of the nearest-class table's build ({r['build_ms']:,.1f} ms every {r['build_every']:,} draws)"
            for r in builds]
    return "\n".join(lines)


def write_csv(records: list[dict], path: str) -> None:
    fields = ["method", "rate", "classes", "ranks", "k", "step_ms", "peak_mb", "transient_mb", "state_mb",
              "speedup_vs_softmax", "speedup_vs_d_softmax", "head_share", "steady_ms", "build_ms", "build_every",
              "skipped"]
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(records)


def plot(records: list[dict], path: str) -> None:
    """speedup vs d_softmax against the sample rate (log2 axis), one line per method and one panel per
    (classes, ranks); full-rate methods are single points at r = 1 (d_softmax_b at its K / C)."""
    import matplotlib  # noqa: PLC0415 (only when a plot is written)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    groups = sorted({(r["classes"], r["ranks"]) for r in records})
    fig, axes = plt.subplots(1, len(groups), figsize=(5.5 * len(groups), 4.2), squeeze=False)
    for ax, (classes, ranks) in zip(axes[0], groups):
        for method in METHODS:
            rows = sorted((r for r in records if r["method"] == method
                           and (r["classes"], r["ranks"]) == (classes, ranks) and r.get("speedup_vs_d_softmax")),
                          key=lambda r: r["rate"])
            if rows:
                ax.plot([r["rate"] for r in rows], [r["speedup_vs_d_softmax"] for r in rows],
                        marker="o", label=method)
        ideal = sorted({r["rate"] for r in records if r["method"] in SAMPLED})
        if ideal:
            ax.plot(ideal, [1 / r for r in ideal], linestyle=":", color="gray", label="ideal 1/r")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2)
        ax.set_xlabel("sample rate r")
        ax.set_ylabel("speedup vs full D-Softmax (whole head step)")
        ax.set_title(f"C = {classes:,}, {ranks} rank{'s' if ranks > 1 else ''}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(result: dict, args) -> dict:
    """speedup.json / .csv / .md / .png under args.out; returns their paths."""
    os.makedirs(args.out, exist_ok=True)
    paths = {ext: os.path.join(args.out, f"speedup.{ext}") for ext in ("json", "csv", "md", "png")}
    with open(paths["json"], "w", encoding="utf-8") as fh:
        json.dump(result, fh, indent=1)
    write_csv(result["records"], paths["csv"])
    with open(paths["md"], "w", encoding="utf-8") as fh:
        fh.write(result["markdown"] + "\n")
    plot(result["records"], paths["png"])
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(result["records"], fh, indent=1)
    return paths


def build_parser() -> argparse.ArgumentParser:
    p = bench_parser("speedup", __doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--classes", default="", help="comma-separated C (default: 100000,1000000 on CPU, "
                   "1000000,10000000 on CUDA)")
    p.add_argument("--dim", type=int, default=512, help="embedding dim D (default 512)")
    p.add_argument("--batch", type=int, default=512, help="global batch, split over the ranks")
    p.add_argument("--rates", default=DEFAULT_RATES, help="sample rates of the sampled methods (fractions allowed)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {', '.join(METHODS)}")
    p.add_argument("--nproc", type=int, default=1, help="ranks started here (under torchrun: its ranks)")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda")
    p.add_argument("--repeats", type=int, default=3,
                   help="timed steps per method and rate; step_ms is their median (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps before the timed ones (default 1)")
    p.add_argument("--threads", type=int, default=0, help="torch threads per rank (0 = torch's default)")
    p.add_argument("--end-to-end", action="store_true", help="also time the backbone's forward + backward")
    p.add_argument("--backbone", default="iresnet_tiny", help="--end-to-end backbone (a dsoft_dist.models name)")
    p.add_argument("--input-size", type=int, default=32, help="--end-to-end image size")
    p.add_argument("--out", default="runs/speedup", help="folder for speedup.json/.csv/.md/.png")
    p.add_argument("--json", metavar="PATH", help="also write the records alone to PATH")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no per-row lines on stderr")
    return p


def check_args(args) -> None:
    """Fills the parsed lists and defaults; ValueError naming the option on a bad value."""
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: no CUDA GPU is available; use --device cpu")
    default = "1000000,10000000" if args.device.startswith("cuda") else "100000,1000000"
    args.class_counts = int_list(args.classes or default, "--classes", 1)
    args.rate_list = parse_rates(args.rates)
    args.method_list = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in args.method_list if m not in METHODS]
    if unknown or not args.method_list:
        raise ValueError(f"--methods {args.methods!r}: unknown {unknown}; choose from {', '.join(METHODS)}")
    for name in ("dim", "batch", "repeats", "nproc", "input_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} {getattr(args, name)} is invalid: must be >= 1")
    world = int(os.environ.get("WORLD_SIZE", args.nproc)) if under_launcher() else args.nproc
    if args.batch % world:
        raise ValueError(f"--batch {args.batch} is not divisible by the {world} ranks: the global batch is split")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_args(args)
    os.environ.setdefault("WANDB_MODE", "disabled")
    if under_launcher() or args.nproc > 1:  # torchrun / Slurm started the ranks, or we start them here
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "result.json")
            if under_launcher():
                _spawned(args, out)
                if os.environ.get("RANK") != "0":
                    return 0
            else:
                spawn_local(_spawned, args.nproc, (args, out))
            with open(out, encoding="utf-8") as fh:
                result = json.load(fh)
    else:
        if args.threads:
            torch.set_num_threads(args.threads)
        result = run(args)
    result["machine"] = machine(sys.argv[1:] if argv is None else list(argv))
    result["markdown"] = format_markdown(result, args)
    paths = write_outputs(result, args)
    sys.stdout.write(result["markdown"] + "\n\n" + "wrote " + ", ".join(paths.values()) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
