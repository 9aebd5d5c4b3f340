"""ROC analysis of 1:1 verification scores: TAR@FAR, AUC, EER; ROC plots (PNG) and reports.

ROC: sort scores descending; one ROC vertex per DISTINCT score (all pairs tied at a score
are accepted together), starting at (FAR, TAR) = (0, 0) and ending at (1, 1). Between two
vertices the curve is the straight line (the operating points of randomly mixing the two
thresholds), so ties become diagonal segments, never optimistic steps.

TAR@FAR (``interpolation="linear"``, the default): let A be the last vertex with
FAR <= target and B the next vertex (FAR > target). If FAR(A) == target, TAR = TAR(A) (the
top of any vertical run at that FAR); otherwise TAR = linear interpolation between A and B
at FAR = target. ``interpolation="none"`` returns TAR(A): the best TAR of a real threshold
whose FAR does not exceed the target (conservative). Targets below 1 / n_different cannot be
resolved by the data; they are still computed (as above) and flagged in ``roc_metrics``.

AUC: trapezoid area under the vertices (= Mann-Whitney U / (n_pos n_neg), ties count 1/2).
EER: the FAR where the piecewise-linear ROC crosses TAR = 1 - FAR.

``tar_at_far_nearest`` is the third rule, the one arcface_torch's IJB-B/IJB-C script uses (and
so the published IJB tables): on sklearn's default ROC (``roc_corners``), the TAR of the vertex
whose FAR is nearest the target (``nearest_far_index`` states its tie rule).

    from dsoft_dist.eval import tar_at_far
    tar_at_far(scores, is_same, [1e-4, 1e-3])  # {0.0001: 0.93, 0.001: 0.97}
"""
from __future__ import annotations

import json
import math
import os

import numpy as np

from dsoft_dist.eval.arrays import scores_and_labels

DEFAULT_FARS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


def _check(scores, is_same) -> tuple[np.ndarray, np.ndarray]:
    s, y = scores_and_labels(scores, is_same, "is_same")
    if y.all() or not y.any():
        raise ValueError(f"is_same has {int(y.sum())} same and {int((~y).sum())} different pairs: "
                         "a ROC needs at least one of each")
    return s, y


def _vertex_counts(scores, is_same) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fp (V,), tp (V,), thresholds (V,)): accepted counts at each distinct score, descending; no (0, 0)."""
    s, y = _check(scores, is_same)
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    last_of_run = np.r_[s[1:] != s[:-1], True]  # (n,) end of each group of tied scores
    return np.cumsum(~y)[last_of_run], np.cumsum(y)[last_of_run], s[last_of_run]


def roc_curve(scores, is_same) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC vertices: (far (V,), tar (V,), thresholds (V,)); vertex v accepts score >= thresholds[v].

    The first vertex is (0, 0) with threshold +inf; one vertex per distinct score after it.
    """
    fp, tp, thr = _vertex_counts(scores, is_same)
    return np.r_[0.0, fp / fp[-1]], np.r_[0.0, tp / tp[-1]], np.r_[np.inf, thr]


