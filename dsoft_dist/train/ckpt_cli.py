"""``dsoft ckpt inspect PATH`` and ``dsoft ckpt export PATH OUT``: look into a run checkpoint, take it out.

    dsoft ckpt inspect runs/demo/checkpoints/step-00000300     # step, writer's world size, sizes, manifest check
    dsoft ckpt inspect runs/demo/checkpoints                    # the folder ``latest`` names
    dsoft ckpt export runs/demo/checkpoints/step-00000300 out/  # out/backbone.pt (dsoft eval / dsoft export)
                                                                # + out/head.pt: the merged (C, D) classifier
Single process; reads with weights-only loading.
"""
from __future__ import annotations

import json
import os
import sys

import torch

from dsoft_dist.observability import get_logger

log = get_logger(__name__)


def resolve(path: str) -> str:
    """A step folder, or a checkpoint root whose ``latest`` names one."""
    from dsoft_dist.train.checkpoint import read_pointer

    latest = read_pointer(path)
    return os.path.join(path, latest) if latest else path


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
    from dsoft_dist.train.checkpoint import MANIFEST, verify

    folder = resolve(args.path)
    manifest_path = os.path.join(folder, MANIFEST)
    if not os.path.isfile(manifest_path):
        sys.stderr.write(f"dsoft ckpt: {folder} is not a finished checkpoint ({MANIFEST} is missing)\n")
        return 1
    try:
        lines = _summary(folder, manifest_path)
    except (ValueError, KeyError, TypeError, AttributeError) as err:  # not JSON, or not the manifest's fields
        sys.stderr.write(f"dsoft ckpt: {manifest_path} is not a dsoft checkpoint manifest "
                         f"({type(err).__name__}: {err}); the checkpoint is damaged: use another step folder\n")
        return 1
    problem = verify(folder)
    lines.append("  manifest: every size and sha256 matches" if problem is None else f"  manifest: FAILS: {problem}")
    sys.stdout.write("\n".join(lines) + "\n")
    return 0 if problem is None else 1


def _export(args) -> int:
    from dsoft_dist.head import assemble_rows
    from dsoft_dist.models import build_model, save_backbone
    from dsoft_dist.train.checkpoint import load_weights_only, verify

    folder = resolve(args.path)
    problem = verify(folder)
    if problem is not None:
        sys.stderr.write(f"dsoft ckpt: {folder} cannot be exported: {problem}\n")
        return 1
    state = load_weights_only(os.path.join(folder, "trainer.pt"))
    m = state["config"]["model"]
    model = build_model(**m)  # the saved ModelConfig's fields are build_model's arguments
    model.load_state_dict(load_weights_only(os.path.join(folder, "backbone.pt")))
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


def register(subparsers) -> None:
    """Adds ``dsoft ckpt inspect | export``."""
    p = subparsers.add_parser("ckpt", help="inspect or export a run checkpoint",
                              description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="ckpt_command", metavar="ACTION", required=True)
    i = sub.add_parser("inspect", help="step, world size, sizes; verifies the manifest (exit 1 if it fails)")
    i.add_argument("path", help="a step folder, or a checkpoint root (its `latest`)")
    i.set_defaults(func=_inspect)
    e = sub.add_parser("export", help="the backbone for dsoft eval/export and the merged (C, D) head")
    e.add_argument("path", help="a step folder, or a checkpoint root (its `latest`)")
    e.add_argument("out", help="output folder")
    e.set_defaults(func=_export)
