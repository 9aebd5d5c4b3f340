"""World-size-independent state of the sharded head and its optimizer: save on P ranks, load on Q.

A rank's state is a "piece": its rows keyed by global class range plus the shape of the
whole head. Any set of pieces that covers [class_start, class_start + C_local) of a rank
loads into it, whatever the world size that wrote them.

    piece = head.state_dict()                     # {'num_classes', 'embedding_size', 'class_start',
                                                  #  'num_local_classes', 'step' (head.draws: the saved key),
                                                  #  'rows': {'weight': (n, D)}}
    head.load_state_dict([piece_0, piece_1])      # pieces from any number of ranks
    save_head_checkpoint("ckpt/head", head, opt)  # every rank writes its piece file; rank 0 meta.json
    load_head_checkpoint("ckpt/head", head, opt)  # every rank reads only the files overlapping its shard
    HeadState(head, opt)                          # the same folder as a part of a run checkpoint

Files are written atomically (temp file + os.replace) so a crash never leaves a torn piece.
"""
from __future__ import annotations

import json
import os

import torch
import torch.distributed as dist

from dsoft_dist.parallel import group_rank_size, shard_ranges
from dsoft_dist.utils import atomic_save, cpu_copy

HEAD_FORMAT = "dsoft_dist.sharded_head/1"
OPTIMIZER_FORMAT = "dsoft_dist.head_optimizer/1"
_META = "meta.json"


def head_piece(head) -> dict:
    """This rank's head piece (tensors alias the live weight; torch.save copies them)."""
    # the key "step" holds head.draws: every saved head piece and meta.json has it, so it stays
    piece = {"format": HEAD_FORMAT, "num_classes": head.num_classes, "embedding_size": head.embedding_size,
             "class_start": head.class_start, "num_local_classes": head.num_local_classes, "step": head.draws,
             "loss": head.loss, "rows": {"weight": head.weight.detach()}}
    if head.nearest is not None:  # negatives="nearest": the table's rows are keyed by class like the weight's
        piece["rows"].update(head.nearest.rows())
        piece.update(head.nearest.state())
    return piece


def optimizer_piece(opt) -> dict:
    """This rank's optimizer piece: per-row state tensors and the hyperparameters."""
    p = _single_param(opt)
    return {"format": OPTIMIZER_FORMAT, "kind": opt.kind, "mode": opt.mode, "num_classes": opt.num_classes,
            "embedding_size": p.shape[1], "class_start": opt.class_start, "num_local_classes": p.shape[0],
            "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups],
            "rows": {name: t.detach() for name, t in opt.state[p].items()}}


def _single_param(opt):
    params = [p for g in opt.param_groups for p in g["params"]]
    if len(params) != 1:
        raise ValueError(f"re-shardable optimizer state needs exactly one (rows, D) weight, got {len(params)}")
    return params[0]


def _pieces(state, fmt: str, num_classes: int, embedding_size: int) -> list[dict]:
    """Normalizes one piece or a list of pieces and checks they belong to a head of this shape."""
    pieces = [state] if isinstance(state, dict) else list(state)
    if not pieces:
        raise ValueError("no state pieces given; pass head.state_dict() pieces from the ranks that saved them")
    for piece in pieces:
        if not isinstance(piece, dict) or piece.get("format") != fmt:
            found = piece.get("format") if isinstance(piece, dict) else type(piece).__name__
            raise ValueError(f"state piece has format {found!r}, expected {fmt!r}; "
                             f"load a checkpoint written by ShardedClassifier / its head optimizer")
        if piece["num_classes"] != num_classes:
            raise ValueError(f"checkpoint has num_classes={piece['num_classes']} but the head has "
                             f"num_classes={num_classes}; build the head with the checkpoint's class count")
        if piece["embedding_size"] != embedding_size:
            raise ValueError(f"checkpoint has embedding_size={piece['embedding_size']} but the head has "
                             f"embedding_size={embedding_size}; build the head with the checkpoint's size")
    return sorted(pieces, key=lambda p: p["class_start"])


