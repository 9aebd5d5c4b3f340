"""Memory per rank: the head step's transient workspace (torch chunked path) and the backbone's state.

    transient_bytes(inp)   # {'phases': {phase: bytes}, 'peak', 'peak_phase', 'chunk'}
    backbone_bytes(inp)    # params + grads (+ DDP's bucket copy) + optimizer state, from the registry

The transient is the most memory one head step (forward + backward + optimizer step) holds
beyond the persistent state, taken phase by phase from what ``dsoft_dist/head/local.py``,
``sharded.py`` and ``optim.py`` allocate, and checked against ``dsoft bench head``
(tests/test_plan.py, docs/scale.md). Per-row vectors of B elements (labels, masks, shifts)
and other O(B) / O(K) scalars per row are left out (< 1% at the sizes planned).
"""
from __future__ import annotations

import math

from dsoft_dist.head import auto_chunk_size
from dsoft_dist.plan.estimate import DTYPE_BYTES, PlanInputs, nearest_pairs, rows_per_step, shard_rows

F32 = 4
_ADAMW_ROW_BYTES = 16  # AdamW's per-row float64 temporaries (step counts, bias corrections)


def chunk_width(inp: PlanInputs) -> int:
    """w = min(chunk, n_cols): the head's chunk (``auto_chunk_size``: B w ~ 1M logits on CPU, 16M on CUDA,
    >= 256 rows) capped by the columns it walks (K sampled rows, or C_local)."""
    n_cols = rows_per_step(inp) if inp.sampled else shard_rows(inp)
    return min(auto_chunk_size(inp.global_batch, inp.chunk_size, inp.device), max(n_cols, 1))


def weight_grad_bytes(inp: PlanInputs) -> int:
    """G, the fp32 weight gradient of one backward: dense C_local D 4 for negatives=all; with a row list the
    values (K + B) D 4 (the K rows, then one slot per batch row for owned targets outside them), and with
    nearest its n pairs' rows after them, (K + B + n) D 4; none with the optimizer inside the chunks."""
    if inp.step_in_chunks:
        return 0
    return touched_rows(inp) * inp.dim * F32


def touched_rows(inp: PlanInputs) -> int:
    """The rows of the weight gradient's values: C_local (dense); K + B with a row list (a bound: the B slots
    hold the owned targets outside the K rows); + n with nearest (its pairs, expected: ``nearest_pairs``)."""
    if not inp.sampled:
        return shard_rows(inp)
    return rows_per_step(inp) + inp.global_batch + nearest_pairs(inp)["expected"]


def _saved(inp: PlanInputs) -> tuple[int, int]:
    """(bytes kept from forward into backward, bytes alive only during forward).

    Kept: the gathered embeddings in fp32 (the caller's tensor at P = 1 in fp32: 0), their normalized
    copy B D 4, the row norms n_cols 4, the selected rows' ids K 8 and the gathered labels 8 B (each
    chunk's sampled rows are gathered into a w D 4 buffer, in forward and again in backward). With bf16/fp16 embeddings the
    gathered tensor (B D e, P > 1) lives until forward returns, its fp32 copy is kept.
    """
    b, d, e, p = inp.global_batch, inp.dim, DTYPE_BYTES[inp.dtype], inp.gpus
    gathered = b * d * e if p > 1 else 0
    fp32_copy = gathered if e == F32 else b * d * F32
    n_cols = rows_per_step(inp) if inp.sampled else shard_rows(inp)
    kept = fp32_copy + b * d * F32 + n_cols * F32 + (8 * rows_per_step(inp) if inp.sampled else 0)
    kept += 8 * b if p > 1 else 0
    return kept, (gathered if e != F32 else 0)


def _backward_workspace(inp: PlanInputs, w: int) -> int:
    """The backward chunk loop's buffers: logits (w + 1) B 4 (the block is written over them); a chunk
    gradient w D 4 (no dense gradient); 1 / |w_k| and 1 / |w_k|^2 over the columns, 2 n_cols 4; a 16-bit
    weight's chunk cast to fp32, w D 4 (all rows); with the torch passes, the radial sum's product w D 4
    (``torch.linalg.vecdot`` of the chunk's gradient and rows); the step in backward's temporaries."""
    b, d, wb = inp.global_batch, inp.dim, DTYPE_BYTES[inp.weight_dtype]
    n_cols = rows_per_step(inp) if inp.sampled else shard_rows(inp)
    total = (w + 1) * b * F32 + 2 * n_cols * F32 + _chunk_cast(inp, w) + _rows_buffer(inp, w)
    torch_passes = inp.backend == "torch"  # they form each chunk's gradient; cpu-c hands over its product form
    if torch_passes:
        total += w * d * F32
    # the chunk gradient buffer exists without a dense gradient; it is written when the step in backward takes
    # a formed gradient (the torch passes, or AdamW) (on CPU a buffer never written is never resident)
    written = inp.step_in_chunks and (torch_passes or inp.optimizer == "adamw")
    if (inp.sampled or inp.step_in_chunks) and (written or inp.device != "cpu"):
        total += w * d * F32
    if inp.step_in_chunks:  # a row list's gathered rows: AdamW w, m1, m2 and the denominator; SGD the
        if inp.optimizer == "adamw":  # momentum rows, and w unless the product form reuses the caller's copy
            total += (4 if inp.sampled else 1) * w * d * wb
        elif inp.sampled:
            total += ((inp.momentum > 0) + torch_passes) * w * d * wb
    return total


