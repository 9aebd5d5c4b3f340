"""Closed-set identification (rank-k) with a gallery and optional distractors (MegaFace-style).

For each probe, the candidates are every gallery entry plus every distractor. Its genuine
score is the best cosine to a gallery entry with the same id; impostors are gallery entries
with another id and all distractors. The probe's rank is 1 + the number of impostors whose
score is >= the genuine score (ties count against the probe), and it is a hit at rank k when
rank <= k. Only the top-k impostor scores are needed, so everything is computed in chunks
(probe chunk x candidate chunk matmuls with a running top-k): no N x N matrix is ever built.
With ``backend="faiss"`` (or "auto" when faiss is installed) the distractor top-k comes from
a faiss exact inner-product index instead (its scores are float32; the torch path computes
in float64 chunk by chunk, so inputs may be float32 arrays or np.memmap of any size).

    from dsoft_dist.eval import identify
    rank1 = identify(probe, probe_ids, gallery, gallery_ids, distractors=d, k=1)
"""
from __future__ import annotations

import numpy as np
import torch

from dsoft_dist.eval.arrays import as_numpy_2d
from dsoft_dist.observability import get_logger

log = get_logger(__name__)


def _faiss():
    try:
        import faiss  # noqa: PLC0415 (optional dependency)
    except ImportError:
        return None
    return faiss


def _merge_topk(best: torch.Tensor, sims: torch.Tensor, k: int) -> torch.Tensor:
    """Running top-k values: best (P, k) and new scores (P, C) -> (P, k), descending."""
    both = torch.cat([best, sims], dim=1)
    return torch.topk(both, min(k, both.shape[1]), dim=1).values


def _rows(x: np.ndarray, start: int, stop: int, name: str) -> torch.Tensor:
    """Rows [start, stop) as an L2-normalized float64 tensor (chunk-wise, so big arrays are never copied whole)."""
    chunk = torch.from_numpy(np.asarray(x[start:stop], dtype=np.float64))
    norms = chunk.norm(dim=1, keepdim=True)
    bad = ~torch.isfinite(norms[:, 0]) | (norms[:, 0] == 0)
    if bad.any():
        raise ValueError(f"{name}: row {start + int(torch.nonzero(bad)[0, 0])} is zero or non-finite: "
                         "check the model output")
    return chunk / norms


