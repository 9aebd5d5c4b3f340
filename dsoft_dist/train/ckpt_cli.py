"""``dsoft ckpt inspect PATH``, ``dsoft ckpt export PATH OUT`` and ``dsoft ckpt import``: look into a run
checkpoint, take it out, bring arcface_torch (InsightFace) weights in.

    dsoft ckpt inspect runs/demo/checkpoints/step-00000300     # step, writer's world size, sizes, manifest check
    dsoft ckpt inspect runs/demo/checkpoints                    # the folder ``latest`` names
    dsoft ckpt inspect runs/demo                                # a run folder: lists its checkpoints and
                                                                # inspects the newest (``latest``)
    dsoft ckpt export runs/demo/checkpoints/step-00000300 out/  # out/backbone.pt (dsoft eval / dsoft export)
                                                                # + out/head.pt: the merged (C, D) classifier
    dsoft ckpt export --to insightface runs/r50 backbone.pth    # arcface_torch's backbone.pth (a state_dict)
    dsoft ckpt import --from insightface backbone.pth --model r100 r100.pt   # our backbone.pt: dsoft eval,
                                                                # dsoft train --init-from r100.pt
Single process; reads with weights-only loading. Exit codes: 0; 1 when inspect finds a file that does not
match the manifest; 2 when PATH is not a readable checkpoint (one ``dsoft ckpt ...: error:`` line).
"""
from __future__ import annotations

import json
import os
import sys

import torch

from dsoft_dist.observability import get_logger

log = get_logger(__name__)


def resolve(path: str) -> tuple[str, str | None]:
    """(step folder, note): PATH as a step folder, a checkpoint root whose ``latest`` names one, or a run folder
    whose checkpoints/ holds one (the newest: ``latest``, else the highest step); the note, for a run folder,
    names its checkpoints and the newest.

    Raises FileNotFoundError for a missing PATH, ValueError for a run folder without checkpoints.
    """
    from dsoft_dist.train.checkpoint import RUN_CHECKPOINTS, checkpoint_root_of, newest_checkpoint, step_folders

    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist: pass a run folder, its checkpoints/ folder or a step "
                                "folder in it, e.g. runs/demo/checkpoints/step-00000300")
    root = checkpoint_root_of(path)
    if root is None:
        return path, None
    newest = newest_checkpoint(root)
    if root != os.path.join(path, RUN_CHECKPOINTS):
        return newest or path, None
    if newest is None:
        raise ValueError(f"{path} is a run folder with no checkpoint in {root} (none was saved yet): pass a "
                         "run folder that holds one, or a step folder")
    note = f"run folder {path}: checkpoints {', '.join(step_folders(root))} in {root}; newest " \
           f"{os.path.basename(newest)}, used"
    return newest, note


def _summary(folder: str, manifest_path: str) -> list[str]:
    """The step, writer's world size, version and sizes a checkpoint's manifest records, as text lines."""
    with open(manifest_path, encoding="utf-8") as fh:
        manifest = json.load(fh)
    files = manifest["files"]
    head = [n for n in files if n.startswith("head/head-")]
    return [f"checkpoint {folder}", f"  step {manifest['step']}, written by {manifest['world_size']} ranks, "
            f"dsoft_dist {manifest['version']}",
            f"  {len(files)} files, {sum(f['size'] for f in files.values()) / 2 ** 20:.1f} MiB "
            f"(head: {len(head)} pieces, {sum(files[n]['size'] for n in head) / 2 ** 20:.1f} MiB)"]


def _inspect(args) -> int:
    from dsoft_dist.train.ckpt_files import MANIFEST, check_manifest

    folder, note = resolve(args.path)
    if note:
        sys.stdout.write(note + "\n")
    manifest_path = os.path.join(folder, MANIFEST)
    if not os.path.isfile(manifest_path):
        raise ValueError(f"{folder} is not a finished checkpoint ({MANIFEST} is missing): pass a run folder, its "
                         "checkpoints/ folder or a step folder in it")
    try:
        lines = _summary(folder, manifest_path)
    except (ValueError, KeyError, TypeError, AttributeError) as err:  # not JSON, or not the manifest's fields
        raise ValueError(f"{manifest_path} is not a dsoft checkpoint manifest ({type(err).__name__}: {err}); the "
                         "checkpoint is damaged: use another step folder") from err
    problem = check_manifest(folder)
    lines.append("  manifest: every size and sha256 matches" if problem is None else f"  manifest: FAILS: {problem}")
    sys.stdout.write("\n".join(lines) + "\n")
    return 0 if problem is None else 1


def checkpoint_backbone(path: str):
    """(step folder, model with its weights, model config dict, trainer state) of the checkpoint PATH names
    (a step folder, a checkpoint root or a run folder: ``resolve``); refuses one whose manifest fails."""
    from dsoft_dist.models import build_model
    from dsoft_dist.train.ckpt_files import check_manifest
    from dsoft_dist.utils import load_weights_only

    folder, note = resolve(path)
    if note:
        log.info("%s", note)
    problem = check_manifest(folder)
    if problem is not None:
        raise ValueError(f"{folder} cannot be exported: {problem}")
    state = load_weights_only(os.path.join(folder, "trainer.pt"))
    m = state["config"]["model"]
    model = build_model(**m)  # the saved ModelConfig's fields are build_model's arguments
    model.load_state_dict(load_weights_only(os.path.join(folder, "backbone.pt")))
    return folder, model, m, state


