"""Converter reruns never mix two conversions in one folder, `dsoft data verify` finds mixed data, and a
conversion's redirected stderr holds log lines only (bars are for terminals).

A rerun resumes only the conversion recorded in OUT (same source listing, options, converter version);
another source, a changed listing or option, or shards of an older dsoft without a record are refused
with one line pointing at --overwrite, which replaces everything (no stale shard, no stale classes.tsv).
"""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import webdataset as wds

from dsoft_dist.cli import main
from dsoft_dist.data import load_manifest
from dsoft_dist.data.recordio import write_insightface_rec
from dsoft_dist.data.vectors import from_npy
from tests.terminal import DSOFT, on_a_terminal
from tests.test_data_fixtures import jpeg_bytes


def _identity(root, name: str, images: int, seed: int) -> None:
    os.makedirs(root / name, exist_ok=True)
    for j in range(images):
        (root / name / f"{j}.jpg").write_bytes(jpeg_bytes(seed + j, size=12))


def _faces(root, identities=3, per=4):
    for c in range(identities):
        _identity(root, f"person_{c}", per, 10 * c)
    return root


def _files(folder) -> dict[str, bytes]:
    """Every file under folder (hidden .parts included) by relative path -> bytes."""
    out = {}
    for dirpath, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = f.read()
    return out


def _convert(src, out, *extra) -> int:
    return main(["data", "from-folder", str(src), str(out), "--per-shard", "4", "--no-progress", *extra])


def _error_line(capfd) -> str:
    lines = [ln for ln in capfd.readouterr().err.splitlines() if "error:" in ln]
    assert len(lines) == 1, lines
    return lines[0]


def test_rerun_after_adding_an_identity_is_refused_and_out_is_unchanged(tmp_path, capfd):
    src, out = _faces(tmp_path / "faces"), tmp_path / "wds"
    assert _convert(src, out) == 0
    before = _files(out)
    _identity(src, "aaron", 4, 500)  # sorts first: every earlier label would now name another identity
    assert _convert(src, out) == 2
    line = _error_line(capfd)
    assert "holds another conversion" in line and "source.listing" in line and "--overwrite" in line
    assert _files(out) == before, "a refused rerun must leave OUT as it was"


def test_a_different_source_or_option_into_an_existing_out_is_refused(tmp_path, capfd):
    out = tmp_path / "wds"
    assert _convert(_faces(tmp_path / "a"), out) == 0
    before = _files(out)
    assert _convert(_faces(tmp_path / "b", identities=5), out) == 2
    assert "source.path" in _error_line(capfd)
    assert _convert(tmp_path / "a", out, "--seed", "7") == 2
    assert "source.shuffle_seed 0 -> 7" in _error_line(capfd)
    assert _convert(tmp_path / "a", out, "--per-shard", "5") == 2  # the later --per-shard wins
    assert "per_shard 4 -> 5" in _error_line(capfd)
    # another converter into the same folder: synthetic identities (no classes.tsv of theirs)
    assert main(["data", "synth", str(out), "--identities", "3", "--samples-per-identity", "2", "--image-size",
                 "12", "--no-progress"]) == 2
    assert "--overwrite" in _error_line(capfd)
    assert _files(out) == before


def test_out_of_an_older_dsoft_without_a_fingerprint_is_refused(tmp_path, capfd):
    src, out = _faces(tmp_path / "faces"), tmp_path / "wds"
    assert _convert(src, out) == 0
    # what the older converter left: shards, sidecars and a manifest, none with a fingerprint
    (out / ".parts" / "conversion.json").unlink(missing_ok=True)
    for path in [out / "manifest.json", *(out / ".parts").glob("*.json")]:
        record = json.loads(path.read_text())
        record.pop("fingerprint", None)
        path.write_text(json.dumps(record))
    before = _files(out)
    assert _convert(src, out) == 2
    assert "recorded no fingerprint" in _error_line(capfd)
    assert _files(out) == before


def test_overwrite_gives_exactly_the_new_data_without_stale_shards(tmp_path, capfd):
    src, out = _faces(tmp_path / "faces"), tmp_path / "wds"
    assert main(["data", "from-folder", str(src), str(out), "--per-shard", "2", "--no-progress"]) == 0
    assert len(load_manifest(str(out)).shards) == 6
    _identity(src, "aaron", 3, 500)
    assert _convert(src, out, "--overwrite") == 0  # 15 images in 4 shards: shards 4 and 5 must go
    m = load_manifest(str(out))
    tars = sorted(n for n in os.listdir(out) if n.endswith(".tar") or n.endswith(".tmp"))
    assert tars == [f"train-{i:06d}.tar" for i in range(4)] == [s.name for s in m.shards]
    assert sorted(os.listdir(out / ".parts")) == ["conversion.json"] + [f"{t}.json" for t in tars]
    names = [line.split("\t")[1] for line in (out / "classes.tsv").read_text().splitlines()]
    assert names == ["aaron", "person_0", "person_1", "person_2"] and m.num_classes == 4
    owner = {p.read_bytes(): p.parent.name for p in src.glob("*/*.jpg")}  # image bytes -> identity folder
    seen = [(names[int(s["cls"])], owner[s["jpg"]]) for p in m.shard_paths()
            for s in wds.WebDataset(p, shardshuffle=False)]
    assert len(seen) == 15 and all(label == folder for label, folder in seen), "a label names another identity"
    assert main(["data", "verify", str(out)]) == 0


