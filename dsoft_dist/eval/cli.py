"""``dsoft eval`` (verification, TAR@FAR, rank-k identification) and ``dsoft export`` (ONNX / TorchScript).

    dsoft eval --checkpoint ckpt/backbone.pt --bin lfw.bin cfp_fp.bin --pairs pairs.txt --report out/
    dsoft eval --checkpoint runs/demo --bin val.bin                    # a run folder: its backbone.pt
    dsoft eval --checkpoint ckpt/backbone.pt --identify probes/ gallery/ --distractors megaface/ --rank-k 1 5 10
    dsoft eval --identify probes.npz gallery.npz --distractors distractors.npy     # precomputed: no checkpoint
    dsoft eval --checkpoint ckpt/backbone.pt --ijb /data/IJB_release/IJBC --ijb-target IJBC --report out/
    dsoft eval --checkpoint ckpt/backbone.pt --ijb ROOT --nproc 4      # 4 local processes embed the images
    torchrun --nproc-per-node 8 -m dsoft_dist.cli eval --checkpoint CKPT --ijb ROOT   # or the launched ranks
    dsoft export --checkpoint ckpt/backbone.pt --format onnx out/backbone.onnx

``--ijb ROOT``: the IJB-B / IJB-C protocol (dsoft_dist.eval.ijb; ``--ijb-no-score``, ``--ijb-normalize``,
``--no-flip`` switch its parts); the images are shared by ``--nproc`` local ranks or by torchrun's ranks,
and rank 0 prints and writes the report.
``--identify PROBES GALLERY``: image folders ``ROOT/<identity>/<image>`` (identities matched by
folder name), shard sets, or ``.npz`` files of ``embeddings`` (N, D) + ``ids`` (N,);
``--distractors``: any images under a folder, a shard set, or ``.npz``/``.npy`` embeddings
(see dsoft_dist.eval.idsets). Prints rank-k rates beside the verification tables and adds them
to the ``--report``. Bad input ends in one ``dsoft eval: error: ...`` line and exit 2.

``--checkpoint``: a backbone file (a run's backbone.pt, or ``dsoft ckpt export``'s) or a run folder
(``logging.output_dir``), whose backbone.pt is used. Progress bars are drawn on a terminal only
(``--no-progress`` switches them off; redirected output never has them).
"""
from __future__ import annotations

import argparse
import os
import sys

from dsoft_dist.observability import get_logger

log = get_logger(__name__)
BACKBONE_FILE = "backbone.pt"  # what a finished run writes into its output folder
CHECKPOINT_HELP = ("a run folder (logging.output_dir of dsoft train: its backbone.pt is used) or a backbone file "
                   "(a run's backbone.pt, or the one dsoft ckpt export writes)")


def register(subparsers) -> None:
    """Adds the ``eval`` and ``export`` subcommands."""
    p = subparsers.add_parser("eval", help="verification (.bin, 10-fold), TAR@FAR (pair lists), rank-k "
                              "identification and IJB-B/IJB-C for a checkpoint",
                              description="Evaluate a backbone checkpoint; prints a table, optionally writes a report.")
    p.add_argument("--checkpoint", help=CHECKPOINT_HELP + "; needed unless every input is .npz embeddings")
    p.add_argument("--bin", nargs="+", default=[], metavar="BIN", help="InsightFace .bin verification sets")
    p.add_argument("--pairs", nargs="+", default=[], metavar="LIST",
                   help="pair lists: text 'path1 path2 label' or .npz (scores/emb1+emb2 + issame)")
    p.add_argument("--identify", nargs=2, metavar=("PROBES", "GALLERY"),
                   help="rank-k identification: image folders ROOT/<identity>/<image>, shard sets, or .npz "
                        "(embeddings + ids); probe and gallery identities are matched by name")
    p.add_argument("--distractors", metavar="DISTRACTORS",
                   help="distractors for --identify: images at any depth under DIR, a shard set, or .npz/.npy "
                        "embeddings")
    p.add_argument("--rank-k", type=int, nargs="+", default=[1, 5, 10], metavar="K", help="ranks to report")
    p.add_argument("--backend", choices=("auto", "torch", "faiss"), default="auto",
                   help="distractor search for --identify: faiss when installed (auto), or chunked torch")
    p.add_argument("--report", metavar="DIR", help="write results.json, results.md and roc.png here")
    p.add_argument("--batch-size", type=int, default=256, help="images embedded per forward pass (default 256)")
    p.add_argument("--no-flip", dest="flip", action="store_false", help="disable flip augmentation")
    p.add_argument("--folds", type=int, default=10,
                   help="folds of the k-fold verification protocol on .bin sets (default 10, the LFW protocol)")
    p.add_argument("--far", type=float, default=1e-3, help="FAR for VAL@FAR on .bin sets")
    p.add_argument("--fars", type=float, nargs="+", default=[1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1], metavar="FAR",
                   help="false accept rates at which TAR is reported for pair lists and --ijb (default 1e-6 ... 1e-1)")
    p.add_argument("--interpolation", choices=("linear", "none"), default="linear", help="TAR@FAR rule")
    p.add_argument("--device", default="auto", help="auto (cuda when available, else cpu), cpu, cuda, cuda:1, ...")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                   help="progress bars (default: on a terminal; never in redirected output)")
    _add_ijb_arguments(p)
    p.set_defaults(func=run_eval)

    e = subparsers.add_parser("export", help="export a backbone checkpoint to ONNX or TorchScript",
                              description="Export with a dynamic batch dimension and check parity against PyTorch.")
    e.add_argument("out", help="output file (.onnx or .pt)")
    e.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    e.add_argument("--format", choices=("onnx", "torchscript"), default="onnx",
                   help="onnx (torch.export-based exporter, the default) or torchscript (torch.jit, which "
                        "PyTorch 2.13 deprecates)")
    e.add_argument("--atol", type=float, default=1e-4, help="parity tolerance (max abs difference)")
    e.add_argument("--opset", type=int, default=None, help="ONNX opset (default: torch's, 20 in torch 2.13)")
    e.add_argument("--no-check", dest="check", action="store_false", help="skip the parity check")
    e.set_defaults(func=run_export)


