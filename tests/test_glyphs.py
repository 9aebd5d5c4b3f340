"""Glyph identities (data.synthetic_mode=glyphs): deterministic pixels, a seeded identity mapping, disjoint
train and eval characters, no look-alikes, range errors, shape over nuisance, and the trainer on them."""
from __future__ import annotations

import hashlib
import json
import math
import subprocess
import sys
import unicodedata

import numpy as np
import pytest

from dsoft_dist.cli import main
from dsoft_dist.config import config_from_dict
from dsoft_dist.config.demo import DEMO_CONFIG
from dsoft_dist.config.schema import DataConfig
from dsoft_dist.data import EVAL_IDENTITY_OFFSET, build_train_loader
from dsoft_dist.data.glyphs import (
    LOOKALIKE_PIXELS,
    MIN_STYLES,
    GlyphIdentities,
    _bitmap,
    glyph_capacity,
    glyph_set,
)
from dsoft_dist.data.sources import synthetic_identity
from dsoft_dist.errors import ConfigError
from dsoft_dist.registry import DATA_SOURCES

_PAIRS = [(0, 0), (7, 5), (49, 2)]
_DIGEST = ("from dsoft_dist.data.glyphs import GlyphIdentities as G; import hashlib, sys; "
           "g = G(50, image_size=32, seed=3); "
           f"sys.stdout.write(hashlib.sha256(b''.join(g.sample(i, j).tobytes() for i, j in {_PAIRS})).hexdigest())")


def test_same_arguments_give_identical_pixels_in_another_process():
    g = GlyphIdentities(50, image_size=32, seed=3)
    here = hashlib.sha256(b"".join(g.sample(i, j).tobytes() for i, j in _PAIRS)).hexdigest()
    other = subprocess.run([sys.executable, "-c", _DIGEST], capture_output=True, text=True, check=True).stdout
    assert here == other
    img = g.sample(7, 5)
    assert img.shape == (32, 32, 3) and img.dtype == np.uint8 and img.std() > 10
    assert np.array_equal(img, GlyphIdentities(50, image_size=32, seed=3).sample(7, 5))
    assert not np.array_equal(img, g.sample(7, 6)), "samples of one identity must vary"
    assert GlyphIdentities(3, image_size=24, difficulty="hard").samples([0, 2], [1, 1]).shape == (2, 24, 24, 3)


def test_the_seed_chooses_the_characters():
    a, b = GlyphIdentities(50, seed=0), GlyphIdentities(50, seed=1)
    chars_a, chars_b = [a.char(i) for i in range(50)], [b.char(i) for i in range(50)]
    assert len(set(chars_a)) == 50 and sum(x == y for x, y in zip(chars_a, chars_b)) < 5
    assert chars_a == [GlyphIdentities(50, seed=0).char(i) for i in range(50)]


@pytest.mark.parametrize("seed", [0, 5])
def test_train_and_eval_characters_never_overlap(seed):
    cap = glyph_capacity()
    assert cap["train"] + cap["eval"] == cap["total"] == len(glyph_set().chars) and cap["train"] > 2000
    train = GlyphIdentities(cap["train"], seed=seed)
    unseen = GlyphIdentities(cap["eval"], seed=seed, identity_offset=EVAL_IDENTITY_OFFSET)
    train_chars = {train.char(i) for i in range(len(train))}
    eval_chars = {unseen.char(i) for i in range(len(unseen))}
    assert not train_chars & eval_chars
    assert len(train_chars | eval_chars) == cap["total"]  # every character used once


def test_the_set_has_no_lookalikes_or_empty_glyphs():
    chars, styles = glyph_set()
    assert "A" in chars and "\u0391" not in chars and "\u0410" not in chars  # Latin A; Greek Alpha, Cyrillic A
    assert "o" in chars and "\u03bf" not in chars and "\u2800" not in chars  # omicron; the blank braille cell
    assert "\u00c0" in chars and "\u00c1" in chars  # A-grave and A-acute differ by their accent only: both stay
    assert [ord(c) for c in chars] == sorted(ord(c) for c in chars)
    assert all(unicodedata.category(c)[0] in "LNSP" for c in chars)
    assert min(len(s) for s in styles) >= MIN_STYLES
    bits = np.stack([_bitmap(c, s[0]) for c, s in zip(chars, styles)]).astype(np.float32) * 2 - 1
    distance = (bits.shape[1] - bits @ bits.T) / 2  # Hamming distances of every pair of kept characters
    np.fill_diagonal(distance, np.inf)
    assert distance.min() > LOOKALIKE_PIXELS
    assert ((bits > 0).sum(1) >= 4).all()