def assemble_rows(pieces: list[dict], name: str, start: int, count: int) -> torch.Tensor:
    """Rows [start, start + count) of state ``name`` cut from pieces sorted by class_start (CPU tensor)."""
    parts, cursor = [], start
    for piece in pieces:
        p0 = piece["class_start"]
        lo, hi = max(cursor, p0), min(start + count, p0 + piece["num_local_classes"])
        if hi <= lo:
            continue
        if lo != cursor:
            break
        if name not in piece["rows"]:
            raise ValueError(f"state piece for classes [{p0}, {p0 + piece['num_local_classes']}) has no {name!r}")
        parts.append(piece["rows"][name][lo - p0:hi - p0].to("cpu"))
        cursor = hi
    if cursor != start + count:
        raise ValueError(f"the state pieces do not cover classes [{cursor}, {start + count}) needed by this "
                         f"shard [{start}, {start + count}); pass the pieces of every rank that saved the head")
    return torch.cat(parts) if len(parts) > 1 else parts[0].clone()


def load_head_pieces(head, state) -> None:
    """Copies this rank's rows and the draws counter from pieces written by any world size."""
    pieces = _pieces(state, HEAD_FORMAT, head.num_classes, head.embedding_size)
    weight = assemble_rows(pieces, "weight", head.class_start, head.num_local_classes)
    draws = {p["step"] for p in pieces}  # the pieces' key "step" is head.draws (see head_piece)
    if len(draws) != 1:
        raise ValueError(f"state pieces disagree on the draws counter ({sorted(draws)}); they come from different "
                         "saves")
    with torch.no_grad():
        head.weight.copy_(weight)
    head.draws = draws.pop()
    if head.nearest is not None:
        _load_nearest(head, pieces)


def _load_nearest(head, pieces: list[dict]) -> None:
    """The nearest-class table's rows of this shard, when every saved piece has them (else it is built anew)."""
    if not all("nearest_ids" in p["rows"] for p in pieces):
        head.nearest.clear()
        return
    rows = [assemble_rows(pieces, name, head.class_start, head.num_local_classes)
            for name in ("nearest_ids", "nearest_cos")]
    head.nearest.load(*rows, pieces[0], head.num_classes, head.weight.device)


def load_optimizer_pieces(opt, state) -> None:
    """Copies this rank's per-row optimizer state and the hyperparameters from any world size's pieces."""
    p = _single_param(opt)
    pieces = _pieces(state, OPTIMIZER_FORMAT, opt.num_classes, p.shape[1])
    kinds = {piece["kind"] for piece in pieces}
    if kinds != {opt.kind}:
        raise ValueError(f"checkpoint optimizer is {sorted(kinds)} but this one is {opt.kind!r}; "
                         "use the same optimizer.name")
    for group, saved in zip(opt.param_groups, pieces[0]["param_groups"]):
        group.update(saved)
    state = opt.state[p]
    with torch.no_grad():
        for name in pieces[0]["rows"]:  # e.g. a momentum buffer the saved run had and this one has not built
            rows = assemble_rows(pieces, name, opt.class_start, p.shape[0])
            if name not in state:
                state[name] = torch.zeros_like(rows, device=p.device)
            state[name].copy_(rows)


def _piece_file(start: int, count: int) -> str:
    return f"head-{start:012d}-{start + count:012d}.pt"


def _barrier(group) -> None:
    if group_rank_size(group)[1] > 1:
        dist.barrier(group=group)


def head_snapshot(head, optimizer=None, copy: bool = False) -> dict:
    """What this rank writes for a head checkpoint: {"file", "payload", "meta" (rank 0's, else None)}.

    copy=True copies every tensor to the CPU, so the snapshot can be written while training goes on.
    """
    payload = {"head": head.state_dict(), "optimizer": optimizer.state_dict() if optimizer is not None else None}
    meta = None
    if head.rank == 0:
        files = [_piece_file(s, n) for s, n in shard_ranges(head.num_classes, head.world_size)]
        meta = {"format": HEAD_FORMAT, "num_classes": head.num_classes, "embedding_size": head.embedding_size,
                "world_size": head.world_size, "step": head.draws, "files": files}  # "step": draws, as in head_piece
    return {"file": _piece_file(head.class_start, head.num_local_classes),
            "payload": cpu_copy(payload) if copy else payload, "meta": meta}


