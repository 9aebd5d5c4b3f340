"""``dsoft plan``: memory per GPU, bytes per step, head FLOPs and (from a measured profile) time of the head.

    dsoft plan --classes 10000000 --gpus 64 --dim 512 --batch-per-gpu 128 --dtype bf16 --optimizer sgd \\
        --negatives random --sample-rate 1/64 --backbone iresnet50
    dsoft plan --classes 1e6,1e7,1e8 --gpus 8,64,512 --sample-rate 1,1/64 --json > plans.json
    dsoft plan --classes 200000 --gpus 2 --dim 128 --batch-per-gpu 256 --device cpu --measure-profile cpu.json
    dsoft plan ... --device cuda --profile plan-profile.json --intra-gbps 150 --inter-gbps 25
    dsoft plan --classes 1e7 --gpus 64 --negatives nearest --nearest-per-class 8 --sample-rate 1/64

Several comma-separated --classes, --gpus and --sample-rate values give one line per combination;
one combination gives the full report. r = 1 is planned as negatives=all (every row, a dense weight
gradient), as ``dsoft bench head`` runs it. The model and its assumptions: docs/scale.md.
"""
from __future__ import annotations

import argparse
import json
import math
import sys

from dsoft_dist.losses.negatives import NEAREST_DEFAULTS
from dsoft_dist.plan.estimate import DEVICES, DTYPE_BYTES, HEAD_MODES, NEGATIVES, OPTIMIZERS, PlanInputs


def _plans(args) -> list[PlanInputs]:
    """Every (classes, gpus, rate) combination as PlanInputs (ValueError naming the option on bad input)."""
    from dsoft_dist.utils import int_list

    classes = int_list(args.classes, "--classes", 1)
    gpus = int_list(args.gpus, "--gpus", 1)
    rates = sample_rates(args.sample_rate)
    if args.gpus_per_node < 1:
        raise ValueError(f"--gpus-per-node {args.gpus_per_node} is invalid: give a whole number >= 1, e.g. 8")
    if args.nearest_per_class is not None and args.negatives != "nearest":
        raise ValueError(f"--nearest-per-class {args.nearest_per_class} is read only with --negatives nearest, not "
                         f"{args.negatives!r}: leave it out or plan --negatives nearest")
    per_class = NEAREST_DEFAULTS["nearest_per_class"] if args.nearest_per_class is None else args.nearest_per_class
    plans = []
    for c in classes:
        for p in gpus:
            nodes = args.nodes if args.nodes is not None else math.ceil(p / args.gpus_per_node)
            for r in rates:
                negatives = "all" if r >= 1.0 else args.negatives
                nearest = {"nearest_per_class": per_class} if negatives == "nearest" else {}
                plans.append(PlanInputs(
                    classes=c, gpus=p, nodes=nodes, dim=args.dim, batch_per_gpu=args.batch_per_gpu, dtype=args.dtype,
                    weight_dtype=args.weight_dtype, optimizer=args.optimizer, momentum=args.momentum,
                    negatives=negatives, sample_rate=r, inter_correction=args.inter_correction,
                    step_in_backward=args.step_in_backward, head_mode=args.head_mode, device=args.device,
                    backend=args.backend, chunk_size=args.chunk_size, backbone=args.backbone,
                    gpu_memory_gib=args.gpu_memory, **nearest))
    return plans


def sample_rates(text: str) -> list[float]:
    """'1,1/64' -> [1.0, 0.015625]: each parsed as head.sample_rate is in YAML and --set (parse_fraction)."""
    from dsoft_dist.config.schema import parse_fraction

    try:
        rates = [parse_fraction(v, "--sample-rate") for v in text.split(",") if v.strip()]
    except ValueError:
        rates = []
    if not rates or not all(0 < r <= 1 for r in rates):
        raise ValueError(f"--sample-rate {text!r} is invalid: give comma-separated rates in (0, 1], e.g. 1,1/8,1/64")
    return rates


def _profile(args, plans):
    """The measured profile: measured now (--measure-profile, written there), read (--profile), or None."""
    from dsoft_dist.plan.profile import load_profile, measure_profile, save_profile

    if args.measure_profile and args.profile:
        raise ValueError("--profile and --measure-profile were both given: measure a new profile or use one")
    if args.measure_profile:
        profile = measure_profile(plans, args.device, collective=not args.no_collective)
        save_profile(profile, args.measure_profile)
        return profile
    return load_profile(args.profile) if args.profile else None


def _backbone(args):
    """(parameters, buffers) of --backbone from the model registry, or None."""
    if args.backbone is None:
        return None
    from dsoft_dist.plan.memory import backbone_params
    from dsoft_dist.registry import MODELS

    names = [m for m in MODELS.names() if MODELS.get(m).inputs == "images"]
    if args.backbone not in names:
        raise ValueError(f"--backbone {args.backbone!r} is unknown: use one of {', '.join(names)}")
    return backbone_params(args.backbone, args.dim)


def _positive_or_none(value, option):
    if value is not None and not value > 0:
        raise ValueError(f"{option} {value} is invalid: give the link's bandwidth in GB/s (> 0), e.g. 100")
    return value


