"""The IJB-B / IJB-C protocol on image features: template pooling, 1:1 TAR@FAR, 1:N TPIR@FPIR and rank-k.

The same arithmetic as arcface_torch's ``eval_ijbc.py`` (1:1) and InsightFace's ``ijb_1n.py`` (1:N),
written for any size: memory O(images x D) for the features, pairs scored in chunks, 1:N scores
never held as a whole matrix.

    from dsoft_dist.eval.ijb_protocol import template_features, pair_scores, verification_figures
    tids, tfeat = template_features(raw, templates, medias, weights=scores)   # (T,), (T, D) unit rows
    s = pair_scores(tids, tfeat, t1, t2)                                      # (M,) cosines
    verification_figures(s, labels)["tar_at_far"]                             # {"1e-06": ..., "0.1": ...}

Image feature (from ``dsoft_dist.eval.ijb``): the backbone's raw (not normalized) embedding of the
aligned crop, plus that of its mirror image when flip is on (their sum).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from dsoft_dist.eval.identification import identification_ranks
from dsoft_dist.eval.roc import DEFAULT_FARS, auc, nearest_far_index, roc_corners

DEFAULT_FPIRS = (0.01, 0.1)
DEFAULT_RANKS = (1, 5, 10)
_POOL_ROWS = 65536  # images pooled per block (float64 copies of a block only)


def template_features(features: np.ndarray, templates: np.ndarray, medias: np.ndarray, weights=None,
                      normalize_images: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Pools image features (N, D) into one L2-normalized feature per template: (ids (T,) ascending, (T, D) float64).

    Per image: x, divided by |x| first when ``normalize_images`` (the standard script's "norm" switch,
    off by default: the feature norm then weighs the image), times its detector score ``weights[i]``
    when given. Per media (images of one template sharing a media id, e.g. the frames of a video):
    the mean of its images. Per template: the SUM of its media features, then L2-normalized.
    templates, medias: (N,) integer ids. A template whose pooled feature is zero raises ValueError.
    """
    templates, medias = np.asarray(templates), np.asarray(medias)
    n = len(templates)
    if features.shape[0] != n or medias.shape != (n,) or (weights is not None and np.shape(weights) != (n,)):
        raise ValueError(f"features {features.shape}, templates {templates.shape}, medias {medias.shape} and "
                         f"weights {np.shape(weights)} must all have one row per image")
    order = np.lexsort((medias, templates))  # by template, then media: the standard script's np.unique order
    t, m = templates[order], medias[order]
    new_t = np.r_[True, t[1:] != t[:-1]]
    new_m = new_t | np.r_[True, m[1:] != m[:-1]]
    bounds = np.r_[np.flatnonzero(new_t), n]  # (T + 1,) sorted row where each template starts
    ids, out = t[bounds[:-1]], np.empty((len(bounds) - 1, features.shape[1]), dtype=np.float64)
    weights = None if weights is None else np.asarray(weights, dtype=np.float64)
    ti = 0
    while ti < len(ids):  # whole templates per block, so no block splits a media or a template
        tj = max(ti + 1, int(np.searchsorted(bounds, bounds[ti] + _POOL_ROWS, side="right")) - 1)
        a, b = bounds[ti], bounds[tj]
        x = np.asarray(features[order[a:b]], dtype=np.float64)  # (rows, D)
        if normalize_images:
            x /= np.linalg.norm(x, axis=1, keepdims=True)
        if weights is not None:
            x *= weights[order[a:b], None]
        starts = np.flatnonzero(new_m[a:b])  # media starts in the block
        media = np.add.reduceat(x, starts, axis=0) / np.diff(np.r_[starts, b - a])[:, None]  # (medias, D) means
        out[ti:tj] = np.add.reduceat(media, np.flatnonzero(new_t[a:b][starts]), axis=0)
        ti = tj
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    bad = np.flatnonzero(~(np.isfinite(norms[:, 0]) & (norms[:, 0] > 0)))
    if bad.size:
        raise ValueError(f"template {ids[bad[0]]} pools to a zero or non-finite feature ({bad.size} templates do): "
                         "check its detector scores (all zero?) and the model output")
    return ids, out / norms


def template_rows(ids: np.ndarray, wanted: np.ndarray, what: str = "template") -> np.ndarray:
    """Row of each wanted template id in ``ids`` (ascending, from template_features); ValueError if one is absent."""
    rows = np.clip(np.searchsorted(ids, wanted), 0, len(ids) - 1)
    missing = np.flatnonzero(ids[rows] != wanted)
    if missing.size:
        raise ValueError(f"{what} {wanted[missing[0]]} has no pooled feature ({missing.size} are missing): "
                         "every template needs at least one image")
    return rows


def pair_scores(ids: np.ndarray, feats: np.ndarray, t1, t2, chunk: int = 16384) -> np.ndarray:
    """Cosine of each template pair: (M,) float64; pairs are scored ``chunk`` at a time (no M x D copies)."""
    r1, r2 = template_rows(ids, np.asarray(t1)), template_rows(ids, np.asarray(t2))
    out = np.empty(len(r1), dtype=np.float64)
    for start in range(0, len(r1), chunk):
        a, b = feats[r1[start:start + chunk]], feats[r2[start:start + chunk]]
        out[start:start + chunk] = np.einsum("nd,nd->n", a, b)
    return out


def far_key(far: float) -> str:
    """The results.json key of a FAR: Python's float text, '1e-06', '0.0001', '0.1' (arcface_torch's column names)."""
    return str(float(far))


