"""``dsoft eval`` (verification / TAR@FAR report for a checkpoint) and ``dsoft export`` (ONNX / TorchScript).

    dsoft eval --checkpoint ckpt/backbone.pt --bin lfw.bin cfp_fp.bin --pairs pairs.txt --report out/
    dsoft export --checkpoint ckpt/backbone.pt --format onnx out/backbone.onnx
"""
from __future__ import annotations

import argparse

from dsoft_dist.observability import get_logger

log = get_logger(__name__)


def register(subparsers) -> None:
    """Adds the ``eval`` and ``export`` subcommands."""
    p = subparsers.add_parser("eval", help="verification (.bin, 10-fold) and TAR@FAR (pair lists) for a checkpoint",
                              description="Evaluate a backbone checkpoint; prints a table, optionally writes a report.")
    p.add_argument("--checkpoint", help="backbone checkpoint written by save_backbone (needed unless only .npz pairs)")
    p.add_argument("--bin", nargs="+", default=[], metavar="BIN", help="InsightFace .bin verification sets")
    p.add_argument("--pairs", nargs="+", default=[], metavar="LIST",
                   help="pair lists: text 'path1 path2 label' or .npz (scores/emb1+emb2 + issame)")
    p.add_argument("--report", metavar="DIR", help="write results.json, results.md and roc.png here")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--no-flip", dest="flip", action="store_false", help="disable flip augmentation")
    p.add_argument("--folds", type=int, default=10)
    p.add_argument("--far", type=float, default=1e-3, help="FAR for VAL@FAR on .bin sets")
    p.add_argument("--fars", type=float, nargs="+", default=[1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1])
    p.add_argument("--interpolation", choices=("linear", "none"), default="linear", help="TAR@FAR rule")
    p.add_argument("--device", default="auto", help="auto (cuda when available, else cpu), cpu, cuda, cuda:1, ...")
    p.add_argument("--progress", action="store_true", help="show progress bars")
    p.set_defaults(func=run_eval)

    e = subparsers.add_parser("export", help="export a backbone checkpoint to ONNX or TorchScript",
                              description="Export with a dynamic batch dimension and check parity against PyTorch.")
    e.add_argument("out", help="output file (.onnx or .pt)")
    e.add_argument("--checkpoint", required=True)
    e.add_argument("--format", choices=("onnx", "torchscript"), default="onnx")
    e.add_argument("--atol", type=float, default=1e-4, help="parity tolerance (max abs difference)")
    e.add_argument("--opset", type=int, default=None)
    e.add_argument("--no-dynamo", dest="dynamo", action="store_false", help="use the legacy TorchScript ONNX exporter")
    e.add_argument("--no-check", dest="check", action="store_false", help="skip the parity check")
    e.set_defaults(func=run_export)


def _evaluate(args: argparse.Namespace) -> dict:
    from dsoft_dist.config.schema import EvalConfig  # noqa: PLC0415 (keep `dsoft --help` fast)
    from dsoft_dist.eval.runner import evaluate_all  # noqa: PLC0415
    from dsoft_dist.models import load_backbone  # noqa: PLC0415

    if args.device == "auto":
        import torch  # noqa: PLC0415

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    model = None
    if args.checkpoint:
        model, cfg = load_backbone(args.checkpoint, map_location=args.device)
        log.info("loaded %s (%s)", args.checkpoint, cfg)
    elif args.bin:
        raise ValueError("--bin needs --checkpoint: the images must be embedded by a model")
    cfg = EvalConfig(bins=args.bin, pairs=args.pairs, flip=args.flip, batch_size=args.batch_size, folds=args.folds,
                     fars=args.fars)  # validates the values (ConfigError is a ValueError)
    results = evaluate_all(model, cfg, device=args.device, far=args.far, progress=args.progress,
                           interpolation=args.interpolation)
    return {"checkpoint": args.checkpoint, "flip": args.flip, **results}


def run_eval(args: argparse.Namespace) -> int:
    """``dsoft eval``: prints the tables to stdout; returns 2 on a usage/data error."""
    from dsoft_dist.eval.report import format_tables, write_report  # noqa: PLC0415

    if not args.bin and not args.pairs:
        log.error("dsoft eval: nothing to evaluate; pass --bin FILE... and/or --pairs FILE...")
        return 2
    try:
        results = _evaluate(args)
    except (ValueError, FileNotFoundError) as exc:
        log.error("dsoft eval: %s", exc)
        return 2
    print(format_tables(results))
    if args.report:
        paths = write_report(results, args.report)
        print("report: " + ", ".join(paths[k] for k in sorted(paths)))
    return 0


def run_export(args: argparse.Namespace) -> int:
    """``dsoft export``: writes the file, prints the parity result; returns 2 on error or parity failure."""
    from dsoft_dist.eval.export import export_model  # noqa: PLC0415
    from dsoft_dist.models import load_backbone  # noqa: PLC0415

    try:
        model, _ = load_backbone(args.checkpoint)
        res = export_model(model, args.out, fmt=args.format, check=args.check, atol=args.atol, opset=args.opset,
                           dynamo=args.dynamo)
    except (ValueError, FileNotFoundError) as exc:
        log.error("dsoft export: %s", exc)
        return 2
    diff = ("not checked" if res["max_abs_diff"] is None
            else f"max|diff| {res['max_abs_diff']:.3g} ({res['checked_with']})")
    print(f"exported {res['path']} ({res['format']}, dynamic batch): parity {diff}")
    return 0