def roc_corners(scores, is_same) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The ROC as sklearn's ``roc_curve`` returns it by default (``drop_intermediate=True``): (far, tar, thr).

    From the distinct-score vertices (before the (0, 0) start is added) every vertex that lies on a
    straight line through its two neighbours in counts (both second differences of the FP and TP
    counts zero) is dropped; the first and the last are kept; then (0, 0) with threshold +inf is
    prepended. arcface_torch's IJB script reads TAR@FAR on exactly this curve (``tar_at_far_nearest``).
    """
    fp, tp, thr = _vertex_counts(scores, is_same)
    if len(fp) > 2:
        keep = np.r_[True, (np.diff(fp, 2) != 0) | (np.diff(tp, 2) != 0), True]
        fp, tp, thr = fp[keep], tp[keep], thr[keep]
    return np.r_[0.0, fp / fp[-1]], np.r_[0.0, tp / tp[-1]], np.r_[np.inf, thr]


def nearest_far_index(far: np.ndarray, target: float) -> int:
    """The vertex arcface_torch's IJB script reads at a target FAR: the one whose FAR is nearest the target.

    Its rule: flip the (far, tar) arrays, take ``min(zip(|far - target|, index))``: the smallest distance,
    and among equal distances the smallest flipped index, i.e. the LAST vertex in ascending order. So at
    a FAR reached by several vertices (a vertical run) the highest TAR is read, and of two vertices
    equally far below and above the target, the one above. Returns the index into the ascending arrays.
    """
    dist = np.abs(far - target)
    return len(far) - 1 - int(np.argmin(dist[::-1]))  # argmin takes the first minimum of the flipped array


def tar_at_far_nearest(scores, is_same, fars=DEFAULT_FARS) -> dict:
    """TAR at each target FAR read as arcface_torch's IJB evaluation reads it: {far: tar}.

    The ROC is ``roc_corners`` (sklearn's default curve) and each target takes the TAR of the vertex
    ``nearest_far_index`` picks. Unlike ``tar_at_far`` this can read a vertex whose FAR is above the
    target; it is offered so that IJB figures compare with the published tables.
    """
    for f in fars:
        if not 0.0 < f < 1.0:
            raise ValueError(f"FAR {f} is invalid: each target FAR must be in (0, 1), e.g. 1e-4")
    far, tar, _ = roc_corners(scores, is_same)
    return {float(f): float(tar[nearest_far_index(far, float(f))]) for f in fars}


def _tar_from_curve(far: np.ndarray, tar: np.ndarray, target: float, interpolation: str) -> tuple[float, int]:
    """TAR at one target FAR from ROC vertices; also returns the index of vertex A (last with FAR <= target)."""
    b = int(np.searchsorted(far, target, side="right"))  # first vertex with FAR > target
    a = b - 1
    if interpolation == "none" or b == len(far) or far[a] == target:
        return float(tar[a]), a
    w = (target - far[a]) / (far[b] - far[a])
    return float(tar[a] + w * (tar[b] - tar[a])), a


def tar_at_far(scores, is_same, fars=DEFAULT_FARS, interpolation: str = "linear") -> dict:
    """TAR at each target FAR: {far: tar}. scores (N,) similarities, is_same (N,) bool. See module doc for the rule."""
    if interpolation not in ("linear", "none"):
        raise ValueError(f"interpolation={interpolation!r} is invalid: use 'linear' or 'none'")
    for f in fars:
        if not 0.0 < f < 1.0:
            raise ValueError(f"FAR {f} is invalid: each target FAR must be in (0, 1), e.g. 1e-4")
    far, tar, _ = roc_curve(scores, is_same)
    return {float(f): _tar_from_curve(far, tar, float(f), interpolation)[0] for f in fars}


def auc(far: np.ndarray, tar: np.ndarray) -> float:
    """Area under the piecewise-linear ROC (trapezoids)."""
    return float(np.sum((far[1:] - far[:-1]) * (tar[1:] + tar[:-1]) / 2.0))


def eer(far: np.ndarray, tar: np.ndarray) -> float:
    """Equal error rate: FAR at the crossing of the piecewise-linear ROC with TAR = 1 - FAR."""
    g = tar + far - 1.0  # nondecreasing from -1 at (0, 0) to 1 at (1, 1)
    i = int(np.argmax(g >= 0.0))
    if g[i] == 0.0 or i == 0:
        return float(far[i])
    w = -g[i - 1] / (g[i] - g[i - 1])
    return float(far[i - 1] + w * (far[i] - far[i - 1]))


def roc_metrics(scores, is_same, fars=DEFAULT_FARS, interpolation: str = "linear") -> dict:
    """Everything a report needs: TAR@FAR, the threshold of vertex A per FAR, AUC, EER, counts, resolvability."""
    s, y = _check(scores, is_same)
    far, tar, thr = roc_curve(s, y)
    n_neg = int((~y).sum())
    rows = {}
    for f in fars:
        value, a = _tar_from_curve(far, tar, float(f), interpolation)
        rows[f"{f:.0e}"] = {"far": float(f), "tar": value, "threshold": float(thr[a]),
                            "resolvable": bool(f * n_neg >= 1.0)}
    return {"tar_at_far": rows, "auc": auc(far, tar), "eer": eer(far, tar), "num_same": int(y.sum()),
            "num_different": n_neg, "interpolation": interpolation}


def plot_roc(curves: dict, path: str, title: str = "ROC") -> str:
    """Saves ROC curves {name: (far, tar)} as a PNG with a log FAR axis (matplotlib, Agg backend)."""
    import matplotlib  # noqa: PLC0415 (optional at import time of the package)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=100)
    lowest = 1.0
    for name, (far, tar) in curves.items():
        keep = far > 0
        ax.plot(far[keep], tar[keep], label=name)
        if keep.any():
            lowest = min(lowest, float(far[keep].min()))
    ax.set_xscale("log")
    ax.set_xlim(max(min(lowest, 1e-6), 1e-8), 1.0)
    ax.set_ylim(0.0, 1.01)
    ax.set_xlabel("FAR (false accept rate)")
    ax.set_ylabel("TAR (true accept rate)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def _json_safe(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def write_json(results: dict, path: str) -> str:
    """Writes results as strict JSON (non-finite floats become null)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(_json_safe(results), f, indent=2, sort_keys=True, allow_nan=False)
    return path