def verification_figures(scores: np.ndarray, labels: np.ndarray, fars=DEFAULT_FARS, curve_points: int = 2000) -> dict:
    """1:1 figures of template-pair scores (M,) and labels (M,) (1 = same subject).

    tar_at_far {far_key: TAR} read as arcface_torch's script reads it (``roc.tar_at_far_nearest``: the
    ROC vertex with the FAR nearest each target), far_read {far_key: the FAR of that vertex}, auc,
    same/different pair counts and ``curve``: (far, tar) thinned to about ``curve_points`` vertices
    spread over log FAR, for the plot.
    """
    labels = np.asarray(labels).astype(bool)
    far, tar, _ = roc_corners(scores, labels)
    picks = {far_key(f): nearest_far_index(far, float(f)) for f in fars}
    thin = np.unique(np.r_[0, np.searchsorted(far, np.logspace(-8, 0, curve_points)).clip(0, len(far) - 1),
                           len(far) - 1])
    return {"tar_at_far": {k: float(tar[i]) for k, i in picks.items()},
            "far_read": {k: float(far[i]) for k, i in picks.items()},
            "auc": auc(far, tar), "same_pairs": int(labels.sum()), "different_pairs": int((~labels).sum()),
            "curve": (far[thin], tar[thin])}


def _tpir_pass(probe: np.ndarray, gallery: np.ndarray, mate: np.ndarray, top_k: int, chunk: int):
    """Mate scores (P,) and the top_k highest non-mate scores over ALL probe x gallery pairs (top_k,), descending."""
    g = torch.from_numpy(np.ascontiguousarray(gallery, dtype=np.float64))
    mates, top = np.empty(len(probe)), torch.empty(0, dtype=torch.float64)
    for start in range(0, len(probe), chunk):
        sims = torch.from_numpy(np.ascontiguousarray(probe[start:start + chunk], dtype=np.float64)) @ g.T  # (Pc, G)
        rows = torch.arange(sims.shape[0])
        cols = torch.from_numpy(mate[start:start + chunk])
        mates[start:start + len(rows)] = sims[rows, cols].numpy()
        sims[rows, cols] = -torch.inf
        both = torch.cat([top, sims.reshape(-1)])
        top = torch.topk(both, min(top_k, both.numel())).values
    return mates, top.numpy()


def mate_counts(gallery_subjects: np.ndarray, probe_subjects: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(first (P,), count (P,)): the gallery row of each probe's subject (valid where count >= 1) and how many
    gallery rows have that subject."""
    order = np.argsort(gallery_subjects, kind="stable")
    ordered = np.asarray(gallery_subjects)[order]
    first = np.searchsorted(ordered, probe_subjects)
    count = np.searchsorted(ordered, probe_subjects, side="right") - first
    return order[np.minimum(first, len(order) - 1)], count


def mate_rows(gallery_subjects: np.ndarray, probe_subjects: np.ndarray, probe_templates: np.ndarray) -> np.ndarray:
    """(P,) index of each probe's mate: the one gallery entry with its subject; ValueError unless exactly one."""
    first, count = mate_counts(gallery_subjects, probe_subjects)
    bad = np.flatnonzero(count != 1)
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"probe template {probe_templates[i]} of subject {probe_subjects[i]} has {count[i]} gallery "
                         f"templates of its subject ({bad.size} probes are like it): the 1:N protocol needs one")
    return first


def identification_figures(ids: np.ndarray, feats: np.ndarray, gallery_templates, gallery_subjects,
                           probe_templates, probe_subjects, fpirs=DEFAULT_FPIRS, ranks=DEFAULT_RANKS,
                           chunk: int = 4096) -> dict:
    """1:N figures, computed as InsightFace's ``ijb_1n.py`` computes them.

    Each probe template's mate is the one gallery template of its subject (exactly one is required).
    rank-k: the fraction of probes whose mate is among the k gallery templates most similar to the
    probe (here: rank = 1 + the number of non-mate gallery templates scoring >= the mate, so exact
    ties count against the probe; the script's argsort leaves tie order unspecified). The ranks come
    from ``identification.identification_ranks``, which reads the template features as float32.
    TPIR@FPIR f (the script's rule, not the per-probe maximum of the NIST definition): with P probes,
    the threshold is the ceil(P f)-th highest of ALL P x (G - 1) non-mate scores, and TPIR is the
    fraction of probes whose mate score is strictly above it.
    Returns {"tpir_at_fpir": {far_key: ..}, "rank": {"1": ..}, "probes": P, "gallery": G}.
    """
    g_rows = template_rows(ids, np.asarray(gallery_templates), "gallery template")
    p_rows = template_rows(ids, np.asarray(probe_templates), "probe template")
    g_sub, p_sub = np.asarray(gallery_subjects), np.asarray(probe_subjects)
    mate = mate_rows(g_sub, p_sub, np.asarray(probe_templates))
    need = [math.ceil(len(p_rows) * f) for f in fpirs]  # the script's required top-k per FPIR
    if max(need) > len(p_rows) * (len(g_rows) - 1):
        raise ValueError(f"FPIR {max(fpirs)} needs {max(need)} non-mate scores but {len(p_rows)} probes x "
                         f"{len(g_rows) - 1} non-mate gallery templates give fewer")
    mates, top = _tpir_pass(feats[p_rows], feats[g_rows], mate, max(need), chunk)
    tpir = {far_key(f): float(np.mean(mates > top[k - 1])) for f, k in zip(fpirs, need)}
    r = identification_ranks(feats[p_rows], p_sub, feats[g_rows], g_sub, max_k=max(ranks), chunk_size=chunk,
                             backend="torch")
    return {"tpir_at_fpir": tpir, "rank": {str(k): float(np.mean(r <= k)) for k in ranks},
            "probes": int(len(p_rows)), "gallery": int(len(g_rows))}