def coalesced_rows(inp: PlanInputs) -> int:
    """U, the distinct rows of nearest's weight gradient (expected): the K random rows and, drawn uniformly over
    the shard's C_local classes, the t = B C_local / C owned targets and the n pairs' classes (repeats merge):
    U = K + (C_local - K) (1 - (1 - 1 / C_local)^t). ~ K + B + n while those are few against C_local."""
    c_local, k = shard_rows(inp), rows_per_step(inp)
    draws = inp.global_batch * c_local / inp.classes + nearest_pairs(inp)["expected"]
    return k + math.ceil((c_local - k) * -math.expm1(draws * math.log1p(-1 / c_local))) if c_local > 1 else c_local


def _chunk_cast(inp: PlanInputs, w: int) -> int:
    """w D 4 when each chunk of a 16-bit weight is cast to fp32, else 0."""
    return w * inp.dim * F32 if inp.weight_dtype != "fp32" else 0


def _rows_buffer(inp: PlanInputs, w: int) -> int:
    """w D 4: the buffer each chunk's sampled rows are gathered into (row lists of an fp32 weight; a 16-bit
    weight's gathered rows are cast instead, ``_chunk_cast``)."""
    return w * inp.dim * F32 if (inp.sampled and inp.weight_dtype == "fp32") else 0


def _step_bytes(inp: PlanInputs) -> int:
    """The optimizer step's temporaries on top of G (``dsoft_dist.head.optim``), K sampled rows, B slots.

    Row list: sparse mode coalesces the B outside-target slots apart from the sorted rows (B D 4), then
    steps the K rows, gathering w and the momentum (SGD, 2 K D wb) or w, m1, m2 and the denominator
    (AdamW, 4 K D wb), and then the few slot rows; dense mode densifies (C_local D 4, and AdamW's
    denominator C_local D wb). Dense gradient: SGD works in place, AdamW
    makes one denominator C_local D wb. AdamW also holds ~16 bytes per stepped row (float64 step
    counts and bias corrections). nearest (sparse mode): a pair whose class is among the K rows adds to a
    row of the run, so the whole gradient is coalesced (U D 4, U rows: ``coalesced_rows``) and its U rows
    are stepped at once.
    """
    if inp.step_in_chunks:
        return 0
    d, wb, c_local = inp.dim, DTYPE_BYTES[inp.weight_dtype], shard_rows(inp)
    adamw = inp.optimizer == "adamw"
    if not inp.sampled:
        return c_local * (d * wb + _ADAMW_ROW_BYTES) if adamw else 0
    if inp.head_mode == "dense":
        return c_local * d * F32 + (c_local * (d * wb + _ADAMW_ROW_BYTES) if adamw else 0)
    momentum_rows = 1 if inp.momentum > 0 else 0
    if inp.negatives == "nearest":
        k = coalesced_rows(inp)
        coalesced = k * d * F32
    else:
        k, coalesced = rows_per_step(inp), inp.global_batch * d * F32
    return coalesced + ((4 if adamw else 1 + momentum_rows) * k * d * wb) + (k * _ADAMW_ROW_BYTES if adamw else 0)