def _gallery_pass(probe: torch.Tensor, pid: torch.Tensor, gallery: np.ndarray, gid: torch.Tensor,
                  k: int, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Genuine best score (P,) and top-k impostor scores (P, k) over the gallery, chunked over gallery rows."""
    genuine = torch.full((probe.shape[0],), -torch.inf, dtype=probe.dtype)
    top = torch.full((probe.shape[0], k), -torch.inf, dtype=probe.dtype)
    for start in range(0, gallery.shape[0], chunk):
        sims = probe @ _rows(gallery, start, start + chunk, "gallery").T  # (P, C)
        same = pid[:, None] == gid[None, start:start + chunk]  # (P, C)
        genuine = torch.maximum(genuine, sims.masked_fill(~same, -torch.inf).amax(dim=1))
        top = _merge_topk(top, sims.masked_fill(same, -torch.inf), k)
    return genuine, top


def _distractor_topk_torch(probe: torch.Tensor, distractors: np.ndarray, k: int, chunk: int) -> torch.Tensor:
    top = torch.full((probe.shape[0], k), -torch.inf, dtype=probe.dtype)
    for start in range(0, distractors.shape[0], chunk):
        top = _merge_topk(top, probe @ _rows(distractors, start, start + chunk, "distractors").T, k)  # (P, k)
    return top


def _faiss_index(faiss, distractors: np.ndarray, chunk: int):
    """Exact inner-product faiss index over the L2-normalized distractors (float32), filled chunk by chunk."""
    index = faiss.IndexFlatIP(distractors.shape[1])
    for start in range(0, distractors.shape[0], chunk):
        index.add(np.ascontiguousarray(_rows(distractors, start, start + chunk, "distractors").numpy(),
                                       dtype=np.float32))
    return index


def _distractor_topk_faiss(index, probe: torch.Tensor, k: int) -> torch.Tensor:
    kk = min(k, index.ntotal)
    values, _ = index.search(np.ascontiguousarray(probe.numpy(), dtype=np.float32), kk)  # (P, kk) float32
    out = torch.full((probe.shape[0], k), -torch.inf, dtype=torch.float64)
    out[:, :kk] = torch.from_numpy(values.astype(np.float64))
    return out


def _check_ids(ids, n: int, name: str) -> np.ndarray:
    ids = np.asarray(ids.cpu() if isinstance(ids, torch.Tensor) else ids).reshape(-1)
    if ids.shape[0] != n or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"{name} must be {n} integer ids (one per embedding row), got dtype {ids.dtype} "
                         f"shape {ids.shape}")
    return ids.astype(np.int64)


def identification_ranks(probe, probe_ids, gallery, gallery_ids, distractors=None, max_k: int = 10,
                         chunk_size: int = 4096, backend: str = "auto") -> np.ndarray:
    """Per-probe rank (P,) int, capped at max_k + 1 (= "not in the top max_k"). See the module doc.

    probe (P, D), gallery (G, D), distractors (N, D): float arrays/tensors (re-normalized here).
    backend: "torch" (chunked matmul), "faiss" (distractor search with faiss), "auto" (faiss if installed).
    """
    if backend not in ("auto", "torch", "faiss"):
        raise ValueError(f"backend={backend!r} is invalid: use 'auto', 'torch' or 'faiss'")
    if max_k < 1 or chunk_size < 1:
        raise ValueError(f"max_k={max_k} and chunk_size={chunk_size} must both be >= 1")
    p, g = as_numpy_2d(probe, "probe"), as_numpy_2d(gallery, "gallery")
    d = None if distractors is None else as_numpy_2d(distractors, "distractors")
    for name, x in (("gallery", g), ("distractors", d)):
        if x is not None and x.shape[1] != p.shape[1]:
            raise ValueError(f"{name} dim {x.shape[1]} != probe dim {p.shape[1]}: use embeddings of one model")
    pid, gid = _check_ids(probe_ids, len(p), "probe_ids"), _check_ids(gallery_ids, len(g), "gallery_ids")
    missing = ~np.isin(pid, gid)
    if missing.any():
        raise ValueError(f"{int(missing.sum())} probes have no gallery entry with their id (e.g. id "
                         f"{int(pid[missing][0])}): closed-set identification needs a mate for every probe; "
                         "drop those probes or add their gallery images")
    faiss = _faiss() if backend != "torch" else None
    if backend == "faiss" and faiss is None:
        raise ValueError("backend='faiss' but faiss is not installed: pip install faiss-cpu, or use backend='torch'")
    use_d = d is not None and len(d) > 0
    index = _faiss_index(faiss, d, chunk_size) if use_d and faiss is not None else None
    ranks, gid_t = np.empty(len(p), dtype=np.int64), torch.from_numpy(gid)
    for start in range(0, len(p), chunk_size):
        pc = _rows(p, start, start + chunk_size, "probe")  # (Pc, D) float64
        pid_c = torch.from_numpy(pid[start:start + chunk_size])
        genuine, top = _gallery_pass(pc, pid_c, g, gid_t, max_k, chunk_size)
        if use_d:
            dtop = (_distractor_topk_faiss(index, pc, max_k) if index is not None
                    else _distractor_topk_torch(pc, d, max_k, chunk_size))
            top = _merge_topk(top, dtop, max_k)
        ranks[start:start + len(pc)] = 1 + (top >= genuine[:, None]).sum(dim=1).numpy()
    log.debug("identification: %d probes, %d gallery, %d distractors, backend=%s", len(p), len(g),
              0 if d is None else len(d), "faiss" if index is not None else "torch")
    return ranks


def identify(probe, probe_ids, gallery, gallery_ids, distractors=None, k: int = 1, chunk_size: int = 4096,
             backend: str = "auto") -> float:
    """Rank-k identification rate in [0, 1]: the fraction of probes whose rank (see module doc) is <= k."""
    if k < 1:
        raise ValueError(f"k={k} is invalid: rank-k needs k >= 1")
    ranks = identification_ranks(probe, probe_ids, gallery, gallery_ids, distractors, max_k=k,
                                 chunk_size=chunk_size, backend=backend)
    return float((ranks <= k).mean())
