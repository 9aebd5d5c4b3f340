"""A checkpoint folder's files and the manifest that proves them whole.

    files = hash_files(tmp, group)                 # collective: {name: {size, sha256}}, the ranks hash in parallel
    write_manifest(tmp, step, world_size, files)   # rank 0, last, before the rename
    problem = check_manifest(folder)               # collective: None, or why the folder cannot be used
    manifest = read_manifest(folder)               # {"format", "step", "world_size", "version", "files"}

``manifest.json`` lists every file of the folder with its size and sha256; a folder without one
was never finished, and a file that does not match it is corrupt or truncated.
"""
from __future__ import annotations

import json
import os

import torch.distributed as dist

from dsoft_dist.parallel import group_rank_size
from dsoft_dist.parallel.comm import gather_objects
from dsoft_dist.utils import __version__, sha256_file, write_text_atomic

FORMAT = "dsoft_dist.run_checkpoint/2"  # /2: a file per part (data.pt, checkpointer.pt beside trainer.pt)
# /1 (dsoft_dist before the states map) held the data position and the best record inside trainer.pt
FORMAT_1 = "dsoft_dist.run_checkpoint/1"
MANIFEST = "manifest.json"


def storage_error(err: BaseException) -> bool:
    """True for an error of the storage rather than of the code: an OSError (no space, an I/O error, a lost
    mount, no permission), or torch.save's own report of a write that failed (a RuntimeError from its zip
    writer); any other exception is a bug and is raised."""
    return isinstance(err, OSError) or (isinstance(err, RuntimeError) and "PytorchStreamWriter failed" in str(err))


def multi_rank() -> bool:
    """True when torch.distributed runs more than one rank."""
    return group_rank_size()[1] > 1


def barrier(group=None) -> None:
    """dist.barrier on ``group`` when there is more than one rank."""
    if multi_rank():
        dist.barrier(group=group)


def _files(folder: str) -> list[str]:
    out = []
    for root, _, names in os.walk(folder):
        for name in names:
            if name != MANIFEST and ".tmp." not in name:
                out.append(os.path.relpath(os.path.join(root, name), folder))
    return sorted(out)


def hash_files(folder: str, group=None) -> dict:
    """Collective on ``group``: {name: {size, sha256}} for every file under ``folder``; each rank hashes
    its share of the names, one all_gather_object joins them."""
    names = _files(folder)
    rank, world = (dist.get_rank(group), dist.get_world_size(group)) if multi_rank() else (0, 1)
    part = {n: {"size": os.path.getsize(os.path.join(folder, n)), "sha256": sha256_file(os.path.join(folder, n))}
            for n in names[rank::world]}
    return {k: v for p in gather_objects(part, group) for k, v in p.items()}


def write_manifest(folder: str, step: int, world_size: int, files: dict) -> None:
    """manifest.json (atomically): the format, step, writer's world size, package version and ``files``."""
    manifest = {"format": FORMAT, "step": step, "world_size": world_size, "version": __version__, "files": files}
    write_text_atomic(os.path.join(folder, MANIFEST), json.dumps(manifest, indent=1))


def read_manifest(folder: str) -> dict:
    """The manifest of a checkpoint folder (check_manifest says whether it can be read)."""
    with open(os.path.join(folder, MANIFEST), encoding="utf-8") as fh:
        return json.load(fh)


def _own_problem(folder: str) -> str | None:
    """This rank's share of the check (every rank reads the manifest, checks every world-th file)."""
    manifest_path = os.path.join(folder, MANIFEST)
    if not os.path.isdir(folder):
        return f"{folder} does not exist"
    if not os.path.isfile(manifest_path):
        return f"{manifest_path} is missing (the checkpoint was not finished)"
    try:
        files = read_manifest(folder)["files"]
    except (OSError, ValueError, KeyError) as err:
        return f"{manifest_path} is unreadable ({err})"
    rank, world = (dist.get_rank(), dist.get_world_size()) if multi_rank() else (0, 1)
    for name in sorted(files)[rank::world]:
        path, want = os.path.join(folder, name), files[name]
        if not os.path.isfile(path):
            return f"{path} is missing"
        if os.path.getsize(path) != want["size"]:
            return f"{path} has {os.path.getsize(path)} bytes, the manifest says {want['size']}"
        if sha256_file(path) != want["sha256"]:
            return f"{path} does not match its sha256 in the manifest (corrupt or truncated)"
    return None


def check_manifest(folder: str) -> str | None:
    """Collective: None when every file of the manifest is there with its size and sha256, else why not."""
    return next((p for p in gather_objects(_own_problem(folder)) if p), None)
