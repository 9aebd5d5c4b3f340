"""The planner's inputs and its closed-form estimates: class shard, rows per step, state, bytes, FLOPs.

    inp = PlanInputs(classes=10**7, gpus=64, dim=512, batch_per_gpu=128, dtype="bf16", sample_rate=1 / 64)
    shard_rows(inp), rows_per_step(inp)      # C_local of the largest shard, K rows computed per rank
    state_bytes(inp)                         # {'weights', 'optimizer'} per rank
    collectives(inp), link_bytes(inp)        # what the head's CommCounter counts, and what a ring puts on a link
    head_flops(inp)                          # {'model': 6 B K D, 'executed': 8 B K D} per rank and step
    nearest_pairs(inp), nearest_build(inp)   # negatives="nearest": the pairs per rank, what a table build costs

Every function is a pure function of ``PlanInputs`` and follows the head as implemented
(``dsoft_dist/head/``, DESIGN.md §2); docs/scale.md states the model and how it was checked
against ``dsoft bench head``. The transient workspace and the backbone are in
``dsoft_dist.plan.memory``, the time model in ``dsoft_dist.plan.timing``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from dsoft_dist.head.nearest import TILE_COLS, TILE_ROWS, auto_refresh
from dsoft_dist.losses.negatives import NEAREST_DEFAULTS, num_sampled
from dsoft_dist.parallel import shard_range

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
OPTIMIZERS = ("sgd", "adamw")
NEGATIVES = ("all", "random", "partial", "batch", "nearest")
DEVICES = ("cuda", "cpu")
HEAD_MODES = ("sparse", "dense")


def _bad(field: str, option: str, value, fix: str) -> ValueError:
    return ValueError(f"{option} {value!r} is invalid ({field}): {fix}")


@dataclass(frozen=True)
class PlanInputs:
    """One cluster configuration of the sharded head (sizes per rank unless stated).

    classes C, gpus P (ranks of the head's process group), nodes K (ranks placed node-contiguously,
    P / K per node), dim D, batch_per_gpu B_local (global batch B = P B_local), dtype (of the
    embeddings and their gradient: what crosses the network), weight_dtype (the class rows and their
    optimizer state), optimizer sgd (momentum > 0 keeps one buffer) | adamw, negatives all | random |
    partial | batch | nearest with sample_rate r (nearest: D-Softmax-KN, the random set plus each row's
    nearest_per_class nearest classes of its own class), inter_correction, step_in_backward (the head's
    ``step_in_backward``: no weight gradient), head_mode sparse | dense, device cuda | cpu (sets the
    automatic chunk size), backend torch | cpu-c (the head's backend; cpu-c: compiled CPU passes, CPU only; it
    changes the predicted time, not the memory), chunk_size (0 = automatic),
    backbone (a ``dsoft_dist.models`` name or None), gpu_memory_gib (what one device holds).
    """

    classes: int
    gpus: int
    dim: int = 512
    batch_per_gpu: int = 128
    nodes: int = 1
    dtype: str = "bf16"
    weight_dtype: str = "fp32"
    optimizer: str = "sgd"
    momentum: float = 0.9
    negatives: str = "random"
    sample_rate: float = 1 / 64
    inter_correction: bool = False
    step_in_backward: bool = False
    head_mode: str = "sparse"
    device: str = "cuda"
    backend: str = "torch"
    chunk_size: int = 0
    backbone: str | None = None
    gpu_memory_gib: float = 80.0
    nearest_per_class: int = NEAREST_DEFAULTS["nearest_per_class"]

    def __post_init__(self):
        for field, option, value in (("classes", "--classes", self.classes), ("gpus", "--gpus", self.gpus),
                                     ("dim", "--dim", self.dim), ("batch_per_gpu", "--batch-per-gpu",
                                                                  self.batch_per_gpu), ("nodes", "--nodes", self.nodes)):
            if not isinstance(value, int) or value < 1:
                raise _bad(field, option, value, "give a whole number >= 1")
        if self.gpus > self.classes:
            raise ValueError(f"--gpus {self.gpus} is invalid with --classes {self.classes}: every rank must own at "
                             f"least one class row; use at most {self.classes} GPUs or more classes")
        if self.gpus % self.nodes:
            raise ValueError(f"--nodes {self.nodes} is invalid with --gpus {self.gpus}: ranks are placed "
                             f"node-contiguously with the same number per node; give a --nodes that divides "
                             f"{self.gpus} (or --gpus-per-node)")
        for field, option, value, choices in (("dtype", "--dtype", self.dtype, DTYPE_BYTES),
                                              ("weight_dtype", "--weight-dtype", self.weight_dtype, DTYPE_BYTES),
                                              ("optimizer", "--optimizer", self.optimizer, OPTIMIZERS),
                                              ("negatives", "--negatives", self.negatives, NEGATIVES),
                                              ("head_mode", "--head-mode", self.head_mode, HEAD_MODES),
                                              ("device", "--device", self.device, DEVICES)):
            if value not in choices:
                raise _bad(field, option, value, f"use one of {', '.join(choices)}")
        if not 0.0 < self.sample_rate <= 1.0:
            raise _bad("sample_rate", "--sample-rate", self.sample_rate, "give a rate in (0, 1], e.g. 1/64")
        if not 0.0 <= self.momentum < 1.0:
            raise _bad("momentum", "--momentum", self.momentum, "give a momentum in [0, 1) (0: no buffer)")
        if self.chunk_size < 0:
            raise _bad("chunk_size", "--chunk-size", self.chunk_size, "give 0 (automatic) or a positive number")
        if not self.gpu_memory_gib > 0:
            raise _bad("gpu_memory_gib", "--gpu-memory", self.gpu_memory_gib, "give the device memory in GiB, e.g. 80")
        if self.backend not in ("torch", "cpu-c"):
            raise _bad("backend", "--backend", self.backend, "plan torch (the chunked path) or cpu-c; the triton "
                       "backend's memory is not modelled")
        if self.backend == "cpu-c" and self.device != "cpu":
            raise ValueError("--backend cpu-c needs --device cpu (the head's cpu-c backend runs on CPU only)")
        if self.step_in_backward and self.head_mode != "sparse":
            raise ValueError("--step-in-backward needs --head-mode sparse (the head's step in backward steps only "
                             "the rows a backward touched)")
        self._check_nearest()

    def _check_nearest(self):
        """nearest_per_class: >= 1, and away from its default only with negatives=nearest (as the head has it)."""
        default = NEAREST_DEFAULTS["nearest_per_class"]
        if not isinstance(self.nearest_per_class, int) or self.nearest_per_class < 1:
            raise _bad("nearest_per_class", "--nearest-per-class", self.nearest_per_class,
                       f"give a whole number >= 1 ({default} is usual)")
        if self.negatives != "nearest":
            if self.nearest_per_class != default:
                raise ValueError(f"--nearest-per-class {self.nearest_per_class} is read only with --negatives "
                                 f"nearest, not {self.negatives!r}: leave it at {default} or plan --negatives nearest")
            return
        if self.classes < 2:
            raise ValueError(f"--negatives nearest is invalid with --classes {self.classes}: a class's nearest "
                             "classes are other classes; plan at least 2 classes")
        if self.inter_correction:
            raise ValueError("--inter-correction is invalid with --negatives nearest (the head refuses it: its inter "
                             "sum already weights the random set to stand for the other classes); leave it out")

    @property
    def global_batch(self) -> int:
        """B = P B_local: the rows every rank computes its shard's logits for."""
        return self.gpus * self.batch_per_gpu

    @property
    def gpus_per_node(self) -> int:
        """P / K ranks on each node (node-contiguous placement)."""
        return self.gpus // self.nodes

    @property
    def step_in_chunks(self) -> bool:
        """True when the optimizer steps each chunk's rows inside backward (no weight gradient is formed):
        step_in_backward, except with nearest, whose step runs from the weight's post-accumulate-grad hook
        on the formed gradient (its pairs' gradient arrives apart from the chunks')."""
        return self.step_in_backward and self.negatives != "nearest"

    @property
    def sampled(self) -> bool:
        """True when the head selects rows (a sparse weight gradient); negatives=all computes every row."""
        return self.negatives != "all"


