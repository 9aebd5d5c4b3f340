"""Benchmark backbones' training step (forward + backward of a stand-in loss), with activation checkpointing
off and on, measured alternately in one run.

    dsoft bench backbone --models vit_b iresnet100 --device cuda --batch 128 --dtype bf16
    dsoft bench backbone --models iresnet_tiny vit_t --input-size 32 --batch 16     # CPU, small

For each model and each checkpointing setting it builds the backbone (train mode, SGD-free: the step is
forward, ``emb.float().square().mean()`` as the loss, backward), runs --warmup untimed steps, then times
--steps steps per repeat, alternating the two settings in every repeat so both see the same machine
state. Prints a table: median ms per step, images/s, peak memory (CUDA) and the time ratio
checkpointing on / off; a model without activation checkpointing gets one row. --json writes the records.
"""
from __future__ import annotations

import json
import statistics
import sys
import time

import torch

from dsoft_dist.bench.cli import bench_parser

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _setup(name: str, checkpointing: bool, args, device: torch.device):
    """(model, step function) for one setting; step() runs one forward + backward."""
    from dsoft_dist.models import build_model  # noqa: PLC0415

    model = build_model(name, embedding_size=args.dim, input_size=args.input_size,
                        activation_checkpointing=checkpointing).to(device).train()
    x = torch.rand(args.batch, 3, args.input_size, args.input_size, device=device) * 2 - 1
    dtype = DTYPES[args.dtype]

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            emb = model(x)  # (B, D)
        emb.float().square().mean().backward()
        model.zero_grad(set_to_none=True)

    return model, step


def _time(step, steps: int, device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return (time.perf_counter() - start) / steps


def bench_model(name: str, args, device: torch.device) -> list[dict]:
    """One record per checkpointing setting: median seconds per step over the repeats, images/s, peak MiB."""
    from dsoft_dist.registry import MODELS  # noqa: PLC0415

    settings = [False, True] if MODELS.get(name).checkpointing else [False]
    runs = {s: _setup(name, s, args, device) for s in settings}
    times: dict[bool, list[float]] = {s: [] for s in settings}
    peaks = {}
    for s, (_, step) in runs.items():
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        for _ in range(args.warmup):
            step()
        _sync(device)
        peaks[s] = torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == "cuda" else None
    for _ in range(args.repeats):
        for s, (_, step) in runs.items():
            times[s].append(_time(step, args.steps, device))
    params = sum(p.numel() for p in runs[False][0].parameters())
    return [{"model": name, "activation_checkpointing": s, "params": params, "batch": args.batch,
             "input_size": args.input_size, "dtype": args.dtype, "device": str(device),
             "s_per_step": statistics.median(times[s]), "images_per_s": args.batch / statistics.median(times[s]),
             "peak_mib": peaks[s]} for s in settings]


def table(records: list[dict]) -> str:
    """The printed table; the last column is the step time with checkpointing over the time without."""
    off = {r["model"]: r["s_per_step"] for r in records if not r["activation_checkpointing"]}
    lines = [f"{'model':<14} {'params':>8} {'ckpt':>4} {'ms/step':>9} {'images/s':>9} {'peak MiB':>9} {'on/off':>7}"]
    for r in records:
        peak = "-" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}"
        ratio = f"{r['s_per_step'] / off[r['model']]:.2f}" if r["activation_checkpointing"] else ""
        ckpt = "on" if r["activation_checkpointing"] else "off"
        lines.append(f"{r['model']:<14} {r['params'] / 1e6:>7.1f}M {ckpt:>4} "
                     f"{r['s_per_step'] * 1e3:>9.1f} {r['images_per_s']:>9.1f} {peak:>9} {ratio:>7}")
    return "\n".join(lines)


def build_parser():
    p = bench_parser("backbone", __doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["iresnet_tiny"], help="dsoft_dist.models names (default "
                   "iresnet_tiny)")
    p.add_argument("--batch", type=int, default=32, help="images per step (default 32)")
    p.add_argument("--input-size", type=int, default=112, help="image side in pixels (default 112)")
    p.add_argument("--dim", type=int, default=512, help="embedding size (default 512)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="autocast dtype (default fp32: none)")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda")
    p.add_argument("--steps", type=int, default=3, help="timed steps per repeat (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per setting first (default 1)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats; the table shows medians (default 3)")
    p.add_argument("--json", metavar="PATH", help="also write the records to PATH")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    for key in ("batch", "input_size", "dim", "steps", "repeats"):
        if getattr(args, key) < 1:
            raise ValueError(f"--{key.replace('_', '-')} {getattr(args, key)} is invalid: it must be >= 1")
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but CUDA is not available: use --device cpu")
    records = [r for name in args.models for r in bench_model(name, args, device)]
    sys.stdout.write(table(records) + "\n")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(records, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
