"""Synthetic identities: deterministic in any process, open-set ranges, vector mode, loader."""
from __future__ import annotations

import hashlib
import subprocess
import sys

import numpy as np
import pytest

from dsoft_dist.config.schema import DataConfig
from dsoft_dist.data import (
    EVAL_IDENTITY_OFFSET,
    Difficulty,
    SyntheticIdentities,
    SyntheticVectors,
    build_train_loader,
)
from dsoft_dist.data.rng import FeistelPermutation, hash_normal
from dsoft_dist.data.synthetic import VECTOR_DIFFICULTIES, vector_difficulty

_DIGEST = ("from dsoft_dist.data import SyntheticIdentities as S; import hashlib, sys; "
           "s = S(1000, image_size={size}, seed=3); "
           "sys.stdout.write(hashlib.sha256(b''.join(s.sample(i, j).tobytes() for i, j in [(0, 0), (7, 5), (999, 2)])).hexdigest())")


@pytest.mark.parametrize("size", [32, 112])
def test_same_seed_identity_sample_gives_identical_pixels_in_another_process(size):
    s = SyntheticIdentities(1000, image_size=size, seed=3)
    here = hashlib.sha256(b"".join(s.sample(i, j).tobytes() for i, j in [(0, 0), (7, 5), (999, 2)])).hexdigest()
    other = subprocess.run([sys.executable, "-c", _DIGEST.format(size=size)], capture_output=True, text=True,
                           check=True).stdout
    assert here == other
    img = s.sample(7, 5)
    assert img.shape == (size, size, 3) and img.dtype == np.uint8 and img.std() > 10
    assert not np.array_equal(img, s.sample(7, 6)), "samples of one identity must vary"
    assert not np.array_equal(img, SyntheticIdentities(1000, image_size=size, seed=4).sample(7, 5))


def test_train_and_eval_identity_ranges_are_disjoint():
    train = SyntheticIdentities(10_000_000, image_size=32)
    test = SyntheticIdentities(1000, image_size=32, identity_offset=EVAL_IDENTITY_OFFSET)
    train_ids = {train.global_id(i) for i in (0, 1, 9_999_999)}
    eval_ids = {test.global_id(i) for i in (0, 999)}
    assert max(train_ids) < min(eval_ids) and not train_ids & eval_ids
    assert not np.array_equal(train.identity_params(0), test.identity_params(0))
    with pytest.raises(IndexError, match=r"identity=1000 outside \[0, 1000\)"):
        test.sample(1000, 0)


def test_identity_is_what_samples_share():
    """Without pose/light nuisance, two samples of one identity are closer in the face region
    (the background is a per-sample nuisance) than samples of two identities."""
    calm = Difficulty(rotation_deg=0, scale=0, shift=0, yaw=0, illumination=0, blur=0, noise=0.02,
                      occlusion=0, flip=0)
    s = SyntheticIdentities(50, image_size=32, difficulty=calm)
    face = lambda i, j: s.sample(i, j)[10:22, 10:22].astype(float)  # noqa: E731
    same = np.mean([np.abs(face(i, 0) - face(i, 1)).mean() for i in range(20)])
    diff = np.mean([np.abs(face(i, 0) - face(i + 1, 0)).mean() for i in range(20)])
    assert same * 3 < diff


def test_bad_knobs_are_rejected():
    with pytest.raises(ValueError, match="Difficulty.flip=2"):
        Difficulty(flip=2)
    with pytest.raises(ValueError, match="difficulty='insane' is unknown"):
        SyntheticIdentities(10, difficulty="insane")
    with pytest.raises(ValueError, match="num_identities=0"):
        SyntheticVectors(0)


def test_vectors_are_deterministic_and_cheap_at_millions_of_classes():
    v = SyntheticVectors(5_000_000, dim=64, seed=1)
    ids = np.array([0, 4_999_999, 123_456, 123_456])
    x = v.batch(ids, [0, 0, 0, 1])
    assert x.shape == (4, 64) and x.dtype == np.float32
    assert np.array_equal(x[2], v.sample(123_456, 0))
    assert np.array_equal(x, SyntheticVectors(5_000_000, dim=64, seed=1).batch(ids, [0, 0, 0, 1]))
    same = np.linalg.norm(x[2] - x[3])
    diff = np.linalg.norm(x[0] - x[1])
    assert same < diff
    ev = SyntheticVectors(10, dim=64, seed=1, identity_offset=EVAL_IDENTITY_OFFSET)
    assert not np.allclose(ev.sample(0, 0), v.sample(0, 0))


def test_counter_rng_and_permutation():
    z = hash_normal((5, np.arange(1000)), 8)
    assert abs(z.mean()) < 0.05 and abs(z.std() - 1) < 0.05
    assert np.array_equal(z, hash_normal((5, np.arange(1000)), 8))
    for n in (1, 2, 7, 1000, 4097):
        p = FeistelPermutation(n, key=3)(np.arange(n))
        assert sorted(p.tolist()) == list(range(n))
    assert FeistelPermutation(1000, 3)(np.arange(1000)).tolist() != FeistelPermutation(1000, 4)(np.arange(1000)).tolist()


@pytest.mark.parametrize("mode", ["images", "vectors"])
def test_synthetic_loader_splits_an_epoch_exactly_across_ranks(mode):
    cfg = DataConfig(num_classes=12, samples_per_class=4, image_size=32, batch_size=6, num_workers=2,
                     synthetic_mode=mode, vector_dim=16)
    seen = []
    for rank in range(2):
        loader = build_train_loader(cfg, rank, 2, epoch=0)
        batches = list(loader)
        assert len(batches) == len(loader) == 4
        for x, y in batches:
            assert x.shape == ((6, 3, 32, 32) if mode == "images" else (6, 16))
            seen += y.tolist()
    assert sorted(seen) == sorted(list(range(12)) * 4)
    again = [y.tolist() for _, y in build_train_loader(cfg, 1, 2, epoch=0)]
    assert again == [y.tolist() for _, y in build_train_loader(cfg, 1, 2, epoch=0)]
    assert again != [y.tolist() for _, y in build_train_loader(cfg, 1, 2, epoch=1)]


@pytest.mark.parametrize("level", ["easy", "medium", "hard"])
def test_vector_mode_takes_its_nuisance_and_noise_from_data_difficulty(level):
    cfg = DataConfig(synthetic_mode="vectors", vector_dim=16, num_classes=10, samples_per_class=3, batch_size=6,
                     num_workers=0, difficulty=level)
    loader = build_train_loader(cfg, 0, 1, 0, keys=True)
    x, y = next(iter(loader))
    ids, idx = zip(*(map(int, key.split("-")) for key in loader.batch_keys.pop()))
    assert y.tolist() == list(ids)
    want = SyntheticVectors(10, dim=16, seed=0, **vector_difficulty(level)).batch(ids, idx)
    assert np.array_equal(x.numpy(), want)
    assert VECTOR_DIFFICULTIES["medium"] == {"nuisance": 0.3, "noise": 0.05}  # SyntheticVectors' defaults
    with pytest.raises(ValueError, match="difficulty='extreme' is unknown"):
        vector_difficulty("extreme")
