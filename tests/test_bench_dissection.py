"""``dsoft bench dissection``: the angle measures against constructed embeddings, and a toy run through
``dsoft train`` that writes the table, the records and the figure."""
from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest

from dsoft_dist.bench import dissection


def _at(axis: np.ndarray, tilt_deg: float, around: np.ndarray) -> np.ndarray:
    """A unit vector tilt_deg away from axis, towards the unit vector around (orthogonal to axis)."""
    t = math.radians(tilt_deg)
    return math.cos(t) * axis + math.sin(t) * around


def test_angles_measure_the_spread_around_each_class_and_the_nearest_other_class():
    x, y, z = np.eye(3)
    # class 0 around x: samples tilted 10 deg towards +y and -y (mean direction x); class 1 around y, 20 deg
    # towards +z and -z; class 2 at z, no spread. Nearest classes: 90 deg for each.
    emb = np.stack([_at(x, 10, y), _at(x, 10, -y), _at(y, 20, z), _at(y, 20, -z), z, z])
    ids = np.array([0, 0, 1, 1, 2, 2])
    got = dissection.angles(emb, ids)
    assert got["intra_deg"] == pytest.approx((10 + 10 + 20 + 20 + 0 + 0) / 6, abs=1e-4)
    assert got["nearest_class_deg"] == pytest.approx(90.0, abs=1e-4)
    # class 1 moved to 30 deg from class 0: its nearest class and class 0's are 30 deg away, class 2's is 90
    emb[2:4] = [_at(_at(x, 30, y), 5, z), _at(_at(x, 30, y), 5, -z)]
    got = dissection.angles(emb, ids)
    assert got["nearest_class_deg"] == pytest.approx((30 + 30 + 90) / 3, abs=1e-3)


def test_held_out_samples_are_the_training_identities_at_indices_training_never_draws():
    vectors, ids = dissection.held_out(classes=4, seed=2, per_identity=3)
    assert vectors.shape == (12, dissection.DIM) and ids.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    from dsoft_dist.data.synthetic import SyntheticVectors, vector_difficulty

    src = SyntheticVectors(4, dim=dissection.DIM, seed=2, **vector_difficulty("hard"))
    assert np.array_equal(vectors[4], src.sample(1, dissection.SAMPLES_PER_CLASS + 1))


@pytest.mark.slow(reason="trains both losses end to end and draws the figure (~17 s)")
def test_toy_dissection_trains_both_losses_and_writes_table_records_and_figure(tmp_path, capsys):
    out = str(tmp_path / "dis")
    assert dissection.main(["--out", out, "--classes", "3,4", "--seeds", "0", "--steps", "15",
                            "--eval-samples", "5"]) == 0
    with open(os.path.join(out, "dissection.json"), encoding="utf-8") as fh:
        result = json.load(fh)
    assert sorted((r["loss"], r["classes"]) for r in result["records"]) == [
        ("d_softmax_paper", 3), ("d_softmax_paper", 4), ("normface", 3), ("normface", 4)]
    for r in result["records"]:
        emb = np.asarray(r["embeddings"])
        assert emb.shape == (5 * r["classes"], 3) and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-3)
        assert 0 < r["intra_deg"] < 180 and math.isfinite(r["final_loss"])
    md = open(os.path.join(out, "dissection.md"), encoding="utf-8").read()
    assert "| normface | 3 | 1 |" in md and "| d_softmax_paper | 4 | 1 |" in md
    assert os.path.getsize(os.path.join(out, "dissection.png")) > 10_000
    with pytest.raises(ValueError, match="--classes '1'"):
        dissection.main(["--out", out, "--classes", "1"])