def shard_rows(inp: PlanInputs) -> int:
    """C_local of the largest class shard: ceil(C / P) (rank 0's, per ``dsoft_dist.parallel.shard_range``)."""
    return shard_range(inp.classes, inp.gpus, 0)[1]


def rows_per_step(inp: PlanInputs) -> int:
    """K, the shard rows one rank computes per step (an upper bound where it depends on the labels).

    all: C_local; random and nearest (its random set): ceil(r C_local) (``num_sampled``); partial:
    max(ceil(r C_local), positives) <= max(ceil(r C_local), min(B, C_local)); batch: positives <=
    min(B, C_local). The bounds take every label of the global batch B to be distinct and owned by this
    shard. nearest's pairs come on top of the K rows: ``nearest_pairs``.
    """
    c_local, batch = shard_rows(inp), inp.global_batch
    if inp.negatives == "all":
        return c_local
    if inp.negatives == "batch":
        return min(batch, c_local)
    k = num_sampled(c_local, inp.sample_rate)
    return max(k, min(batch, c_local)) if inp.negatives == "partial" else k


def nearest_width(inp: PlanInputs) -> int:
    """M, the nearest classes a row of the table holds: nearest_per_class, at most the C - 1 other classes
    (``NearestTable.width``); 0 without negatives=nearest."""
    return min(inp.nearest_per_class, inp.classes - 1) if inp.negatives == "nearest" else 0