def _add_ijb_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ijb", metavar="ROOT",
                   help="an IJB-B / IJB-C release folder (loose_crop/ and meta/): 1:1 TAR@FAR read as arcface_torch "
                        "reads it (at --fars) and, when the 1:N lists are there, TPIR@FPIR and rank-1/5/10")
    p.add_argument("--ijb-target", choices=("IJBC", "IJBB"), default="IJBC",
                   help="the release --ijb holds: its meta files are named ijbc_* or ijbb_* (default IJBC)")
    p.add_argument("--ijb-no-score", dest="ijb_score", action="store_false",
                   help="--ijb: do not weigh each image feature by its detector score (the standard protocol does)")
    p.add_argument("--ijb-normalize", action="store_true",
                   help="--ijb: L2-normalize each image feature before weighting and pooling (the standard script's "
                        "'norm' variant; by default the feature norm weighs the image)")
    p.add_argument("--nproc", type=int, default=1,
                   help="--ijb: local processes that share the images (gloo on CPU, nccl on GPUs), rank 0 scores "
                        "(default 1); under torchrun the launched ranks share them (leave --nproc out there)")


def backbone_file(path: str) -> str:
    """The backbone file ``--checkpoint PATH`` names: PATH itself, or PATH/backbone.pt for a run folder.

    A missing path raises FileNotFoundError; a training checkpoint (a step folder or checkpoints/ root,
    not loadable on its own) or a folder without backbone.pt raises ValueError saying what to pass.
    """
    if os.path.isfile(path):
        return path
    if not os.path.exists(path):
        raise FileNotFoundError(f"--checkpoint {path!r} does not exist: pass {CHECKPOINT_HELP}")
    if any(os.path.isfile(os.path.join(path, name)) for name in ("manifest.json", "latest")):
        raise ValueError(f"--checkpoint {path!r} is a training checkpoint, not a backbone: export it with "
                         f"dsoft ckpt export {path} OUT, then pass OUT/{BACKBONE_FILE}")
    backbone = os.path.join(path, BACKBONE_FILE)
    if os.path.isfile(backbone):
        log.info("--checkpoint %s is a run folder: using %s", path, backbone)
        return backbone
    if os.path.isdir(os.path.join(path, "checkpoints")):
        raise ValueError(f"--checkpoint {path!r} is a run folder without {BACKBONE_FILE} (a run writes it when it "
                         f"finishes): finish the run, or export a checkpoint with dsoft ckpt export "
                         f"{os.path.join(path, 'checkpoints')} OUT and pass OUT/{BACKBONE_FILE}")
    raise ValueError(f"--checkpoint {path!r} is a folder without {BACKBONE_FILE}: pass {CHECKPOINT_HELP}")


