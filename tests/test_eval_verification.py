"""k-fold verification vs an independent brute-force threshold sweep, on random and adversarial score sets."""
import numpy as np
import pytest
import torch

from dsoft_dist.eval import verify_kfold, verify_scores_kfold
from dsoft_dist.eval.verification import fold_slices


def brute_kfold(scores, issame, folds, far):
    """Written independently: np.array_split folds, explicit sweep over every candidate threshold."""
    accs, vals, thresholds = [], [], []
    for test_idx in np.array_split(np.arange(len(scores)), folds):
        train = np.setdiff1d(np.arange(len(scores)), test_idx)
        s_tr, y_tr = scores[train], issame[train]
        u = np.unique(s_tr)
        cands = np.concatenate([[-np.inf], (u[:-1] + u[1:]) / 2, [np.inf]])  # ascending
        best_t, best_acc = None, -1.0
        for t in cands:
            acc = np.mean((s_tr >= t) == y_tr)
            if acc > best_acc:
                best_t, best_acc = t, acc
        thresholds.append(best_t)
        accs.append(np.mean((scores[test_idx] >= best_t) == issame[test_idx]))
        neg = s_tr[~y_tr]
        far_cands = np.concatenate([[-np.inf], np.nextafter(np.sort(neg), np.inf)])
        t_far = next(t for t in far_cands if len(neg) == 0 or np.mean(neg >= t) <= far + 1e-12)
        y_te = issame[test_idx]
        vals.append(np.mean(scores[test_idx][y_te] >= t_far) if y_te.any() else np.nan)
    return np.mean(accs), np.std(accs), thresholds, np.nanmean(vals)


def make_sets():
    rng = np.random.default_rng(0)
    y = rng.random(600) < 0.5
    noisy = np.where(y, rng.normal(0.5, 0.2, 600), rng.normal(0.1, 0.2, 600))
    return {
        "random": (noisy, y),
        "random_odd_n": (noisy[:437], y[:437]),
        "ties": (np.round(noisy, 1), y),
        "heavy_ties": (rng.integers(0, 3, 600) / 2.0, y),
        "all_same_score": (np.full(600, 0.3), y),
        "separable": (np.where(y, rng.uniform(0.6, 1.0, 600), rng.uniform(-1.0, 0.4, 600)), y),
        "inverted": (np.where(y, -noisy, noisy), y),
        "unbalanced": (noisy, rng.random(600) < 0.05),
        "all_same_label": (noisy, np.ones(600, dtype=bool)),
    }


@pytest.mark.parametrize("name", list(make_sets()))
@pytest.mark.parametrize("folds,far", [(10, 1e-3), (7, 0.05)])
def test_kfold_matches_brute_force(name, folds, far):
    scores, y = make_sets()[name]
    res = verify_scores_kfold(scores, y, folds=folds, far=far)
    acc, std, thresholds, val = brute_kfold(scores, y, folds, far)
    assert res["accuracy"] == pytest.approx(acc, abs=1e-12)
    assert res["accuracy_std"] == pytest.approx(std, abs=1e-12)
    np.testing.assert_allclose(res["fold_thresholds"], thresholds, rtol=0, atol=1e-12)
    if np.isnan(val):
        assert np.isnan(res["val"])
    else:
        assert res["val"] == pytest.approx(val, abs=1e-12)
    if name == "separable":
        assert res["accuracy"] == 1.0 and res["val"] > 0.9
    if name in ("all_same_score", "all_same_label"):
        assert res["accuracy"] == pytest.approx(max(y.mean(), 1 - y.mean()), abs=0.05)


def test_threshold_never_sees_its_test_fold():
    """Changing one fold's data must not change that fold's threshold (no leakage)."""
    scores, y = make_sets()["random"]
    before = verify_scores_kfold(scores, y)["fold_thresholds"]
    folds = fold_slices(len(scores), 10)
    changed = scores.copy()
    changed[folds[3]] = np.where(y[folds[3]], 5.0, -5.0)  # wildly different, perfectly separable fold
    after = verify_scores_kfold(changed, y)["fold_thresholds"]
    assert after[3] == before[3]
    assert after[0] != before[0] or after[1] != before[1]  # the other folds did see it (test can fail)


def test_fold_layout_is_contiguous_like_lfw():
    sl = fold_slices(6000, 10)
    assert [(s.start, s.stop) for s in sl[:2]] == [(0, 600), (600, 1200)]
    assert [s.stop - s.start for s in fold_slices(23, 10)] == [3, 3, 3, 2, 2, 2, 2, 2, 2, 2]
    with pytest.raises(ValueError, match="folds=1"):
        fold_slices(10, 1)


def test_verify_kfold_on_embeddings_uses_cosine():
    rng = np.random.default_rng(3)
    a = rng.normal(size=(200, 8))
    y = rng.random(200) < 0.5
    b = np.where(y[:, None], a + 0.7 * rng.normal(size=a.shape), rng.normal(size=a.shape))
    res = verify_kfold(torch.tensor(a * 3.0, dtype=torch.float32), b.astype(np.float32), y)  # scale must not matter
    cos = np.sum(a * b, 1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    acc, _, thresholds, _ = brute_kfold(cos, y, 10, 1e-3)
    assert res["accuracy"] == pytest.approx(acc, abs=1e-9)
    assert res["accuracy"] > 0.8
    with pytest.raises(ValueError, match="same shape"):
        verify_kfold(a[:10], b[:9], y[:10])
    with pytest.raises(ValueError, match="zero or non-finite"):
        verify_kfold(np.zeros((20, 8), np.float32), b[:20].astype(np.float32), y[:20])
