"""A shard that becomes unreadable while a run reads it: removed, truncated or replaced mid-epoch.

Real WebDataset shards (tests/test_data_fixtures.py) and a real Trainer, on 1 rank in this process and
on 2 gloo ranks: the run trains k steps, a shard its rank has not read yet is damaged, and the run goes
on. The lost samples are counted exactly (a shard's part, not 1 per shard), the warning names the
shard, the samples and the rank's running count, the metrics' bad_samples counts them, the epoch's
accounting holds (samples read + bad = the rank's part, the fixed batches filled by a top-up pass),
the next epoch skips the shard again, and data.max_bad_samples stops every rank with the same message.
The tests run as root, where chmod 000 does not stop a read: a permission fault is the same
``open`` failure as a removed file (unreadable_shard) and is covered by the removed and directory cases.

    python -m pytest tests/test_data_faults.py -m "slow or not slow"
"""
from __future__ import annotations

import io
import json
import logging
import os

import pytest

from dsoft_dist.config import config_from_dict
from dsoft_dist.config.schema import DataConfig
from dsoft_dist.data.position import mark, new_mask
from dsoft_dist.data.shards import BadData, assign_samples, iter_plan
from dsoft_dist.errors import ConfigError
from dsoft_dist.observability import get_logger
from tests.test_data_fixtures import write_shards

SLOW = pytest.mark.slow(reason="trains two epochs of a tiny model on shards (seconds)")
COUNTS = [8] * 10  # 80 samples; batch 4: 20 batches per epoch on 1 rank, 10 on 2 ranks (no tail to drop)


def fault_cfg(root, out, workers: int = 0, nproc: int = 1, steps: int = 40, **data) -> dict:
    """A tiny image run on the shards in ``root`` (no shuffle buffer: a shard is read when its batches are due)."""
    return {"name": "faults", "seed": 0, "model": {"name": "iresnet_tiny", "embedding_size": 8, "input_size": 16},
            "head": {"loss": "d_softmax", "negatives": "all", "scale": 16.0},
            "data": {"source": "webdataset", "manifest": os.path.join(root, "manifest.json"), "num_classes": 80,
                     "image_size": 16, "batch_size": 4, "num_workers": workers, "shuffle_buffer": 0, **data},
            "optimizer": {"name": "sgd", "lr": 0.1}, "schedule": {"steps": steps, "warmup_steps": 0},
            "parallel": {"nproc": nproc, "backend": "gloo"}, "checkpoint": {"every_minutes": 0},
            "logging": {"log_every": 1, "progress": False, "output_dir": str(out)}}


def last_shard(rank: int, world: int, workers: int) -> int:
    """The shard the rank's last worker reads last in epoch 0: not read after a few steps."""
    return assign_samples(COUNTS, rank, world, max(workers, 1) - 1, max(workers, 1), epoch=0, seed=0)[-1][0]


def damage(path: str, how: str) -> None:
    """removed | truncated (cut inside a member) | directory (a folder where the shard was)."""
    if how == "truncated":
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
        return
    os.remove(path)
    if how == "directory":
        os.mkdir(path)


class Warnings:
    """The data loader's warnings, as text (the project's loggers do not propagate to pytest's caplog)."""

    def __enter__(self):
        self.stream, self.logger = io.StringIO(), get_logger("dsoft_dist.data.pipeline")
        self.handler = logging.StreamHandler(self.stream)
        self.logger.addHandler(self.handler)
        return self

    def __exit__(self, *exc):
        self.logger.removeHandler(self.handler)

    def lines(self, text: str) -> list[str]:
        return [line for line in self.stream.getvalue().splitlines() if text in line]


def test_max_bad_samples_is_checked():
    assert DataConfig(max_bad_samples=3).max_bad_samples == 3
    with pytest.raises(ConfigError, match="data.max_bad_samples=-1.*>= 0"):
        DataConfig(max_bad_samples=-1)
    with pytest.raises(ConfigError, match="data.max_bad_samples=3.*data.bad_data=fail"):
        DataConfig(max_bad_samples=3, bad_data="fail")


def test_a_lost_shard_counts_its_samples_left_in_the_epoch(tmp_path):
    paths = write_shards(str(tmp_path), [8, 8], size=8, num_classes=16)
    os.remove(paths[1])
    done = new_mask(16)
    mark(done, [8, 9, 10])  # an interrupted epoch already trained on three of the lost shard's samples
    for done_mask, lost in ((None, 8), (done, 5)):
        bad = BadData("skip", log_shards=False)
        got = [s["__id__"] for s in iter_plan(paths, [(0, 0, 8), (1, 0, 8)], bad, [8, 8], done_mask)]
        assert got == list(range(8)) and bad.counts["unreadable_shard"] == lost
        assert [(e[0], e[1], e[2]) for e in bad.events] == [("unreadable_shard", paths[1], lost)]
    bad = BadData("skip", log_shards=False)  # without a manifest the count is unknown: the shard counts 1
    assert len(list(iter_plan(paths, [(0, 0, -1), (1, 0, -1)], bad))) == 8 and bad.total() == 1
    assert "unknown number" in bad.events[0][3]