def nearest_pairs(inp: PlanInputs) -> dict:
    """negatives=nearest: the (row, nearest class) pairs one rank computes per step, besides its K rows.

    Row i's M nearest classes N_i are spread over the shards; a rank computes the pairs whose class it
    owns. expected = ceil(B M C_local / C): each nearest class on the largest shard with probability
    C_local / C (class ids independent of which classes are near each other; exact at P = 1, every label
    valid); bound = B M (every row's nearest classes on one shard). Zeros without nearest.
    """
    bound = inp.global_batch * nearest_width(inp)
    return {"expected": math.ceil(bound * shard_rows(inp) / inp.classes), "bound": bound}


def nearest_build(inp: PlanInputs) -> dict | None:
    """What one build of the table of nearest classes costs a rank (at the first step, then every ``every``
    draws; not part of a steady step): flops 2 C_local C D (cosines with every class), bytes received
    (C - C_local) D 4 (every other shard's normalized fp32 rows, one broadcast per shard, counted as
    "nearest_build"), transient 2 C_local D 4 (this shard's normalized rows, the largest received shard;
    C_local D 4 at P = 1)
    + 12 R S (a tile of R <= 2048 rows x S <= 8192 classes: its fp32 cosines and the int64 concatenation of
    the running top M's ids with the tile's); every: the automatic interval in draws (``auto_refresh``).
    None without nearest."""
    if inp.negatives != "nearest":
        return None
    c_local, d = shard_rows(inp), inp.dim
    tile = min(c_local, TILE_ROWS) * min(c_local, TILE_COLS)
    received = c_local if inp.gpus > 1 else 0  # at one rank the keys are this shard's rows
    return {"flops": 2 * c_local * inp.classes * d, "bytes": (inp.classes - c_local) * d * 4,
            "transient": (c_local + received) * d * 4 + 12 * tile,
            "every": auto_refresh(inp.classes, c_local, inp.global_batch, inp.sample_rate)}


def state_bytes(inp: PlanInputs) -> dict:
    """Persistent head state per rank, bytes: weights C_local D w, the optimizer's state, nearest's table.

    w = bytes per weight element. SGD with momentum > 0: one buffer C_local D w (none without
    momentum); AdamW: exp_avg and exp_avg_sq, 2 C_local D w, plus a per-row int64 step count 8 C_local
    (``dsoft_dist.head.optim``). The optimizer allocates all of it up front, sampled or not.
    negatives=nearest: the table's rows, C_local M (8 + 4) (int64 ids and fp32 cosines of each class's
    M nearest classes, ``NearestTable``).
    """
    c_local, w = shard_rows(inp), DTYPE_BYTES[inp.weight_dtype]
    rows = c_local * inp.dim * w
    if inp.optimizer == "sgd":
        opt = rows if inp.momentum > 0 else 0
    else:
        opt = 2 * rows + 8 * c_local
    table = c_local * nearest_width(inp) * (8 + 4)
    return {"weights": rows, "optimizer": opt, "nearest": table, "total": rows + opt + table}