def test_identical_rerun_of_a_finished_conversion_is_a_no_op(tmp_path, caplog):
    src, out = _faces(tmp_path / "faces"), tmp_path / "wds"
    assert _convert(src, out) == 0
    before = _files(out)
    caplog.clear()
    assert _convert(src, out) == 0
    assert "nothing to write: " in caplog.text
    assert _files(out) == before


def test_interrupted_conversion_resumes_to_the_same_bytes(tmp_path):
    src = _faces(tmp_path / "faces")
    assert _convert(src, tmp_path / "whole") == 0
    out = tmp_path / "cut"
    assert _convert(src, out) == 0
    # an interruption: no manifest yet, one shard never finished, one renamed without its sidecar
    os.remove(out / "manifest.json")
    os.replace(out / "train-000001.tar", out / "train-000001.tar.tmp")
    os.remove(out / ".parts" / "train-000002.tar.json")
    assert _convert(src, out) == 0
    assert _files(out) == _files(tmp_path / "whole")  # the torn temporary was rewritten and renamed too


def test_rec_and_npy_reruns_compare_their_source(tmp_path, capfd):
    images = [jpeg_bytes(i, size=12) for i in range(8)]
    rec = str(tmp_path / "train.rec")
    write_insightface_rec(rec, images, [i // 2 for i in range(8)])
    args = ["data", "from-rec", rec, str(tmp_path / "r"), "--per-shard", "3", "--no-progress"]
    assert main(args) == 0 and main(args) == 0
    write_insightface_rec(rec, images[:6], [i // 2 for i in range(6)])  # the same path, other records
    assert main(args) == 2 and "source.listing" in _error_line(capfd)
    features = np.random.default_rng(0).standard_normal((10, 4)).astype(np.float32)
    np.save(tmp_path / "f.npy", features)
    np.save(tmp_path / "l.npy", np.arange(10) % 5)
    from_npy(str(tmp_path / "f.npy"), str(tmp_path / "l.npy"), str(tmp_path / "v"), per_shard=4, progress=False)
    np.save(tmp_path / "l.npy", np.arange(10) % 4)  # relabelled: same shape, other classes
    args = ["data", "from-npy", str(tmp_path / "f.npy"), str(tmp_path / "l.npy"), str(tmp_path / "v"),
            "--per-shard", "4", "--no-progress"]
    assert main(args) == 2 and "labels_sha256" in _error_line(capfd)


def test_verify_finds_labels_and_class_tables_of_another_conversion(tmp_path, caplog):
    src, out = _faces(tmp_path / "faces"), tmp_path / "wds"
    assert _convert(src, out) == 0
    assert main(["data", "verify", str(out)]) == 0
    mixed = tmp_path / "mixed"  # the old converter's mix: 3-class shards under a 2-class manifest and class table
    shutil.copytree(out, mixed)
    manifest = json.loads((mixed / "manifest.json").read_text())
    manifest["num_classes"] = 2
    (mixed / "manifest.json").write_text(json.dumps(manifest))
    caplog.clear()
    assert main(["data", "verify", str(mixed)]) == 1
    assert "outside [0, num_classes=2)" in caplog.text and "classes.tsv: 3 rows" in caplog.text
    table = tmp_path / "table"  # a class table of another conversion beside matching shards
    shutil.copytree(out, table)
    with open(table / "classes.tsv", "a", encoding="utf-8") as f:
        f.write("3\tperson_new\n")
    caplog.clear()
    assert main(["data", "verify", str(table), "--no-checksums"]) == 1
    assert "classes.tsv: 4 rows" in caplog.text
    stale = tmp_path / "stale"  # a shard written by another conversion, its sidecar says so
    shutil.copytree(out, stale)
    side = stale / ".parts" / "train-000001.tar.json"
    side.write_text(json.dumps({**json.loads(side.read_text()), "fingerprint": "0" * 64}))
    caplog.clear()
    assert main(["data", "verify", str(stale)]) == 1
    assert "train-000001.tar: written by another conversion" in caplog.text


def test_redirected_conversion_stderr_holds_no_bar(tmp_path, capfd, caplog):
    """Without --no-progress and with stderr not a terminal (captured at the fd), nothing but log lines."""
    assert main(["data", "from-folder", str(_faces(tmp_path / "faces")), str(tmp_path / "wds"), "--per-shard",
                 "4"]) == 0
    err = capfd.readouterr().err
    assert "\r" not in err and "img/s" not in err and "it/s" not in err, err
    assert "wrote 12 samples" in caplog.text


def test_conversion_draws_a_bar_on_a_terminal(tmp_path):
    """The same command with stderr on a pseudo-terminal draws the bar (the real console script)."""
    _faces(tmp_path / "faces")
    rc, drawn = on_a_terminal([DSOFT, "data", "from-folder", str(tmp_path / "faces"), str(tmp_path / "wds"),
                               "--per-shard", "4"], timeout=60)
    assert rc == 0, drawn
    assert "100%" in drawn and "12/12" in drawn and "wrote 12 samples" in drawn, drawn
