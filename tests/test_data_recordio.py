"""InsightFace RecordIO without mxnet: write .rec/.idx in the documented layout, convert, compare bytes."""
from __future__ import annotations

import struct

import numpy as np
import pytest
import webdataset as wds

from dsoft_dist.data import load_manifest
from dsoft_dist.data.convert import from_rec
from dsoft_dist.data.recordio import (
    MAGIC,
    IRHeader,
    RecordIOError,
    RecordReader,
    RecordWriter,
    pack,
    unpack,
    write_insightface_rec,
)
from dsoft_dist.errors import BadDataError
from tests.test_data_fixtures import jpeg_bytes

MAGIC_BYTES = struct.pack("<I", MAGIC)


def _dataset(num_classes=5, per_class=3):
    images, labels = [], []
    for c in range(num_classes):
        for j in range(per_class):
            images.append(jpeg_bytes(100 * c + j, size=16))
            labels.append(c)
    # a payload holding the magic at 4-aligned offsets forces a multi-part (cflag 1/2/3) record
    images[4] = images[4][:8] + MAGIC_BYTES + images[4][8:20] + MAGIC_BYTES + images[4][20:]
    return images, labels


def test_record_layout_is_mxnet_compatible(tmp_path):
    rec = str(tmp_path / "x.rec")
    with RecordWriter(rec) as w:
        w.write(0, b"abcde")  # 5 bytes: one part, padded to 8
        w.write(1, b"12345678" + MAGIC_BYTES + b"xy")
    raw = open(rec, "rb").read()
    assert raw[:8] == struct.pack("<II", MAGIC, 5) and raw[8:16] == b"abcde\0\0\0"
    assert raw[16:24] == struct.pack("<II", MAGIC, (1 << 29) | 8)  # first part, cflag 1
    assert raw[32:40] == struct.pack("<II", MAGIC, (3 << 29) | 2)  # last part, cflag 3
    assert open(str(tmp_path / "x.idx")).read() == "0\t0\n1\t16\n"
    reader = RecordReader(rec)
    assert reader.read(0) == b"abcde" and reader.read(1) == b"12345678" + MAGIC_BYTES + b"xy"
    head, payload = unpack(pack(IRHeader(0, 3.0, 7, 0), b"img"))
    assert (head.flag, head.label, head.id, payload) == (0, 3.0, 7, b"img")
    head, payload = unpack(pack(IRHeader(2, np.array([4.0, 1.0], np.float32)), b"img"))
    assert head.flag == 2 and head.label.tolist() == [4.0, 1.0] and payload == b"img"


def test_from_rec_round_trips_every_image_byte_for_byte(tmp_path):
    images, labels = _dataset()
    rec = str(tmp_path / "train.rec")
    write_insightface_rec(rec, images, labels)
    reader = RecordReader(rec)
    assert reader.header0 == (16, 21) and reader.num_classes() == 5 and reader.image_keys() == list(range(1, 16))
    manifest = from_rec(rec, str(tmp_path / "out"), per_shard=4, workers=2, progress=False)
    assert manifest.num_classes == 5 and manifest.num_samples == 15 and len(manifest.shards) == 4
    assert load_manifest(str(tmp_path / "out")).image_size == [16, 16]
    got = {}
    for path in manifest.shard_paths():
        for sample in wds.WebDataset(path, shardshuffle=False, empty_check=False):
            got[int(sample["__key__"])] = (sample["jpg"], int(sample["cls"]))
    assert got == {i + 1: (img, label) for i, (img, label) in enumerate(zip(images, labels))}


def test_corrupt_record_is_reported_with_its_index(tmp_path, caplog):
    images, labels = _dataset()
    rec = str(tmp_path / "train.rec")
    write_insightface_rec(rec, images, labels)
    offsets = RecordReader(rec).index
    with open(rec, "r+b") as f:  # break the magic of record 7
        f.seek(offsets[7])
        f.write(b"\0\0\0\0")
    with pytest.raises(RecordIOError, match="record 7 at offset"):
        RecordReader(rec).read(7)
    manifest = from_rec(rec, str(tmp_path / "skip"), per_shard=100, progress=False)
    assert manifest.num_samples == 14 and manifest.bad_samples == 1
    with pytest.raises(BadDataError, match="record 7 at offset .* bad magic"):
        from_rec(rec, str(tmp_path / "fail"), per_shard=100, policy="fail", progress=False)


def test_rec_without_header_record_and_missing_idx(tmp_path):
    rec = str(tmp_path / "plain.rec")
    with RecordWriter(rec) as w:
        for i in range(4):
            w.write(i, pack(IRHeader(0, float(i % 2 + 1)), jpeg_bytes(i)))
    manifest = from_rec(rec, str(tmp_path / "out"), progress=False)
    assert manifest.num_classes == 3 and manifest.num_samples == 4
    with pytest.raises(FileNotFoundError, match="train.idx"):
        RecordReader(str(tmp_path / "missing.rec"))
