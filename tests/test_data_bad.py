"""Bad data: corrupt JPEG, truncated tar, bad/missing labels are counted and skipped, or fail fast."""
from __future__ import annotations

import io
import logging
import os

import pytest
from torch.utils.data import DataLoader

from dsoft_dist.config.schema import DataConfig
from dsoft_dist.data import build_train_loader
from dsoft_dist.data.datasets import ShardStream, Slot, raise_if_failed
from dsoft_dist.data.decode import FAST_JPEG
from dsoft_dist.errors import BadDataError
from dsoft_dist.observability import get_logger
from tests.test_data_fixtures import jpeg_bytes, write_shards

BAD = {2: {"jpg": jpeg_bytes(2)[:60]},  # truncated JPEG data
       5: {"jpg": b"\xff\xd8\xff\xe0 this is not a jpeg at all"},
       7: {"cls": 999},  # outside [0, 12)
       9: {"cls": None},  # no label
       10: {"cls": b"cat"}}  # not an integer


def _run(urls, counts, policy="skip", workers=1, use_fast=True):
    stream = ShardStream(urls, counts, num_classes=12, image_size=8, slot=Slot(), chunk=4, policy=policy,
                         use_fast_jpeg=use_fast)
    labels, stats = [], {}
    for chunk in DataLoader(stream, batch_size=None, num_workers=workers):
        raise_if_failed(chunk.stats)
        labels += chunk.labels.tolist()
        stats[chunk.stats["worker"]] = chunk.stats
    bad = {}
    for s in stats.values():
        for kind, n in s["bad"].items():
            bad[kind] = bad.get(kind, 0) + n
    return sorted(labels), {k: v for k, v in bad.items() if v}


@pytest.mark.parametrize("use_fast", sorted({False, FAST_JPEG}))
def test_bad_samples_are_counted_and_skipped(tmp_path, use_fast):
    urls = write_shards(str(tmp_path), [4, 4, 4], overrides=BAD)
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    get_logger("dsoft_dist.data.shards").addHandler(handler)
    try:
        labels, bad = _run(urls, [4, 4, 4], use_fast=use_fast, workers=0)
    finally:
        get_logger("dsoft_dist.data.shards").removeHandler(handler)
    assert labels == [0, 1, 3, 4, 6, 8, 11]
    assert bad == {"corrupt_image": 2, "bad_label": 2, "missing_label": 1}
    err = stream.getvalue()
    assert "label 999 outside [0, num_classes=12)" in err and "shard-0000.tar #2" in err


@pytest.mark.parametrize("bad_index, message", [(2, "does not decode"), (7, "label 999 outside"),
                                                (9, "has no cls/label")])
def test_strict_policy_fails_fast_with_a_clear_message(tmp_path, bad_index, message):
    urls = write_shards(str(tmp_path), [6, 6], overrides={bad_index: BAD[bad_index]})
    with pytest.raises(BadDataError, match=f"(?s){message}.*data.bad_data=skip"):
        _run(urls, [6, 6], policy="fail", workers=1)


def test_truncated_tar_is_counted_and_earlier_samples_kept(tmp_path):
    urls = write_shards(str(tmp_path), [5, 5])
    size = os.path.getsize(urls[1])
    with open(urls[1], "r+b") as f:
        f.truncate(int(size * 0.55))  # cuts inside a member of the second shard
    for counts in ([5, 5], None):
        labels, bad = _run(urls, counts, workers=2)
        assert labels[:5] == [0, 1, 2, 3, 4] and 5 <= len(labels) < 10
        assert bad == {"truncated_shard": 10 - len(labels) if counts else 1}  # the lost samples; unknown: 1
    with pytest.raises(BadDataError, match="shard-0001.tar.*truncated"):
        _run(urls, [5, 5], policy="fail", workers=0)


def test_tar_cut_at_a_member_boundary_is_caught_by_the_manifest_count(tmp_path):
    urls = write_shards(str(tmp_path), [4, 4])
    with open(urls[0], "r+b") as f:
        f.truncate(2 * 3 * 512)  # two whole samples (jpg + cls, 512-byte blocks) and no end blocks
    labels, bad = _run(urls, [4, 4], workers=0)
    assert bad == {"truncated_shard": 8 - len(labels)} and labels[-4:] == [4, 5, 6, 7]  # read + lost = 8


def test_loader_tops_up_a_short_rank_and_reports_counts(tmp_path):
    write_shards(str(tmp_path), [4, 4, 4], overrides={k: BAD[k] for k in (2, 7, 9)})
    cfg = DataConfig(source="webdataset", manifest=str(tmp_path), num_classes=12, image_size=8, batch_size=4,
                     num_workers=2)
    loader = build_train_loader(cfg, 0, 1, epoch=0)
    batches = list(loader)
    assert len(batches) == 3 and all(len(y) == 4 for _, y in batches)
    c = loader.counters
    assert c["bad"] == {"corrupt_image": 1, "bad_label": 1, "missing_label": 1} and c["bad_total"] == 3
    assert c["padded"] >= 3
    cfg.bad_data = "fail"
    with pytest.raises(BadDataError):
        list(build_train_loader(cfg, 0, 1, epoch=0))