def run(args) -> int:
    """Plans every combination and writes the report (text or --json) to stdout."""
    from dsoft_dist.plan.report import ASSUMPTIONS, build_plan, format_details, format_table

    intra = _positive_or_none(args.intra_gbps, "--intra-gbps")
    inter = _positive_or_none(args.inter_gbps, "--inter-gbps")
    plans = _plans(args)
    backbone = _backbone(args)
    profile = _profile(args, plans)
    results = [build_plan(p, backbone, profile, intra, inter) for p in plans]
    if args.json:
        out = {"assumptions": ASSUMPTIONS, "profile": profile, "plans": results}
        sys.stdout.write(json.dumps(out, indent=1) + "\n")  # the command's product, on stdout
    else:
        text = format_details(results[0]) if len(results) == 1 else format_table(results)
        sys.stdout.write(text + "\n")
    return 0


def register(subparsers) -> None:
    """Adds ``dsoft plan``."""
    p = subparsers.add_parser("plan", help="plan a cluster: head memory per GPU, bytes per step, FLOPs, step time",
                              description=__doc__.split("\n")[0] + " See docs/scale.md.")
    p.add_argument("--classes", required=True, help="identities C (comma-separated for several; 1e6 allowed)")
    p.add_argument("--gpus", required=True, help="ranks P of the head's process group (comma-separated for several)")
    p.add_argument("--nodes", type=int, default=None, help="nodes K (default: ceil(P / --gpus-per-node))")
    p.add_argument("--gpus-per-node", type=int, default=8, help="ranks per node, for the default --nodes (default 8)")
    p.add_argument("--dim", type=int, default=512, help="embedding dim D")
    p.add_argument("--batch-per-gpu", type=int, default=128, help="local batch per rank")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPE_BYTES), help="embeddings (what is gathered)")
    p.add_argument("--weight-dtype", default="fp32", choices=sorted(DTYPE_BYTES), help="class rows + their state")
    p.add_argument("--optimizer", default="sgd", choices=OPTIMIZERS,
                   help="the head's optimizer, which sets its state per class row: sgd (a momentum buffer "
                   "when --momentum > 0) or adamw (two moments) (default sgd)")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (0: no momentum buffer)")
    p.add_argument("--negatives", default="random", choices=[n for n in NEGATIVES if n != "all"],
                   help="negatives for r < 1 (r = 1 is planned as negatives=all; nearest: D-Softmax-KN)")
    p.add_argument("--nearest-per-class", type=int, default=None,
                   help="with --negatives nearest: M, the nearest classes of its own class each row adds "
                   f"(default {NEAREST_DEFAULTS['nearest_per_class']})")
    p.add_argument("--sample-rate", default="1/64", help="r, fractions allowed, comma-separated for several: 1,1/64")
    p.add_argument("--inter-correction", action="store_true",
                   help="the head's inter_correction (one 8-byte all-reduce)")
    p.add_argument("--step-in-backward", action="store_true", help="the step in backward (no weight gradient)")
    p.add_argument("--head-mode", default="sparse", choices=HEAD_MODES,
                   help="optimizer.head_mode: row-sparse step, or dense (a full weight gradient) (default sparse)")
    p.add_argument("--device", default="cuda", choices=DEVICES, help="what the ranks run on (chunk size, profile)")
    p.add_argument("--backend", default="torch", choices=("torch", "cpu-c"),
                   help="the head's backend: torch or cpu-c (compiled CPU passes, --device cpu; same memory, "
                   "fewer passes)")
    p.add_argument("--chunk-size", type=int, default=0, help="the head's chunk_size (0 = automatic)")
    p.add_argument("--backbone", default=None, help="add a backbone's state, e.g. iresnet50 (activations excluded)")
    p.add_argument("--gpu-memory", type=float, default=80.0,
                   help="GiB one device holds (default 80: an A100/H100 80GB, all of it usable)")
    p.add_argument("--profile", metavar="FILE", help="a measured profile (JSON) to predict the step time with")
    p.add_argument("--measure-profile", metavar="FILE", help="measure this machine at the plan's shapes, write FILE")
    p.add_argument("--no-collective", action="store_true", help="--measure-profile without the gloo measurement")
    p.add_argument("--intra-gbps", type=float, default=None, help="declared GB/s of a link within a node")
    p.add_argument("--inter-gbps", type=float, default=None, help="declared GB/s of a link between nodes")
    p.add_argument("--json", action="store_true", help="print the plans (and the profile) as JSON")
    p.set_defaults(func=run)


def main(argv=None) -> int:
    """``python -m dsoft_dist.plan.cli`` = ``dsoft plan`` (user errors as one line, as the dsoft command does)."""
    from dsoft_dist.errors import run_command

    parser = argparse.ArgumentParser(prog="dsoft")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["plan", *(sys.argv[1:] if argv is None else argv)])
    return run_command("dsoft plan", args.func, args)


if __name__ == "__main__":
    raise SystemExit(main())