def transient_bytes(inp: PlanInputs) -> dict:
    """Peak bytes one head step adds on a rank, as the maximum over its phases (B global batch, w chunk width):

    gather:           2 B D e (the all_gather's parts and their concatenation; P > 1)
    forward chunks:   kept + fwd + B D 4 (scaled features) + (w + 1) B 4 (logits) (+ w D 4: a 16-bit chunk cast)
    forward targets:  kept + fwd + 3 B D 4 (scaled features, target rows, their product)
    backward chunks:  kept + G + 3 B D 4 (scaled, signed features, grad_f) + the backward workspace
    backward targets: kept + G + 4 B D 4 (grad_f, target rows, their gradient, the slot sums; row lists)
    embedding grad:   G + B D 4 (normalize's saved input) + 3 B D 4 (its backward) + B D e (cast) + B_local D e
    optimizer step:   G + the step's temporaries

    negatives=nearest adds, with n its pairs per rank (``nearest_pairs``, expected) and nD = n D 4:

        forward nearest:  kept + fwd + 4 nD (the pairs' rows, normalized, their features, the product)
        backward nearest: kept + 6 nD + B D 4 (the normalization's saved rows, the product's two gradients, three
                          temporaries of the normalization's backward; the features' gradient)
        backward chunks, backward targets: + B D 4 (the pairs' features gradient waits there, as their nD of G does)
        weight grad sum:  kept + 2 G + 2 B D 4 (the chunks' (K + B) D 4 values, the pairs' nD and their sum G)

    and its step in backward runs from the weight's hook on the formed G (stepped before the embedding grad).

    kept / fwd: see ``_saved``; G: ``weight_grad_bytes``. The torch chunked path is modelled (CPU, and CUDA
    without the triton backend's kernels; the cpu-c backend's buffers are the same). On CUDA every allocation
    counts (the allocator's peak); on CPU the resident memory does (what peak RSS sees): a buffer counts from
    its first write, so G's B target slots
    are not counted in the chunk loop and an unused chunk gradient buffer is not counted at all.
    """
    b, d, e = inp.global_batch, inp.dim, DTYPE_BYTES[inp.dtype]
    bd, w = b * d * F32, chunk_width(inp)
    kept, fwd = _saved(inp)
    g = weight_grad_bytes(inp)
    # the values' B target slots are written after the chunk loop: not resident during it on CPU
    g_chunks = g - bd if (g and inp.sampled and inp.device == "cpu") else g
    multi = inp.gpus > 1
    nearest = inp.negatives == "nearest"
    nd = nearest_pairs(inp)["expected"] * d * F32
    waiting = bd if nearest else 0  # the pairs' features gradient (their weight gradient is G's nD) waits
    g_embedding = 0 if inp.step_in_backward else g  # nearest's step in backward has stepped and freed G
    phases = {
        "gather": 2 * b * d * e if multi else 0,
        "forward chunks": kept + fwd + bd + (w + 1) * b * F32 + _chunk_cast(inp, w) + _rows_buffer(inp, w),
        "forward targets": kept + fwd + 3 * bd,
        "backward chunks": kept + g_chunks + 3 * bd + _backward_workspace(inp, w) + waiting,
        "embedding grad": g_embedding + 4 * bd + (b * d * e if e != F32 else 0) +
        (inp.batch_per_gpu * d * e if multi else 0),
        "optimizer step": g + _step_bytes(inp),
    }
    if inp.sampled:
        phases["backward targets"] = kept + g + 4 * bd + waiting
    if nearest:
        phases.update({"forward nearest": kept + fwd + 4 * nd, "backward nearest": kept + 6 * nd + bd,
                       "weight grad sum": kept + 2 * g + 2 * bd})
    peak_phase = max(phases, key=phases.get)
    return {"phases": phases, "peak": phases[peak_phase], "peak_phase": peak_phase, "chunk": w}


def backbone_params(name: str, dim: int) -> tuple[int, int]:
    """(parameters, buffer elements) of ``dsoft_dist.models.build_model(name, dim, 112)``, built on the meta
    device (no memory, no weights)."""
    import torch

    from dsoft_dist.models import build_model

    with torch.device("meta"):
        model = build_model(name, embedding_size=dim, input_size=112, in_features=dim)
    return sum(p.numel() for p in model.parameters()), sum(b.numel() for b in model.buffers())


def backbone_bytes(inp: PlanInputs, params: int, buffers: int = 0) -> dict:
    """The backbone's state per rank, bytes, for ``params`` parameters (fp32 master weights, also under bf16
    autocast): params 4 N, grads 4 N, DDP's gradient buckets 4 N (P > 1; DDP's default copies the
    gradients into buckets), optimizer state (SGD momentum 4 N, AdamW 8 N), buffers 4 M (BatchNorm
    statistics). Activations are NOT included: they depend on the input size, the batch and
    checkpointing; measure them with the trainer."""
    n = 4 * params
    optimizer = 2 * n if inp.optimizer == "adamw" else (n if inp.momentum > 0 else 0)
    parts = {"params": n, "grads": n, "ddp_buckets": n if inp.gpus > 1 else 0, "optimizer": optimizer,
             "buffers": 4 * buffers}
    return {**parts, "total": sum(parts.values()), "parameters": params}