def _check_inputs(args: argparse.Namespace):
    """Refuses an empty run, inputs that need a model when there is no --checkpoint and bad values, before any
    work (also on every rank of an --ijb run, before the images are embedded). Returns the EvalConfig."""
    from dsoft_dist.config.schema import EvalConfig  # noqa: PLC0415 (keep `dsoft --help` fast)
    from dsoft_dist.eval.idsets import EMBEDDING_SUFFIXES, check_exists  # noqa: PLC0415

    sets = dict(zip(("probes", "gallery"), args.identify or ()), distractors=args.distractors)
    for role, path in sets.items():
        if path:
            check_exists(path, role)
    if not args.bin and not args.pairs and not args.identify and not args.ijb:
        raise ValueError("nothing to evaluate; pass --bin FILE..., --pairs FILE..., --identify PROBES GALLERY "
                         "and/or --ijb ROOT")
    _check_ijb_inputs(args)
    if args.distractors and not args.identify:
        raise ValueError(f"--distractors {args.distractors} needs --identify PROBES GALLERY")
    if args.identify and min(args.rank_k) < 1:
        raise ValueError(f"--rank-k {min(args.rank_k)} is invalid: ranks start at 1, e.g. --rank-k 1 5 10")
    if not args.checkpoint:
        for flag, given in (("--bin", args.bin), ("--ijb", args.ijb)):
            if given:
                raise ValueError(f"{flag} needs --checkpoint: the images must be embedded by a model")
        images = [(role, p) for role, p in sets.items() if p and not p.endswith(EMBEDDING_SUFFIXES)]
        if images:
            raise ValueError(f"{images[0][0]} {images[0][1]!r} holds images: pass --checkpoint so they can be "
                             "embedded, or give .npz embeddings + ids")
    return EvalConfig(bins=args.bin, pairs=args.pairs, flip=args.flip, batch_size=args.batch_size, folds=args.folds,
                      fars=args.fars)  # validates the values (ConfigError is a ValueError)


def _check_ijb_inputs(args: argparse.Namespace) -> None:
    """The IJB-only options need --ijb; --nproc must be >= 1."""
    if args.nproc < 1:
        raise ValueError(f"--nproc {args.nproc} is invalid: pass 1 or more processes")
    if args.ijb:
        return
    for flag, given in (("--nproc", args.nproc > 1), ("--ijb-no-score", not args.ijb_score),
                        ("--ijb-normalize", args.ijb_normalize)):
        if given:
            raise ValueError(f"{flag} applies to --ijb ROOT only: add --ijb ROOT or drop {flag}")


def _load_model(args: argparse.Namespace):
    """The --checkpoint backbone on --device (auto: cuda when available), or None."""
    from dsoft_dist.models import load_backbone  # noqa: PLC0415

    if args.device == "auto":
        import torch  # noqa: PLC0415

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if not args.checkpoint:
        return None
    model, cfg = load_backbone(backbone_file(args.checkpoint), map_location=args.device)
    log.info("loaded %s (%s)", args.checkpoint, cfg)
    return model


def _evaluate(args: argparse.Namespace, layout=None, model=None, ijb_features=None) -> dict:
    """Every evaluation the arguments ask for. layout, model, ijb_features: already loaded / embedded (by the
    ranks of an --ijb run, ``_rank_main``), else loaded here."""
    from dsoft_dist.eval.idsets import evaluate_identification  # noqa: PLC0415
    from dsoft_dist.eval.runner import evaluate_all  # noqa: PLC0415

    cfg = _check_inputs(args)
    if args.ijb and layout is None:  # a bad layout fails before a large model is loaded
        from dsoft_dist.eval.ijb_meta import load_layout  # noqa: PLC0415

        layout = load_layout(args.ijb, args.ijb_target)
    model = model if model is not None else _load_model(args)
    results = {}
    if args.ijb:
        from dsoft_dist.eval.ijb import evaluate_ijb  # noqa: PLC0415

        results["ijb"] = {args.ijb_target: evaluate_ijb(
            model, args.ijb, args.ijb_target, flip=args.flip, use_score=args.ijb_score, normalize=args.ijb_normalize,
            fars=args.fars, batch_size=args.batch_size, device=args.device, progress=args.progress, layout=layout,
            features=ijb_features)}
    results = {**evaluate_all(model, cfg, device=args.device, far=args.far, progress=args.progress,
                              interpolation=args.interpolation), **results}
    if args.identify:
        results["identification"] = [evaluate_identification(
            model, *args.identify, distractors=args.distractors, ks=args.rank_k, backend=args.backend,
            batch_size=args.batch_size, flip=args.flip, device=args.device, progress=args.progress)]
    return {"checkpoint": args.checkpoint, "flip": args.flip, **results}


def _finish(results: dict, args: argparse.Namespace) -> int:
    """Prints the tables and writes the --report files."""
    from dsoft_dist.eval.report import format_tables, write_report  # noqa: PLC0415

    sys.stdout.write(format_tables(results) + "\n")  # the command's result (logs go to stderr)
    if args.report:
        paths = write_report(results, args.report)
        sys.stdout.write("report: " + ", ".join(paths[k] for k in sorted(paths)) + "\n")
    return 0