def test_identities_outside_the_set_are_refused():
    cap = glyph_capacity()
    with pytest.raises(ValueError, match=rf"num_identities={cap['train'] + 1} exceeds the {cap['train']} train"):
        GlyphIdentities(cap["train"] + 1)
    with pytest.raises(ValueError, match=r"identity_offset=2380 \+ num_identities=10 exceeds"):
        GlyphIdentities(10, identity_offset=2380)
    with pytest.raises(ValueError, match=rf"exceeds the {cap['eval']} eval identities"):
        GlyphIdentities(cap["eval"] + 1, identity_offset=EVAL_IDENTITY_OFFSET)
    with pytest.raises(ValueError, match="num_identities=0 is invalid"):
        GlyphIdentities(0)
    with pytest.raises(ValueError, match="image_size=4 is invalid"):
        GlyphIdentities(10, image_size=4)
    with pytest.raises(IndexError, match=r"identity=10 outside \[0, 10\)"):
        GlyphIdentities(10).sample(10, 0)
    check = DATA_SOURCES.get("synthetic").check
    with pytest.raises(ValueError, match=rf"data.num_classes=5000 is invalid .* <= {cap['train']}"):
        check(DataConfig(synthetic_mode="glyphs", num_classes=5000))
    check(DataConfig(synthetic_mode="glyphs", num_classes=cap["train"]))
    check(DataConfig(num_classes=5000))  # face-like identities have no such limit


def _unit_gray(images: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) uint8 -> (N, H*W) gray, zero mean, unit norm."""
    g = images.astype(np.float64).mean(-1).reshape(len(images), -1)
    g -= g.mean(1, keepdims=True)
    return g / np.linalg.norm(g, axis=1, keepdims=True)


def test_two_samples_of_a_character_are_closer_than_two_characters():
    """At difficulty easy, in pixel space: colors are a per-sample nuisance (either polarity), so images are
    compared gray, standardized and up to sign; the shape is what samples of one identity share."""
    identities, per = 12, 6
    g = GlyphIdentities(identities, seed=1, difficulty="easy")
    x = _unit_gray(np.stack([g.sample(i, j) for i in range(identities) for j in range(per)]))  # (72, 1024)
    dist = np.sqrt(np.maximum(0.0, 2 - 2 * np.abs(x @ x.T)))
    label = np.repeat(np.arange(identities), per)
    same, other = label[:, None] == label[None, :], ~np.eye(len(x), dtype=bool)
    intra, inter = dist[same & other].mean(), dist[~same].mean()
    assert intra < 0.85 * inter, (intra, inter)


def test_the_loader_streams_glyphs_unmirrored():
    """data.synthetic_mode=glyphs through build_train_loader: the batches are GlyphIdentities' samples,
    normalized, and data.augment_flip (on by default) leaves them unmirrored (a mirrored b is a d)."""
    cfg = DataConfig(synthetic_mode="glyphs", num_classes=20, samples_per_class=2, image_size=32, batch_size=8,
                     num_workers=1, seed=4)
    assert cfg.augment_flip
    loader = build_train_loader(cfg, rank=0, world_size=1, epoch=0, keys=True)
    g = GlyphIdentities(20, image_size=32, seed=4)
    for images, labels in loader:
        assert images.shape == (8, 3, 32, 32)
        for img, label, key in zip(images, labels, loader.batch_keys[-1]):
            identity, index = map(int, key.split("-"))
            expected = (g.sample(identity, index).astype(np.float32) / 255 - 0.5) / 0.5
            assert identity == int(label) and np.allclose(img.permute(1, 2, 0).numpy(), expected, atol=1e-6)
    identity = synthetic_identity(cfg)
    assert identity["synthetic_mode"] == "glyphs" and len(identity["glyph_set"]) == 16


def test_face_verification_pairs_are_refused_for_a_glyph_run():
    demo = {**DEMO_CONFIG, "data": {**DEMO_CONFIG["data"], "synthetic_mode": "glyphs"}}
    with pytest.raises(ConfigError, match="eval.synthetic_identities=100 is invalid: the synthetic verification "
                                          "pairs are face-like images"):
        config_from_dict(demo)
    config_from_dict({**demo, "eval": {**demo["eval"], "synthetic_identities": 0}})


def test_dsoft_train_on_glyphs_ends_with_a_finite_loss(tmp_path):
    out = tmp_path / "run"
    sets = ["data.synthetic_mode=glyphs", "eval.synthetic_identities=0", "data.num_classes=40",
            "data.batch_size=16", "schedule.steps=4", "schedule.warmup_steps=1", "logging.log_every=1",
            "logging.progress=false", f"logging.output_dir={out}"]
    assert main(["train", "--config", "configs/demo.yaml", "--nproc", "1"]
                + [a for s in sets for a in ("--set", s)]) == 0
    report = json.loads((out / "report.json").read_text())
    losses = [row["loss"] for row in report["log"]]
    assert [row["step"] for row in report["log"]] == [1, 2, 3, 4] and all(map(math.isfinite, losses))
    assert "40 synthetic training identities (glyphs)" in (out / "report.md").read_text()