def collectives(inp: PlanInputs) -> list[dict]:
    """The head's collectives in one steady training step, per rank, as its ``CommCounter`` counts them.

    Counted bytes = the buffer a rank receives: all_gather P n (n = one rank's part), reduce_scatter
    P n_out, all_reduce n. With B the global batch and e the embedding element size:
    labels all_gather 8 B; embeddings all_gather B D e; statistics all_reduce MAX over (3, B) fp32
    = 12 B and all_reduce SUM over (B,) fp32 = 4 B; embedding gradient reduce_scatter B D e; with
    inter_correction and sampled negatives one float64 all_reduce, 8; with negatives=nearest the lookup
    of each row's nearest classes, all_reduce SUM over (B, M) int64 = 8 B M. The input check runs only on
    the first step and nearest's table build (``nearest_build``) every ``every`` draws, so neither is in a
    steady step. Nothing moves with one rank. Each entry also has
    ``link`` = what a ring algorithm sends over each link: (P - 1) / P of the counted bytes for
    all_gather and reduce_scatter, 2 (P - 1) / P for all_reduce.
    """
    if inp.gpus == 1:
        return []
    b, p, e = inp.global_batch, inp.gpus, DTYPE_BYTES[inp.dtype]
    rows = [("labels", "all_gather", 8 * b), ("embeddings", "all_gather", b * inp.dim * e),
            ("stats_max", "all_reduce", 12 * b), ("stats_sum", "all_reduce", 4 * b),
            ("embeddings_grad", "reduce_scatter", b * inp.dim * e)]
    if inp.inter_correction and inp.sampled:
        rows.append(("inter_correction", "all_reduce", 8))
    if inp.negatives == "nearest":
        rows.append(("nearest", "all_reduce", 8 * b * nearest_width(inp)))
    factor = {"all_gather": (p - 1) / p, "reduce_scatter": (p - 1) / p, "all_reduce": 2 * (p - 1) / p}
    return [{"name": name, "op": op, "bytes": n, "link": factor[op] * n} for name, op, n in rows]


def link_bytes(inp: PlanInputs) -> dict:
    """Bytes per step on each link of the ring, intra-node and inter-node.

    Ring over ranks placed node-contiguously (P / K per node): rank i sends to rank i + 1, so of
    the P links K cross a node boundary (none with one node) and every link carries the same
    sum of ``collectives(inp)[*]['link']`` per step. ``per_node_out`` is what one node's network
    interface sends per step (one inter-node link per node in this model).
    """
    per_link = sum(c["link"] for c in collectives(inp))
    inter_links = inp.nodes if inp.nodes > 1 else 0
    return {"per_link": per_link, "intra_links": inp.gpus - inter_links if inp.gpus > 1 else 0,
            "inter_links": inter_links, "inter_per_link": per_link if inter_links else 0,
            "per_node_out": per_link if inter_links else 0,
            "counted": sum(c["bytes"] for c in collectives(inp))}


def head_flops(inp: PlanInputs) -> dict:
    """Head FLOPs per rank and step: model 6 B K D (the logit GEMM and the two gradient GEMMs), executed
    8 B K D (backward recomputes each chunk's logits; the logit cache is not modelled). negatives=nearest
    adds 6 n D to both for its n pairs (``nearest_pairs``, expected): a dot per pair and its two gradients."""
    bkd = inp.global_batch * rows_per_step(inp) * inp.dim
    pairs = 6 * nearest_pairs(inp)["expected"] * inp.dim
    return {"model": 6 * bkd + pairs, "executed": 8 * bkd + pairs}