def run_eval(args: argparse.Namespace) -> int:
    """``dsoft eval``: prints the tables. Bad input raises: ``dsoft``'s main turns it into one line, exit 2.

    With --ijb, under torchrun (RANK/WORLD_SIZE set) this process is one of the ranks that share the images
    (``_rank_main``); with --nproc N > 1 it starts N local ranks (``_spawn_ranks``).
    """
    from dsoft_dist.parallel.processes import under_launcher  # noqa: PLC0415

    if args.ijb and under_launcher():
        return _rank_main(args)
    if args.ijb and args.nproc > 1:
        return _spawn_ranks(args)
    return _finish(_evaluate(args), args)


def _rank_main(args: argparse.Namespace, layout=None) -> int:
    """One rank of an --ijb run (torchrun's or spawned): joins the process group, reads the layout, embeds its
    share and sends it to rank 0; the group is closed, then rank 0 alone scores, runs every other evaluation
    and prints. A bad layout is reported by the lowest rank that found it, once, before every rank exits 2."""
    from dsoft_dist.errors import USER_ERROR_EXIT  # noqa: PLC0415
    from dsoft_dist.eval.ijb import ijb_features  # noqa: PLC0415
    from dsoft_dist.parallel.processes import distributed  # noqa: PLC0415

    with distributed("gloo" if args.device == "cpu" else "auto") as env:
        args.device, args.progress = str(env.device), args.progress and env.is_main
        layout = _layout_on_every_rank(args, layout, env)
        if layout is None:
            return USER_ERROR_EXIT
        model = _load_model(args)
        features = ijb_features(model, layout, flip=args.flip, batch_size=args.batch_size, device=args.device,
                                progress=args.progress)
    if features is not None:  # rank 0, after every rank left the group: nothing below can leave one waiting
        _finish(_evaluate(args, layout, model, features), args)
    return 0


def _layout_on_every_rank(args: argparse.Namespace, layout, env):
    """The checked layout on every rank, or None on every rank when any rank could not read it: the lowest such
    rank writes the one error line, and a barrier holds the others until it is written (a launcher stops all
    ranks as soon as one exits)."""
    import torch  # noqa: PLC0415
    import torch.distributed as dist  # noqa: PLC0415

    from dsoft_dist.errors import report_user_error  # noqa: PLC0415
    from dsoft_dist.eval.ijb_meta import load_layout  # noqa: PLC0415
    from dsoft_dist.parallel import all_reduce  # noqa: PLC0415

    error = None
    try:
        _check_inputs(args)
        layout = layout if layout is not None else load_layout(args.ijb, args.ijb_target)
    except (OSError, ValueError) as err:
        error = err
    flag = torch.tensor([env.rank if error is not None else env.world_size], device=env.device)
    first = int(all_reduce(flag, op=dist.ReduceOp.MIN).item())
    if first == env.world_size:
        return layout
    if env.rank == first:
        report_user_error("dsoft eval", error)
    dist.barrier()
    return None


def _spawned_rank(args_dict: dict, layout) -> int:
    """``_rank_main`` in a local rank ``spawn_ranks`` started (the namespace travels as a plain dict)."""
    return _rank_main(argparse.Namespace(**args_dict), layout)


def _spawn_ranks(args: argparse.Namespace) -> int:
    """--ijb with --nproc N: the inputs and the layout are checked here (a bad one is one line before any process
    starts), then N local ranks share the images (``parallel.processes.spawn_local``, the project's one way)."""
    import torch  # noqa: PLC0415

    from dsoft_dist.eval.ijb_meta import load_layout  # noqa: PLC0415
    from dsoft_dist.parallel.processes import spawn_ranks  # noqa: PLC0415

    _check_inputs(args)
    backbone_file(args.checkpoint)
    gpus = torch.cuda.device_count() if args.device != "cpu" and torch.cuda.is_available() else 0
    if gpus and args.nproc > gpus:
        raise ValueError(f"--nproc {args.nproc} on GPUs needs one GPU per process and {gpus} are visible: pass "
                         f"--nproc {gpus}, or --device cpu for {args.nproc} CPU processes")
    layout = load_layout(args.ijb, args.ijb_target)
    plain = {k: v for k, v in vars(args).items() if k != "func"}
    return spawn_ranks("dsoft eval", _spawned_rank, args.nproc, (plain, layout))


def run_export(args: argparse.Namespace) -> int:
    """``dsoft export``: writes the file, prints the parity result; returns 2 on error or parity failure."""
    from dsoft_dist.eval.export import export_model  # noqa: PLC0415
    from dsoft_dist.models import load_backbone  # noqa: PLC0415

    model, _ = load_backbone(backbone_file(args.checkpoint))  # bad input raises: one line, exit 2
    res = export_model(model, args.out, fmt=args.format, check=args.check, atol=args.atol, opset=args.opset)
    diff = ("not checked" if res["max_abs_diff"] is None
            else f"max|diff| {res['max_abs_diff']:.3g} ({res['checked_with']})")
    sys.stdout.write(f"exported {res['path']} ({res['format']}, dynamic batch): parity {diff}\n")
    return 0