def _train_through_a_fault(tmp_path, workers: int, how: str):
    """1 rank: 2 steps, the damage, the rest of epoch 0 (checked), then epoch 1. Returns what it saw."""
    from dsoft_dist.parallel.processes import distributed
    from dsoft_dist.train.trainer import Trainer

    root = tmp_path / "shards"
    paths = write_shards(str(root), COUNTS, size=16, num_classes=80)
    victim = paths[last_shard(0, 1, workers)]
    cfg = config_from_dict(fault_cfg(root, tmp_path / "run", workers))
    with Warnings() as warned, distributed("gloo") as env:
        t = Trainer(cfg, env)
        try:
            t.run_steps(2)
            damage(victim, how)
            t.run_steps(18)  # to the end of epoch 0: its loader still holds the epoch's counters
            epoch0 = dict(t.data.loader.counters, epoch=t.data.epoch, batch=t.data.loader.batch)
            t.run_steps(20)
            epoch1 = dict(t.data.loader.counters, epoch=t.data.epoch, bad_total=t.data.bad_total)
        finally:
            t.close()
    return victim, epoch0, epoch1, {r["step"]: r["bad_samples"] for r in t.metrics.rows if "loss" in r}, warned


@pytest.mark.parametrize("workers, how", [(0, "removed"), pytest.param(2, "removed", marks=SLOW),
                                          pytest.param(0, "truncated", marks=SLOW),
                                          pytest.param(2, "truncated", marks=SLOW),
                                          pytest.param(2, "directory", marks=SLOW)])
def test_a_shard_damaged_mid_epoch_is_skipped_and_its_samples_counted(tmp_path, workers, how):
    victim, epoch0, epoch1, bad_samples, warned = _train_through_a_fault(tmp_path, workers, how)
    kind = "truncated_shard" if how == "truncated" else "unreadable_shard"
    lost = epoch0["bad_total"]
    assert (lost == 8) if how != "truncated" else (1 <= lost < 8)  # cut in the middle: the samples after the cut
    assert epoch0["epoch"] == 0 and epoch0["batch"] == 20  # the fixed batches were all handed out
    assert epoch0["bad"] == {kind: lost} and epoch0["bad_shards"] == {victim: lost}
    assert epoch0["samples"] + lost == 80  # every sample of the part read or counted as lost
    assert epoch0["padded"] >= lost  # the short rank topped up from a second pass over its part
    assert epoch1["epoch"] == 1 and epoch1["bad"] == {kind: lost} and epoch1["bad_total"] == 2 * lost
    assert bad_samples[1] == bad_samples[2] == 0 and bad_samples[20] == lost and bad_samples[40] == 2 * lost
    lines = warned.lines(os.path.basename(victim))
    assert len(lines) == 2, lines  # once per epoch that read it (a top-up pass does not warn again)
    assert "rank 0, epoch 0: " in lines[0] and f"{lost} samples of this part are lost [{kind}]" in lines[0]
    assert f"bad samples so far: {lost} " in lines[0] and f"bad samples so far: {2 * lost} " in lines[1]


def _ranks(jobs: list, out: str) -> None:
    """Every rank: each (config, shard to damage, how) in turn: 2 steps, rank 0 damages the shard (rank 1
    reads it), then the rest of epoch 0; writes what the rank saw (or the error it stopped with)."""
    import torch.distributed as dist

    from dsoft_dist.parallel.processes import distributed
    from dsoft_dist.train.trainer import Trainer

    with distributed("gloo") as env:
        for n, (cfg_dict, victim, how) in enumerate(jobs):
            t = Trainer(config_from_dict(cfg_dict), env)
            seen = {}
            try:
                t.run_steps(2)
                dist.barrier()
                if env.rank == 0:
                    damage(victim, how)
                dist.barrier()
                t.run_steps(8)
                seen = dict(t.data.loader.counters, batch=t.data.loader.batch,
                            bad_samples=[r["bad_samples"] for r in t.metrics.rows if "loss" in r])
            except Exception as err:  # noqa: BLE001 (what each rank stopped with is the test's subject)
                seen = {"error": f"{type(err).__name__}: {err}", "batch": t.data.loader.batch}
            finally:
                t.close()
            with open(os.path.join(out, f"job{n}-rank{env.rank}.json"), "w") as f:
                json.dump(seen, f)


@SLOW
@pytest.mark.dist
def test_two_ranks_skip_a_shard_damaged_mid_epoch_and_stop_together_past_the_limit(tmp_path):
    from dsoft_dist.parallel.processes import spawn_local

    victim = last_shard(1, 2, 0)  # rank 1's last shard of epoch 0
    jobs = []
    for name, how, limit in (("counted", "truncated", 0), ("limited", "removed", 5)):
        paths = write_shards(str(tmp_path / name), COUNTS, size=16, num_classes=80)
        jobs.append((fault_cfg(tmp_path / name, tmp_path / f"run-{name}", nproc=2, steps=10,
                               max_bad_samples=limit), paths[victim], how))
    spawn_local(_ranks, 2, (jobs, str(tmp_path)))
    seen = {(job, rank): json.loads((tmp_path / f"job{job}-rank{rank}.json").read_text())
            for job in (0, 1) for rank in (0, 1)}
    r0, r1 = seen[0, 0], seen[0, 1]  # truncated, no limit: both ranks hand out their 10 batches
    lost = r1["bad_total"]
    assert 1 <= lost < 8 and r1["bad"] == {"truncated_shard": lost} and r0["bad_total"] == 0
    assert r0["batch"] == r1["batch"] == 10 and r0["samples"] == 40 and r1["samples"] + lost == 40
    assert r0["bad_samples"][-1] == lost and r0["bad_samples"][:2] == [0, 0]  # the rows sum over ranks
    e0, e1 = seen[1, 0], seen[1, 1]  # removed, data.max_bad_samples=5: every rank stops at the same batch
    assert e0["error"] == e1["error"] and e0["batch"] == e1["batch"] < 10
    assert e0["error"].startswith("BadDataError: data.max_bad_samples=5: 8 samples of this run were skipped")
    assert "summed over 2 rank(s)" in e0["error"] and f"{jobs[1][1]} (8 samples lost)" in e0["error"]