def write_head_piece(directory: str, snapshot: dict) -> None:
    """This rank's piece file of a ``head_snapshot`` (atomically)."""
    os.makedirs(directory, exist_ok=True)
    atomic_save(snapshot["payload"], os.path.join(directory, snapshot["file"]))


def write_head_meta(directory: str, snapshot: dict) -> None:
    """meta.json of a rank-0 ``head_snapshot`` (atomically); a no-op on other ranks."""
    if snapshot["meta"] is None:
        return
    tmp = os.path.join(directory, f"{_META}.tmp.{os.getpid()}")
    with open(tmp, "w") as fh:
        json.dump(snapshot["meta"], fh, indent=1)
    os.replace(tmp, os.path.join(directory, _META))


def save_head_checkpoint(directory: str, head, optimizer=None) -> str:
    """Every rank writes its piece file; rank 0 then writes meta.json listing them. Collective."""
    snapshot = head_snapshot(head, optimizer)
    write_head_piece(directory, snapshot)
    _barrier(head.group)
    write_head_meta(directory, snapshot)
    _barrier(head.group)
    return directory


def load_head_checkpoint(directory: str, head, optimizer=None) -> dict:
    """Loads head (and optimizer) rows for this rank from a checkpoint of any world size; returns meta."""
    meta_path = os.path.join(directory, _META)
    if not os.path.exists(meta_path):
        raise FileNotFoundError(f"{meta_path} not found: not a head checkpoint (write one with save_head_checkpoint)")
    with open(meta_path) as fh:
        meta = json.load(fh)
    for key in ("num_classes", "embedding_size"):
        if meta[key] != getattr(head, key):
            raise ValueError(f"checkpoint {directory} has {key}={meta[key]} but the head has "
                             f"{key}={getattr(head, key)}; build the head with the checkpoint's {key}")
    lo, hi = head.class_start, head.class_start + head.num_local_classes
    heads, opts = [], []
    for name in meta["files"]:
        start, stop = (int(x) for x in name[len("head-"):-len(".pt")].split("-"))
        if start < hi and stop > lo:
            payload = torch.load(os.path.join(directory, name), map_location="cpu", weights_only=True, mmap=True)
            heads.append(payload["head"])
            opts.append(payload["optimizer"])
    head.load_state_dict(heads)
    if optimizer is not None:
        if any(o is None for o in opts):
            raise ValueError(f"checkpoint {directory} holds no optimizer state; load the head alone")
        optimizer.load_state_dict(opts)
    return meta


class HeadState:
    """The head and its optimizer as one part of a run checkpoint (``dsoft_dist.train.state``'s SnapshotPart):
    its folder holds every rank's piece file, named by class range, and rank 0's meta.json, and loads on
    any world size. A snapshot taken with copy=True is CPU copies, written later in the background."""

    def __init__(self, head, optimizer=None):
        self.head, self.optimizer = head, optimizer

    def snapshot(self, copy: bool) -> dict:
        """This rank's ``head_snapshot``."""
        return head_snapshot(self.head, self.optimizer, copy=copy)

    def write(self, path: str, snapshot: dict) -> None:
        """This rank's piece file under the folder ``path``, and rank 0's meta.json (no collective)."""
        write_head_piece(path, snapshot)
        write_head_meta(path, snapshot)

    def load(self, path: str, saved_world_size: int) -> None:
        """The rows of this rank's shard from the pieces of any world size (``load_head_checkpoint``)."""
        load_head_checkpoint(path, self.head, self.optimizer)

    def init_from(self, kind: str, path: str) -> str:
        """checkpoint.init_from: the head's rows of a checkpoint folder ``path`` when its class count is the
        head's (the optimizer and the draws counter start fresh); a new head otherwise. Returns what it took."""
        if kind != "checkpoint":
            return "the head is new"
        with open(os.path.join(path, _META), encoding="utf-8") as fh:
            saved_classes = json.load(fh)["num_classes"]
        if saved_classes != self.head.num_classes:
            return f"the head is new: the checkpoint has {saved_classes} classes, this run {self.head.num_classes}"
        load_head_checkpoint(path, self.head)
        self.head.draws = 0
        if self.head.nearest is not None:  # built at the saved run's draws: this run builds its own
            self.head.nearest.clear()

        return "head weights"