def _export(args) -> int:
    if args.to == "insightface":
        return _export_insightface(args)
    from dsoft_dist.head import assemble_rows
    from dsoft_dist.models import save_backbone
    from dsoft_dist.utils import load_weights_only

    folder, model, m, state = checkpoint_backbone(args.path)
    os.makedirs(args.out, exist_ok=True)
    save_backbone(os.path.join(args.out, "backbone.pt"), model, m, extra={"step": state["step"]})
    with open(os.path.join(folder, "head", "meta.json"), encoding="utf-8") as fh:
        meta = json.load(fh)
    pieces = [load_weights_only(os.path.join(folder, "head", name))["head"] for name in meta["files"]]
    pieces.sort(key=lambda p: p["class_start"])
    weight = assemble_rows(pieces, "weight", 0, meta["num_classes"])  # (C, D)
    torch.save({"weight": weight, "num_classes": meta["num_classes"], "embedding_size": meta["embedding_size"],
                "loss": pieces[0]["loss"], "step": state["step"]}, os.path.join(args.out, "head.pt"))
    sys.stdout.write(f"exported step {state['step']} to {args.out}/: backbone.pt ({m['name']}), head.pt "
                     f"({meta['num_classes']} x {meta['embedding_size']})\n")
    return 0


def _out_file(out: str, name: str) -> str:
    """OUT itself, or OUT/name when OUT is a folder (one that exists, or a path ending in a separator)."""
    return os.path.join(out, name) if os.path.isdir(out) or out.endswith(os.sep) else out


def _export_insightface(args) -> int:
    """``dsoft ckpt export --to insightface PATH OUT``: arcface_torch's backbone.pth (their names, a plain
    state_dict) from a backbone.pt or a run checkpoint."""
    from dsoft_dist.models import load_backbone
    from dsoft_dist.models.insightface import export_state_dict, resolve_name
    from dsoft_dist.utils import atomic_save

    if os.path.isfile(args.path):
        model, cfg = load_backbone(args.path)
    else:
        _, model, cfg, _ = checkpoint_backbone(args.path)
    theirs = export_state_dict(cfg, model.state_dict())
    out = _out_file(args.out, "backbone.pth")
    atomic_save(theirs, out)
    sys.stdout.write(f"exported {cfg['name']} from {args.path} to {out}: arcface_torch's "
                     f"{resolve_name(cfg['name'])[0]}, {cfg['embedding_size']}-d embedding, {len(theirs)} entries\n")
    return 0


def _import(args) -> int:
    """``dsoft ckpt import --from insightface SRC --model NAME OUT``: arcface_torch's backbone.pth as our
    backbone.pt (``save_backbone``; extra records the source, its model and sha256)."""
    from dsoft_dist.models import build_model, save_backbone
    from dsoft_dist.models.insightface import import_state_dict, read_arcface_file, resolve_name
    from dsoft_dist.utils import sha256_file

    their, _ = resolve_name(args.model)  # an unknown name is refused before the file is read
    cfg, state = import_state_dict(read_arcface_file(args.src), their, source=args.src)
    model = build_model(**cfg)
    model.load_state_dict(state)
    out = _out_file(args.out, "backbone.pt")
    save_backbone(out, model, cfg, extra={"imported_from": args.source, "source_model": their,
                                          "source_sha256": sha256_file(args.src)})
    params = sum(p.numel() for p in model.parameters())
    sys.stdout.write(f"imported {args.src} (arcface_torch {their}) to {out}: {cfg['name']}, "
                     f"{cfg['embedding_size']}-d embedding, {params / 1e6:.2f}M parameters\n")
    return 0


def register(subparsers) -> None:
    """Adds ``dsoft ckpt inspect | export | import``."""
    p = subparsers.add_parser("ckpt", help="inspect or export a run checkpoint; arcface_torch weights in and out",
                              description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="ckpt_command", metavar="ACTION", required=True)
    i = sub.add_parser("inspect", help="step, world size, sizes; verifies the manifest (exit 1 if it fails)")
    i.add_argument("path", help="a step folder, a checkpoint root (its `latest`), or a run folder (lists its "
                   "checkpoints, inspects the newest)")
    i.set_defaults(func=_inspect)
    e = sub.add_parser("export", help="the backbone for dsoft eval/export and the merged (C, D) head; or, with "
                       "--to insightface, arcface_torch's backbone.pth")
    e.add_argument("path", help="a step folder, a checkpoint root (its `latest`), or a run folder (its newest); "
                   "with --to insightface also a backbone.pt")
    e.add_argument("out", help="output folder; with --to insightface the file to write (arcface_torch's "
                   "convention: backbone.pth), or a folder (existing, or ending in /) that gets backbone.pth")
    e.add_argument("--to", choices=["insightface"], default=None,
                   help="write another trainer's format instead: insightface = arcface_torch's backbone.pth, the "
                   "plain state_dict its model.load_state_dict(torch.load(...)) reads (models r18..r200, mbf, "
                   "mbf_large, vit_t..vit_l at 112 px)")
    e.set_defaults(func=_export)
    m = sub.add_parser("import", help="arcface_torch's backbone.pth as our backbone.pt (dsoft eval, dsoft train "
                       "--init-from)")
    m.add_argument("--from", dest="source", required=True, choices=["insightface"],
                   help="the trainer that wrote SRC: insightface = arcface_torch (its backbone.pth, a state_dict, "
                   "or its checkpoint_gpu_N.pt)")
    m.add_argument("src", metavar="SRC", help="the file to import (loaded weights-only: a file that needs code to "
                   "unpickle is refused)")
    m.add_argument("--model", required=True, help="the backbone SRC holds, arcface_torch's name or ours: "
                   "r18 r34 r50 r100 r200 mbf mbf_large vit_t vit_s vit_b vit_l (iresnet18 ... iresnet200)")
    m.add_argument("out", metavar="OUT", help="the backbone.pt to write (a folder, existing or ending in /, gets "
                   "backbone.pt)")
    m.set_defaults(func=_import)
