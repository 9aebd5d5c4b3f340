"""TAR@FAR, ROC, AUC, EER vs sklearn's roc_curve / roc_auc_score and brute-force sweeps; plots and reports."""
import json

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score
from sklearn.metrics import roc_curve as sk_roc_curve

from dsoft_dist.eval import roc_curve, roc_metrics, tar_at_far
from dsoft_dist.eval.roc import plot_roc, write_json

FARS = [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 0.25, 0.5]


def score_sets():
    rng = np.random.default_rng(1)
    n = 3000
    y = rng.random(n) < 0.3
    s = np.where(y, rng.normal(0.6, 0.15, n), rng.normal(0.1, 0.15, n))
    return {
        "random": (s, y),
        "ties": (np.round(s, 2), y),
        "heavy_ties": (rng.integers(0, 4, n).astype(float), y),
        "all_same_score": (np.zeros(n), y),
        "separable": (np.where(y, 1.0 + rng.random(n), rng.random(n)), y),
        "inverted": (-s, y),
        "small": (np.array([0.9, 0.8, 0.7, 0.6, 0.6, 0.2]), np.array([1, 0, 1, 1, 0, 0], bool)),
    }


def brute_operating_points(s, y):
    """(FPR, TPR) of every real threshold (accept score >= t), one loop iteration per distinct score."""
    points = []
    for t in np.r_[np.inf, np.unique(s)]:
        acc = s >= t
        points.append((acc[~y].mean(), acc[y].mean()))
    return np.array(points)


def brute_conservative(points, far):
    """max TPR over the real thresholds whose FPR <= far."""
    return points[points[:, 0] <= far + 1e-15, 1].max()


def sk_linear(fpr, tpr, far):
    """Linear interpolation on sklearn's ROC: last vertex with FPR <= far and the next one."""
    a = np.nonzero(fpr <= far)[0][-1]
    if fpr[a] == far or a == len(fpr) - 1:
        return tpr[a]
    b = a + 1
    return tpr[a] + (far - fpr[a]) / (fpr[b] - fpr[a]) * (tpr[b] - tpr[a])


@pytest.mark.parametrize("name", list(score_sets()))
def test_roc_matches_sklearn(name):
    s, y = score_sets()[name]
    far, tar, thr = roc_curve(s, y)
    fpr, tpr, sk_thr = sk_roc_curve(y, s, drop_intermediate=False)
    np.testing.assert_allclose(far, fpr, atol=1e-12)
    np.testing.assert_allclose(tar, tpr, atol=1e-12)
    np.testing.assert_allclose(thr[1:], sk_thr[1:])
    m = roc_metrics(s, y, fars=FARS)
    assert m["auc"] == pytest.approx(roc_auc_score(y, s), abs=1e-12)


@pytest.mark.parametrize("name", list(score_sets()))
def test_tar_at_far_matches_independent_computations(name):
    s, y = score_sets()[name]
    fpr, tpr, _ = sk_roc_curve(y, s, drop_intermediate=False)
    conservative = tar_at_far(s, y, FARS, interpolation="none")
    linear = tar_at_far(s, y, FARS)
    points = brute_operating_points(s, y)
    for f in FARS:
        assert conservative[f] == pytest.approx(brute_conservative(points, f), abs=1e-12), f
        assert linear[f] == pytest.approx(sk_linear(fpr, tpr, f), abs=1e-12), f
        assert conservative[f] <= linear[f] + 1e-15


def test_hand_computed_small_case():
    s, y = score_sets()["small"]
    # vertices: (0,0) (0,1/3) (1/3,1/3) (1/3,2/3) (2/3,1) (1,1): the 0.6 tie (one P, one N) is a diagonal
    res = tar_at_far(s, y, [0.2, 1 / 3, 0.5])
    assert res[0.2] == pytest.approx(1 / 3)
    assert res[1 / 3] == pytest.approx(2 / 3)  # exactly at a vertex: the top of the vertical run
    assert res[0.5] == pytest.approx(2 / 3 + 0.5 * 1 / 3)  # halfway along the tie diagonal
    assert tar_at_far(s, y, [0.5], interpolation="none")[0.5] == pytest.approx(2 / 3)


def test_all_ties_is_the_chance_diagonal():
    y = np.array([1, 1, 0, 0], bool)
    s = np.full(4, 0.5)
    assert tar_at_far(s, y, [0.25])[0.25] == pytest.approx(0.25)
    assert tar_at_far(s, y, [0.25], interpolation="none")[0.25] == 0.0
    m = roc_metrics(s, y)
    assert m["auc"] == pytest.approx(0.5) and m["eer"] == pytest.approx(0.5)


def brute_eer(far, tar):
    """Intersection of each ROC segment with TAR = 1 - FAR, found segment by segment."""
    for i in range(len(far) - 1):
        f0, t0, f1, t1 = far[i], tar[i], far[i + 1], tar[i + 1]
        g0, g1 = f0 + t0 - 1, f1 + t1 - 1
        if g0 <= 0 <= g1 and g1 > g0:
            return f0 + (-g0 / (g1 - g0)) * (f1 - f0)
        if g0 == 0:
            return f0
    return far[-1]


@pytest.mark.parametrize("name", list(score_sets()))
def test_eer_matches_segment_search(name):
    s, y = score_sets()[name]
    fpr, tpr, _ = sk_roc_curve(y, s, drop_intermediate=False)
    value = roc_metrics(s, y)["eer"]
    assert value == pytest.approx(brute_eer(fpr, tpr), abs=1e-12)
    if name == "separable":
        assert value == 0.0
    if name == "inverted":
        assert value > 0.5


def test_resolvability_flags_and_errors():
    rng = np.random.default_rng(5)
    y = rng.random(30000) < 0.3
    s = rng.normal(size=30000) + y
    n_neg = int((~y).sum())  # ~21000: FAR 1e-4 is resolvable, 1e-5 is not
    rows = roc_metrics(s, y, fars=[1e-5, 1e-4])["tar_at_far"]
    assert rows["1e-05"]["resolvable"] is False and rows["1e-04"]["resolvable"] is True
    assert 1e-4 * n_neg >= 1
    with pytest.raises(ValueError, match="at least one of each"):
        tar_at_far(s, np.ones(len(s), bool), [1e-3])
    with pytest.raises(ValueError, match="in \\(0, 1\\)"):
        tar_at_far(s, y, [0.0])
    with pytest.raises(ValueError, match="same length"):
        tar_at_far(s[:5], y, [0.1])
    with pytest.raises(ValueError, match="NaN"):
        tar_at_far(np.r_[np.nan, s[1:]], y, [0.1])


def test_plot_and_json(tmp_path):
    s, y = score_sets()["random"]
    far, tar, _ = roc_curve(s, y)
    png = plot_roc({"random": (far, tar)}, str(tmp_path / "roc.png"))
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    path = write_json({"x": float("inf"), "m": roc_metrics(s, y)}, str(tmp_path / "r.json"))
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    assert data["x"] is None and 0.9 < data["m"]["auc"] <= 1.0
