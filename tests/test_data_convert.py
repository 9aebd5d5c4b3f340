"""Converters, manifests, the `dsoft data` CLI, verification .bin files and pair lists."""
from __future__ import annotations

import json
import os
import pickle

import webdataset as wds

from dsoft_dist.cli import main
from dsoft_dist.config.schema import DataConfig
from dsoft_dist.data import build_train_loader, load_manifest
from dsoft_dist.data.decode import decode_image
from dsoft_dist.data.manifest import verify_shards
from dsoft_dist.data.verification import read_pair_list
from tests.test_data_fixtures import jpeg_bytes


def _folder(root, identities=4, per=3):
    for c in range(identities):
        os.makedirs(root / f"person_{c}", exist_ok=True)
        for j in range(per):
            (root / f"person_{c}" / f"{j}.jpg").write_bytes(jpeg_bytes(10 * c + j, size=12))
    (root / "person_0" / "notes.txt").write_text("ignored")
    (root / "person_1" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 broken")


def test_from_folder_writes_shards_manifest_and_class_names(tmp_path):
    _folder(tmp_path / "faces")
    out = tmp_path / "wds"
    assert main(["data", "from-folder", str(tmp_path / "faces"), str(out), "--per-shard", "5", "--workers", "2",
                 "--check-decode", "--no-progress"]) == 0
    m = load_manifest(str(out))
    assert (m.num_classes, m.num_samples, len(m.shards), m.bad_samples) == (4, 12, 3, 1)
    assert m.image_size == [12, 12] and verify_shards(m) == []
    assert (out / "classes.tsv").read_text().splitlines()[2] == "2\tperson_2"
    labels = sorted(int(s["cls"]) for p in m.shard_paths() for s in wds.WebDataset(p, shardshuffle=False))
    assert labels == sorted(list(range(4)) * 3)
    # a damaged shard is caught by `dsoft data verify`
    with open(m.shard_paths()[0], "r+b") as f:
        f.seek(600)
        f.write(b"XXXX")
    assert verify_shards(load_manifest(str(out)))[0].endswith("sha256 mismatch (file changed or truncated)")
    assert main(["data", "verify", str(out)]) == 1


def test_synth_cli_is_restartable_and_trains_through_the_loader(tmp_path):
    out = tmp_path / "synth"
    args = ["data", "synth", str(out), "--identities", "6", "--samples-per-identity", "4", "--image-size", "32",
            "--per-shard", "5", "--workers", "2", "--no-progress"]
    assert main(args) == 0
    m = load_manifest(str(out))
    assert (m.num_classes, m.num_samples, len(m.shards), m.image_size) == (6, 24, 5, [32, 32])
    first = json.loads((out / "manifest.json").read_text())
    os.remove(m.shard_paths()[2])  # an interrupted run: one shard missing
    mtime = os.path.getmtime(m.shard_paths()[0])
    assert main(args) == 0
    assert os.path.getmtime(m.shard_paths()[0]) == mtime, "finished shards must be kept on restart"
    assert json.loads((out / "manifest.json").read_text()) == first, "the rewritten shard must be identical"
    cfg = DataConfig(source="webdataset", manifest=str(out / "manifest.json"), num_classes=6, image_size=32,
                     batch_size=4, num_workers=1)
    batches = list(build_train_loader(cfg, 0, 2, epoch=0))
    assert len(batches) == 3 and batches[0][0].shape == (4, 3, 32, 32)


def test_make_bin_from_synthetic_folder_and_shards(tmp_path):
    out = tmp_path / "eval.bin"
    assert main(["data", "make-bin", str(out), "--synthetic", "8", "--per-identity", "3", "--pairs", "20",
                 "--image-size", "32"]) == 0
    with open(out, "rb") as f:
        bins, issame = pickle.load(f)
    assert len(bins) == 40 and len(issame) == 20 and sum(issame) == 10
    assert all(isinstance(b, bytes) for b in bins) and all(isinstance(s, bool) for s in issame)
    assert decode_image(bins[0]).shape == (32, 32, 3)
    _folder(tmp_path / "faces")
    assert main(["data", "make-bin", str(tmp_path / "f.bin"), "--folder", str(tmp_path / "faces"),
                 "--pairs", "10"]) == 0
    assert main(["data", "synth", str(tmp_path / "s"), "--identities", "4", "--samples-per-identity", "3",
                 "--image-size", "16", "--eval", "--no-progress"]) == 0
    pairs_file = tmp_path / "lists" / "pairs.txt"
    assert main(["data", "make-bin", str(pairs_file), "--shards", str(tmp_path / "s"), "--pairs", "12"]) == 0
    pairs = read_pair_list(str(pairs_file))
    assert len(pairs) == 12 and sum(same for _, _, same in pairs) == 6
    assert all(os.path.exists(a) and os.path.exists(b) for a, b, _ in pairs)
    for a, b, same in pairs:  # file names start with the label
        assert (os.path.basename(a).split("_")[0] == os.path.basename(b).split("_")[0]) == same


def test_make_bin_needs_enough_identities(tmp_path, capsys):
    assert main(["data", "make-bin", str(tmp_path / "x.bin"), "--synthetic", "1", "--per-identity", "1",
                 "--pairs", "10"]) == 2  # dsoft's main turns the ValueError into one line
    assert "dsoft data make-bin: error: cannot build 10 pairs" in capsys.readouterr().err
