"""Pair verification with the standard k-fold protocol (LFW / CFP-FP / AgeDB-30 style).

Score = cosine similarity of the two embeddings; a pair is predicted "same" when
score >= threshold. Folds are the contiguous, unshuffled splits of the pair list (as in
the LFW protocol and InsightFace: fold sizes differ by at most one). For each fold:

- accuracy: the threshold is chosen on the OTHER folds only, by an exact search over every
  distinct score (no grid): candidates are -inf, the midpoints between consecutive distinct
  training scores, and +inf; the first (lowest) candidate with the best training accuracy
  wins. Accuracy is then measured on the held-out fold.
- VAL@FAR: on the other folds, the threshold is the lowest one whose training FAR
  (false accepts / different pairs) is <= the target, i.e. just above the (k+1)-th largest
  different-pair score with k = floor(far * n_diff); VAL (true accepts / same pairs) and
  the actual FAR are measured on the held-out fold.

Mean and (population) std over folds are reported.

    from dsoft_dist.eval import verify_kfold
    res = verify_kfold(emb1, emb2, issame)  # res["accuracy"], res["accuracy_std"], res["threshold"], res["val"]
"""
from __future__ import annotations

import numpy as np

from dsoft_dist.eval.arrays import as_numpy_2d, cosine_scores, scores_and_labels


def fold_slices(n: int, folds: int) -> list[slice]:
    """Contiguous folds of n items; the first n % folds folds get one extra item."""
    if folds < 2 or folds > n:
        raise ValueError(f"folds={folds} is invalid for {n} pairs: use 2 <= folds <= number of pairs (10 is standard)")
    sizes = np.full(folds, n // folds)
    sizes[: n % folds] += 1
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    return [slice(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]


def best_accuracy_threshold(scores: np.ndarray, issame: np.ndarray) -> tuple[float, float]:
    """Exact best threshold for accuracy of (score >= t) on this set. Returns (threshold, accuracy).

    O(n log n): sort, then count negatives below and positives at-or-above each cut between distinct scores.
    """
    order = np.argsort(scores, kind="stable")
    s, y = scores[order], issame[order]
    n = len(s)
    neg_below = np.concatenate([[0], np.cumsum(~y)])  # (n+1,) negatives among the j lowest
    pos_above = int(y.sum()) - np.concatenate([[0], np.cumsum(y)])  # (n+1,) positives among the rest
    valid = np.ones(n + 1, dtype=bool)  # cut j is allowed only between distinct scores
    valid[1:n] = s[1:] > s[:-1]
    correct = np.where(valid, neg_below + pos_above, -1)
    j = int(np.argmax(correct))  # first (lowest) best cut
    if j == 0:
        threshold = -np.inf
    elif j == n:
        threshold = np.inf
    else:
        threshold = float((s[j - 1] + s[j]) / 2.0)
        if not s[j - 1] < threshold <= s[j]:  # midpoint rounded onto s[j-1] (adjacent floats)
            threshold = float(s[j])
    return threshold, float(correct[j]) / n


def threshold_at_far(neg_scores: np.ndarray, far: float) -> float:
    """Lowest threshold t with mean(neg_scores >= t) <= far (just above the (k+1)-th largest, k = floor(far * n))."""
    n = len(neg_scores)
    if n == 0:
        return -np.inf
    k = int(np.floor(far * n + 1e-9))
    if k >= n:
        return -np.inf
    kth = np.partition(neg_scores, n - 1 - k)[n - 1 - k]  # (k+1)-th largest
    return float(np.nextafter(kth, np.inf))


def _val_far(scores: np.ndarray, issame: np.ndarray, threshold: float) -> tuple[float, float]:
    accept = scores >= threshold
    n_same, n_diff = int(issame.sum()), int((~issame).sum())
    val = float((accept & issame).sum()) / n_same if n_same else float("nan")
    far = float((accept & ~issame).sum()) / n_diff if n_diff else float("nan")
    return val, far


def _nan_stats(values: list[float]) -> tuple[float, float]:
    """(mean, std) over the finite values; (nan, nan) when there are none (e.g. a fold without same pairs)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    return (float(v.mean()), float(v.std())) if len(v) else (float("nan"), float("nan"))


def verify_scores_kfold(scores, issame, folds: int = 10, far: float = 1e-3) -> dict:
    """k-fold protocol on precomputed scores (N,) and labels (N,) bool. See the module docstring for the rules."""
    scores, issame = scores_and_labels(scores, issame, "issame")
    if not 0.0 < far < 1.0:
        raise ValueError(f"far={far} is invalid: must be in (0, 1), e.g. 1e-3")
    accs, thresholds, vals, fars = [], [], [], []
    for test in fold_slices(len(scores), folds):
        train = np.ones(len(scores), dtype=bool)
        train[test] = False
        t, _ = best_accuracy_threshold(scores[train], issame[train])
        accs.append(float(((scores[test] >= t) == issame[test]).mean()))
        thresholds.append(t)
        t_far = threshold_at_far(scores[train][~issame[train]], far)
        v, f = _val_far(scores[test], issame[test], t_far)
        vals.append(v)
        fars.append(f)
    thr = np.asarray(thresholds)
    return {
        "accuracy": float(np.mean(accs)), "accuracy_std": float(np.std(accs)),
        "threshold": float(np.mean(thr)) if np.isfinite(thr).all() else float(np.median(thr)),
        "fold_accuracies": accs, "fold_thresholds": [float(x) for x in thresholds],
        "best_threshold_all": best_accuracy_threshold(scores, issame)[0],
        "val": _nan_stats(vals)[0], "val_std": _nan_stats(vals)[1], "far": _nan_stats(fars)[0],
        "far_target": float(far), "folds": int(folds), "num_pairs": int(len(scores)),
    }


def verify_kfold(emb1, emb2, issame, folds: int = 10, far: float = 1e-3) -> dict:
    """10-fold verification of pairs (emb1[i], emb2[i]); embeddings (N, D) arrays or tensors, cosine similarity.

    Returns {"accuracy", "accuracy_std", "threshold" (mean of the per-fold thresholds), "val", "val_std",
    "far" (actual, mean over folds), "far_target", "best_threshold_all" (best on all pairs, for reporting),
    "fold_accuracies", "fold_thresholds", "folds", "num_pairs"}.
    """
    a, b = as_numpy_2d(emb1, "emb1"), as_numpy_2d(emb2, "emb2")
    if a.shape != b.shape:
        raise ValueError(f"emb1 {a.shape} and emb2 {b.shape} must have the same shape (one row per pair)")
    return verify_scores_kfold(cosine_scores(a, b), issame, folds=folds, far=far)
