"""Chunked rank-k identification equals a brute-force full-matrix ranking; faiss path; ties; errors."""
import numpy as np
import pytest
import torch

from dsoft_dist.eval import identification_ranks, identify


def normalize(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def brute_ranks(probe, pid, gallery, gid, distractors):
    """Full similarity matrix; candidates sorted by score (desc), ties put impostors first; rank of 1st genuine."""
    cands = normalize(np.concatenate([gallery, distractors]) if distractors is not None else gallery)
    cid = np.concatenate([gid, np.full(len(cands) - len(gid), -1)])
    sims = normalize(probe) @ cands.T  # (P, G + N)
    ranks = []
    for i in range(len(probe)):
        genuine = cid == pid[i]
        order = np.lexsort((genuine, -sims[i]))  # primary: score desc; tie-break: impostor (False) first
        ranks.append(int(np.nonzero(genuine[order])[0][0]) + 1)
    return np.array(ranks)


def make_set(seed=0, n_ids=40, per_id=2, n_distractors=700, dim=12, noise=0.9):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(n_ids, dim))
    gid = np.repeat(np.arange(n_ids), per_id)
    gallery = centers[gid] + noise * rng.normal(size=(len(gid), dim))
    pid = rng.permutation(np.arange(n_ids))[: n_ids - 5]
    probe = centers[pid] + noise * rng.normal(size=(len(pid), dim))
    distractors = rng.normal(size=(n_distractors, dim))
    return probe, pid, gallery, gid, distractors


@pytest.mark.parametrize("chunk", [1, 7, 64, 100000])
@pytest.mark.parametrize("with_distractors", [True, False])
def test_chunked_equals_brute_force(chunk, with_distractors):
    probe, pid, gallery, gid, d = make_set()
    d = d if with_distractors else None
    expected = brute_ranks(probe, pid, gallery, gid, d)
    got = identification_ranks(probe, pid, gallery, gid, d, max_k=10, chunk_size=chunk, backend="torch")
    np.testing.assert_array_equal(got, np.minimum(expected, 11))
    for k in (1, 5):
        assert identify(probe, pid, gallery, gid, d, k=k, chunk_size=chunk, backend="torch") == \
            pytest.approx(np.mean(expected <= k))
    assert 0.0 < np.mean(expected <= 1) < 1.0  # the set is neither trivial nor hopeless (test can fail)


def test_faiss_backend_agrees():
    probe, pid, gallery, gid, d = make_set(seed=2, n_distractors=2000)
    expected = brute_ranks(probe, pid, gallery, gid, d)
    got = identification_ranks(probe.astype(np.float32), pid, gallery, gid, d.astype(np.float32), max_k=5,
                               backend="faiss")
    np.testing.assert_array_equal(got, np.minimum(expected, 6))


def test_ties_count_against_the_probe():
    eye = np.eye(4)
    probe, pid = eye[:2], np.array([0, 1])
    gallery, gid = eye[:3], np.array([0, 1, 2])
    distractors = eye[[0, 3]]  # an exact duplicate of probe 0's mate
    assert identification_ranks(probe, pid, gallery, gid, distractors, max_k=3, backend="torch").tolist() == [2, 1]
    assert identify(probe, pid, gallery, gid, distractors, k=1, backend="torch") == 0.5
    assert identify(probe, pid, gallery, gid, distractors, k=2, backend="torch") == 1.0


def test_inputs_may_be_tensors_and_memmaps(tmp_path):
    probe, pid, gallery, gid, d = make_set(seed=4)
    mm = np.lib.format.open_memmap(str(tmp_path / "d.npy"), mode="w+", dtype=np.float32, shape=d.shape)
    mm[:] = d
    a = identify(torch.tensor(probe, dtype=torch.float32), torch.tensor(pid), gallery, gid, mm, k=1, chunk_size=50,
                 backend="torch")
    b = np.mean(brute_ranks(probe, pid, gallery, gid, d) <= 1)
    assert a == pytest.approx(b)


def test_errors_are_clear():
    probe, pid, gallery, gid, d = make_set()
    with pytest.raises(ValueError, match="no gallery entry"):
        identify(probe, pid + 1000, gallery, gid)
    with pytest.raises(ValueError, match="probe_ids must be"):
        identify(probe, pid[:-1], gallery, gid)
    with pytest.raises(ValueError, match="dim"):
        identify(probe, pid, gallery, gid, d[:, :5])
    with pytest.raises(ValueError, match="k=0"):
        identify(probe, pid, gallery, gid, k=0)
    with pytest.raises(ValueError, match="backend"):
        identify(probe, pid, gallery, gid, backend="annoy")
    zero = gallery.copy()
    zero[3] = 0
    with pytest.raises(ValueError, match="row 3 is zero"):
        identify(probe, pid, zero, gid, backend="torch")
