"""Run checkpoints in real gloo processes: exact resume, another world size, torn writes, pickles, loss scale.

A run is interrupted by a worker that trains k steps, writes a checkpoint and stops (what a crash
right after a checkpoint leaves); the resumed run (checkpoint.resume=auto) must continue as if
nothing happened.

    python -m pytest tests/test_checkpoint.py
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from dsoft_dist.config import config_from_dict
from dsoft_dist.errors import CheckpointError
from dsoft_dist.parallel.processes import distributed, spawn_local
from dsoft_dist.train.checkpoint import Checkpointer
from dsoft_dist.train.ckpt_files import check_manifest
from dsoft_dist.utils import load_weights_only
from tests.test_data_fixtures import write_shards
from tests.test_train_dist import assert_same_params, run, run_jobs, tiny

pytestmark = pytest.mark.dist
SLOW = pytest.mark.slow(reason="spawns gloo ranks; test_resume_on_the_same_world_size_is_exact is the default "
                                "tier's case")


def ckpt_cfg(out, **sections) -> dict:
    base = {"schedule__steps": 8, "schedule__decay": "cosine", "schedule__warmup_steps": 2,
            "checkpoint__every_steps": 2, "checkpoint__keep_last": 2, "model__dropout": 0.2}  # dropout: RNG state
    return tiny(out, **{**base, **sections})


def _interrupted_at_scale(cfg_dict: dict, steps: int, scale: float) -> None:
    """Every rank: the fp16 loss scale set to ``scale`` (7 good steps), then ``steps`` steps, a checkpoint, a stop."""
    from dsoft_dist.train.trainer import Trainer

    with distributed("gloo") as env:
        t = Trainer(config_from_dict(cfg_dict), env)
        t.engine.scaler.scale, t.engine.scaler.good_steps = scale, 7
        t.run_steps(steps - t.state.step)
        t.save_checkpoint()
        t.close()


def interrupt(cfg_dict: dict, steps: int, nproc: int | None = None) -> None:
    """Trains ``steps`` steps, writes a checkpoint and stops (run_jobs' stop_after), on ``nproc`` ranks."""
    cfg = json.loads(json.dumps(cfg_dict))
    cfg["parallel"]["nproc"] = nproc or cfg["parallel"]["nproc"]
    run_jobs([(cfg, steps)])


def assert_resume_is_exact(tmp_path, **sections) -> dict:
    """The run interrupted after step 5 and resumed equals the whole run bit for bit; returns the resumed run's
    results. The run stops after step 5 (the checkpoint at step 5 is the interruption's); the whole run follows in
    the same process, so the resume, in a fresh one, finds nothing of the interrupted run but what it wrote."""
    cfg = ckpt_cfg(tmp_path / "resumed", **sections)
    _, whole = run_jobs([(cfg, 5), (ckpt_cfg(tmp_path / "whole", **sections), None)])
    resumed = run(cfg)
    assert resumed["loss"] == whole["loss"]  # all 8 steps: 1-5 before, 6-8 after the resume, bit-identical
    assert_same_params(resumed, whole, atol=0.0, rtol=0.0)
    return resumed


def test_resume_on_the_same_world_size_is_exact(tmp_path):
    resumed = assert_resume_is_exact(tmp_path)
    steps = [r["step"] for r in resumed["rows"] if "loss" in r]
    assert steps == list(range(1, 9))  # the history is whole, nothing logged twice
    assert sorted(os.listdir(tmp_path / "resumed" / "checkpoints")) == ["latest", "step-00000006", "step-00000008"]


@SLOW
def test_resume_with_nearest_negatives_is_exact(tmp_path):
    """D-Softmax-KN's table, built at draws 0 and 3, comes back with the step-5 checkpoint: the resumed run builds at
    draw 6 as the whole run does (a table rebuilt at the resume would change steps 6-8)."""
    assert_resume_is_exact(tmp_path, head__negatives="nearest", head__sample_rate=0.25, head__nearest_refresh=3)


def _epoch_keys(out) -> dict[int, list[str]]:
    """logging.sample_keys' files: the keys trained on at each step, over every rank."""
    by_step: dict[int, list[str]] = {}
    for path in sorted((out / "samples").glob("rank-*.txt")):
        for line in path.read_text().splitlines():
            step, epoch, *keys = line.split()
            if int(epoch) == 0:
                by_step.setdefault(int(step), []).extend(keys)
    return by_step


def _source_cfg(root, source: str, out) -> dict:
    """The checkpoint config with 2 ranks x 6, 22 steps and sample keys, on an epoch of 240 samples:
    40 synthetic classes x 6 vectors, or real WebDataset shards of 8x8 images (one label each)."""
    sections = {"data__batch_size": 6, "schedule__steps": 22, "logging__sample_keys": True}
    if source == "synthetic":
        return ckpt_cfg(out, data__samples_per_class=6, **sections)
    if not (root / "shards").is_dir():
        write_shards(str(root / "shards"), [37, 50, 13, 61, 79], num_classes=240)
    data = {"data__source": "webdataset", "data__manifest": str(root / "shards"), "data__num_classes": 240,
            "data__image_size": 8, "data__num_workers": 2, "data__shuffle_buffer": 16, "data__augment_flip": False,
            "model__in_features": 3 * 8 * 8}
    return ckpt_cfg(out, **{**data, **sections})


@pytest.fixture(scope="module")
def before_resume(tmp_path_factory):
    """Per data source, once: the uninterrupted run and the run interrupted after 4 steps (2 ranks)."""
    made = {}

    def get(source: str):
        if source not in made:
            root = tmp_path_factory.mktemp(source)
            _, whole = run_jobs([(_source_cfg(root, source, root / "interrupted"), 4),
                                 (_source_cfg(root, source, root / "whole"), None)])
            made[source] = root, whole
        return made[source]
    return get


@SLOW
@pytest.mark.parametrize("nproc,source", [(1, "synthetic"), (3, "synthetic"), (3, "shards"), (1, "shards")])
def test_resume_on_another_world_size_trains_on_each_sample_of_the_epoch_once(tmp_path, before_resume, nproc,
                                                                              source):
    """2 ranks x 6 train 4 steps (48 of the epoch's 240 samples); the run resumes on 1 x 12 or 3 x 4
    ranks. The sample keys every rank logged show each of the 240 trained on exactly once in epoch
    0 (16 more steps), the head re-shards, and the losses stay in the uninterrupted run's band."""
    root, whole = before_resume(source)
    shutil.copytree(root / "interrupted", tmp_path / "resumed")
    cfg = _source_cfg(root, source, tmp_path / "resumed")
    cfg["parallel"]["nproc"] = nproc
    cfg["data"]["batch_size"] = 12 // nproc
    resumed = run(cfg)
    assert resumed["report"]["world_size"] == nproc
    assert resumed["loss"][:4] == whole["loss"][:4]
    lo, hi = min(whole["loss"]), max(whole["loss"])
    assert all(0.8 * lo <= x <= 1.2 * hi for x in resumed["loss"][4:]), (resumed["loss"], whole["loss"])
    assert resumed["head"].shape == whole["head"].shape
    by_step = _epoch_keys(tmp_path / "resumed")
    assert sorted(by_step) == list(range(1, 21))  # 4 steps before, 16 after the resume
    keys = sum(by_step.values(), [])
    assert len(keys) == len(set(keys)) == 240, "a sample of the epoch was trained on twice or never"
    assert sorted(keys) == sorted(sum(_epoch_keys(root / "whole").values(), []))


def _bad_shards_cfg(shards, out) -> dict:
    """2 ranks x 4 on 48 images of 8x8 (6 batches a rank per epoch), 6 of them corrupt, 5 in the first shard:
    the ranks meet different numbers of bad samples; 14 steps are a little over two epochs."""
    if not shards.is_dir():
        write_shards(str(shards), [16, 16, 16], num_classes=48,
                     overrides={n: {"jpg": b"not a jpeg"} for n in (1, 2, 3, 4, 5, 40)})
    return ckpt_cfg(out, data__source="webdataset", data__manifest=str(shards), data__num_classes=48,
                    data__image_size=8, data__num_workers=0, data__augment_flip=False, data__batch_size=4,
                    model__in_features=3 * 8 * 8, schedule__steps=14)


@SLOW
def test_bad_sample_counts_survive_a_resume(tmp_path):
    """A run stopped in its third epoch (after step 14 - 4 = 10) and resumed on the same ranks ends with the
    uninterrupted run's count of bad samples: each rank takes back its own count of the finished epochs, and
    the epoch in progress is counted again as its replay reads it."""
    shards = tmp_path / "shards"
    _, whole = run_jobs([(_bad_shards_cfg(shards, tmp_path / "resumed"), 10),
                         (_bad_shards_cfg(shards, tmp_path / "whole"), None)])
    saved = load_weights_only(str(tmp_path / "resumed" / "checkpoints" / "step-00000010" / "data.pt"))
    assert len(saved["bad_done_by_rank"]) == 2 and saved["bad_done_by_rank"][0] != saved["bad_done_by_rank"][1]
    resumed = run(_bad_shards_cfg(shards, tmp_path / "resumed"))
    assert whole["report"]["bad_samples"] > 0
    assert resumed["report"]["bad_samples"] == whole["report"]["bad_samples"]
    assert resumed["loss"] == whole["loss"]


def _keys_by_epoch(out) -> dict[int, list[str]]:
    """logging.sample_keys' files: every key trained on, by epoch, over every rank (the later line of a step
    logged twice, before and after a restart, is the one trained on: none is here, the run stops at a save)."""
    by_epoch: dict[int, list[str]] = {}
    for path in sorted((out / "samples").glob("rank-*.txt")):
        for line in path.read_text().splitlines():
            _, epoch, *keys = line.split()
            by_epoch.setdefault(int(epoch), []).extend(keys)
    return by_epoch


@SLOW
def test_a_checkpoint_at_an_epochs_last_step_resumes_on_another_world_size_with_the_epochs_tail_as_it_was(
        tmp_path):
    """240 samples on 2 ranks x 7: 17 steps an epoch, 238 samples, and a tail of 2 that no epoch trains on.
    Stopped right after step 17 (the epoch's last) and resumed on 3 ranks x 5, epoch 0 stays the 238 samples
    of the uninterrupted run, each once: the tail is neither trained (on the new layout it is less than a
    batch) nor carried; epoch 1 then starts whole and trains each of its samples at most once."""
    def cfg(out, nproc=2, batch=7):
        c = ckpt_cfg(out, data__samples_per_class=6, data__batch_size=batch, schedule__steps=20,
                     logging__sample_keys=True)
        c["parallel"]["nproc"] = nproc
        return c

    _, whole = run_jobs([(cfg(tmp_path / "resumed"), 17), (cfg(tmp_path / "whole"), None)])
    resumed = run(cfg(tmp_path / "resumed", nproc=3, batch=5))
    assert resumed["report"]["world_size"] == 3
    got, want = _keys_by_epoch(tmp_path / "resumed"), _keys_by_epoch(tmp_path / "whole")
    assert len(got[0]) == len(set(got[0])) == 238 and sorted(got[0]) == sorted(want[0])
    assert len(got[1]) == len(set(got[1])) == 3 * 3 * 5  # steps 18-20 on 3 ranks x 5, all of epoch 1


def _train_on_a_full_disk(cfg_dict: dict, fail_steps: tuple, fail_rank: int, out_file: str,
                          folders: bool = False) -> None:
    """Every rank: trains ``cfg_dict`` while torch.save fails on rank ``fail_rank`` as a full disk makes it fail
    (OSError ENOSPC) for the files of the checkpoints of ``fail_steps`` (folders=True: rank 0 cannot make their
    folders instead); rank 0 writes what the checkpointer counted to ``out_file``."""
    import errno

    from dsoft_dist.train import checkpoint
    from dsoft_dist.train.trainer import Trainer

    real_save, real_folder = torch.save, checkpoint._fresh_folder

    def failing(path) -> bool:
        return any(checkpoint.step_folder(s) in str(path) for s in fail_steps)

    def full_disk_save(obj, f, *args, **kwargs):
        if torch.distributed.get_rank() == fail_rank and failing(f):
            raise OSError(errno.ENOSPC, "No space left on device", str(f))
        return real_save(obj, f, *args, **kwargs)

    def full_disk_folder(tmp, parts):
        if failing(tmp):
            raise OSError(errno.ENOSPC, "No space left on device", tmp)
        return real_folder(tmp, parts)

    if folders:
        checkpoint._fresh_folder = full_disk_folder
    else:
        torch.save = full_disk_save
    with distributed("gloo") as env:
        trainer = Trainer(config_from_dict(cfg_dict), env)
        trainer.train()
        counted = {"failed": trainer.checkpointer.failed_saves, "written": trainer.checkpointer.written_step}
        trainer.close()
    if env.is_main:
        Path(out_file).write_text(json.dumps(counted))


@SLOW
def test_a_full_disk_during_saves_keeps_the_previous_checkpoint_and_the_run_goes_on(tmp_path, capfd):
    """Saves every 2 of 8 steps on 2 ranks; rank 1's disk is full for the saves of steps 4 and 6. Every rank
    abandons those saves together: step 2 stays ``latest``, no unfinished folder is left, the user is told once,
    the save of step 8 works again, and the run trains exactly as an undisturbed one."""
    cfg = ckpt_cfg(tmp_path / "run")
    spawn_local(_train_on_a_full_disk, 2, (cfg, (4, 6), 1, str(tmp_path / "counted.json")))
    err = capfd.readouterr().err
    assert json.loads((tmp_path / "counted.json").read_text()) == {"failed": 2, "written": 8}
    assert err.count("could not be written") == 1, err[-3000:]
    assert "checkpoint step-00000004 could not be written (rank 1: OSError: [Errno 28] No space left on device" in err
    assert "step-00000002 stays the checkpoint a restart resumes" in err
    assert err.count("saving works again after 2 failed saves") == 1
    root = tmp_path / "run" / "checkpoints"
    assert sorted(os.listdir(root)) == ["latest", "step-00000002", "step-00000008"]  # no .tmp folder left
    assert (root / "latest").read_text().strip() == "step-00000008"
    assert check_manifest(str(root / "step-00000008")) is None
    whole = run(ckpt_cfg(tmp_path / "whole"))
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in rows if "loss" in r] == whole["loss"]


@SLOW
def test_a_checkpoint_folder_rank_0_cannot_make_is_a_failed_save_on_every_rank(tmp_path, capfd):
    """The folder of a save is made by rank 0 alone, before any rank writes: its storage error (step 4) is agreed
    on as a failed write is; step 2 stays ``latest`` and the next save works."""
    cfg = ckpt_cfg(tmp_path / "run")
    spawn_local(_train_on_a_full_disk, 2, (cfg, (4,), 0, str(tmp_path / "counted.json"), True))
    err = capfd.readouterr().err
    assert json.loads((tmp_path / "counted.json").read_text()) == {"failed": 1, "written": 8}
    assert "checkpoint step-00000004 could not be written (rank 0: OSError: [Errno 28] No space left on device" in err
    assert err.count("saving works again after 1 failed saves") == 1
    root = tmp_path / "run" / "checkpoints"
    assert sorted(os.listdir(root)) == ["latest", "step-00000006", "step-00000008"]


@SLOW
def test_torn_checkpoint_is_never_loaded_and_auto_takes_the_previous(tmp_path, caplog):
    cfg = ckpt_cfg(tmp_path / "run")
    interrupt(cfg, 6)
    root = tmp_path / "run" / "checkpoints"
    piece = next((root / "step-00000006" / "head").glob("head-*.pt"))
    piece.write_bytes(piece.read_bytes()[:100])  # truncated, as a kill during the write would leave it
    (root / "step-00000008.tmp").mkdir()  # a write that never finished
    with distributed("gloo") as env:
        ckpt = Checkpointer(config_from_dict(cfg), env)
        assert "bytes" in check_manifest(str(root / "step-00000006"))
        with caplog.at_level("WARNING", logger="dsoft_dist"):
            assert ckpt.find_resume() == str(root / "step-00000004")
    assert "step-00000006 is not used" in caplog.text and piece.name in caplog.text


@SLOW
def test_a_save_killed_after_its_rename_is_redone_and_its_folder_never_resumed(tmp_path, caplog):
    """A kill between the rename of step-6 and the move of ``latest``: the resume takes ``latest`` (step 4) and
    removes step-6, which the resumed run writes again; a later resume could otherwise take it after a failed
    verification of ``latest``, though it belongs to a stretch the run redid."""
    cfg = ckpt_cfg(tmp_path / "run", checkpoint__keep_last=3)
    interrupt(cfg, 6)
    root = tmp_path / "run" / "checkpoints"
    (root / "latest").write_text("step-00000004\n")  # what the kill leaves: step-6 whole, latest not moved
    with distributed("gloo") as env:
        ckpt = Checkpointer(config_from_dict(cfg), env)
        with caplog.at_level("WARNING", logger="dsoft_dist"):
            assert ckpt.find_resume() == str(root / "step-00000004")
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-00000002", "step-00000004"]
    assert "checkpoint folders after step-00000004 are removed, the run redoes their steps: step-00000006" in \
        caplog.text


def test_a_checkpoint_of_an_unknown_format_or_a_part_of_no_known_kind_is_refused_by_name(tmp_path):
    """One process: a manifest of a format this version does not read is named with the way out; a states map
    entry that declares no layout (a bare Stateful) is named with the wrappers to use."""
    from dsoft_dist.train.state import TrainState

    folder = tmp_path / "step-00000002"
    folder.mkdir()
    (folder / "manifest.json").write_text(json.dumps({"format": "dsoft_dist.run_checkpoint/9", "step": 2,
                                                      "world_size": 2, "version": "9.0.0", "files": {}}))
    with distributed("gloo") as env:
        ckpt = Checkpointer(config_from_dict(ckpt_cfg(tmp_path / "run")), env)
        with pytest.raises(CheckpointError, match=r"format 'dsoft_dist.run_checkpoint/9'.*--overwrite"):
            ckpt.load({}, str(folder))
        with pytest.raises(TypeError, match=r"states\['trainer'\] is a TrainState.*Replicated or PerRank"):
            ckpt.save({"trainer": TrainState({})}, 1)


@SLOW
def test_a_run_checkpointed_in_the_format_before_the_states_map_resumes_within_float_rounding(tmp_path):
    """tests/data/checkpoint_v1/run: ckpt_cfg's run stopped after step 5 by dsoft_dist f4a3eb6, whose checkpoint
    (format /1) kept the data position and the best record inside trainer.pt (generate.py wrote it). Resumed
    now, it ends where the whole run trained now ends, to float rounding: the fixture was written on another
    machine, whose float sums may round the last bit otherwise (2 ulp at step 4 on the machines of 2026-12). A lost
    data position moves step 6's loss by 4.5e-3 of itself and a weight by 5.6. Bit-exact resumes of checkpoints
    written now are test_resume_on_the_same_world_size_is_exact's."""
    run_folder = tmp_path / "resumed"
    shutil.copytree(Path(__file__).parent / "data" / "checkpoint_v1" / "run", run_folder)
    manifest = json.loads((run_folder / "checkpoints" / "step-00000005" / "manifest.json").read_text())
    assert manifest["format"] == "dsoft_dist.run_checkpoint/1"
    paper = {"head__end_point": 0.9, "head__inter_weight_end": None}  # D-Softmax's defaults of f4a3eb6
    resumed = run(ckpt_cfg(run_folder, checkpoint__keep_last=1, **paper))
    whole = run(ckpt_cfg(tmp_path / "whole", checkpoint__keep_last=1, **paper))
    # steps 1-5 from the old run's log, 6-8 trained after the resume
    assert resumed["loss"] == pytest.approx(whole["loss"], rel=1e-6, abs=0.0)
    assert_same_params(resumed, whole, atol=1e-4, rtol=0.0)


class _Payload:
    """Pickles to a call of os.system: what a crafted checkpoint would carry."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def plant_payload(folder, name: str, marker) -> None:
    """Replaces ``folder/name`` with a file whose pickle would touch ``marker``, and crafts a manifest that
    matches it (so the sha256 check passes and only the weights-only load stands in the way)."""
    from dsoft_dist.utils import sha256_file

    torch.save({"step": _Payload(marker)}, folder / name)  # torch's own format: torch.load would run it
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"][name] = {"size": os.path.getsize(folder / name), "sha256": sha256_file(str(folder / name))}
    (folder / "manifest.json").write_text(json.dumps(manifest))


@SLOW
def test_a_checkpoint_carrying_a_pickle_payload_is_refused_and_nothing_runs(tmp_path):
    cfg = ckpt_cfg(tmp_path / "run")
    interrupt(cfg, 2)
    folder = tmp_path / "run" / "checkpoints" / "step-00000002"
    marker = tmp_path / "pwned"
    plant_payload(folder, "trainer.pt", marker)
    with pytest.raises(CheckpointError, match="trainer.pt could not be loaded as plain tensors"):
        load_weights_only(str(folder / "trainer.pt"))
    cfg["checkpoint"]["resume"] = str(folder)
    with pytest.raises(Exception, match="could not be loaded as plain tensors"):
        interrupt(cfg, 4)
    assert not marker.exists()


@SLOW
def test_fp16_loss_scale_and_growth_tracker_survive_resume(tmp_path):
    cfg = ckpt_cfg(tmp_path / "run", parallel__precision="fp16", model__dropout=0.0)
    spawn_local(_interrupted_at_scale, 2, (cfg, 2, 2.0 ** 11))
    state = load_weights_only(str(tmp_path / "run" / "checkpoints" / "step-00000002" / "engine" / "ddp.pt"))
    assert state["scaler"]["scale"] == 2.0 ** 11 and state["scaler"]["good_steps"] == 9  # 7 + 2 finite steps
    with distributed("gloo") as env:
        from dsoft_dist.train.trainer import Trainer

        t = Trainer(config_from_dict(cfg), env)
        assert (t.state.step, t.engine.scaler.scale, t.engine.scaler.good_steps) == (2, 2.0 ** 11, 9)
        t.close()


def _always_nonfinite(cfg_dict: dict) -> None:
    """Every rank: a NaN into one backbone gradient on rank 1 from step 3 on, then train to the end."""
    from dsoft_dist.train.trainer import Trainer

    with distributed("gloo") as env:
        t = Trainer(config_from_dict(cfg_dict), env)
        first = next(t.engine.module.parameters())
        first.register_hook(lambda g: g * float("nan") if t.state.step >= 2 and env.rank == 1 else g)
        try:
            t.train()
        finally:
            t.close()


@SLOW
def test_nonfinite_steps_in_a_row_stop_the_run_keeping_the_last_checkpoint(tmp_path):
    cfg = ckpt_cfg(tmp_path / "run", optimizer__max_skipped_in_a_row=3, schedule__steps=20)
    with pytest.raises(Exception, match=r"3 optimizer steps in a row had non-finite gradients \(steps 3-5\).*"
                                        r"last checkpoint is step 4"):
        spawn_local(_always_nonfinite, 2, (cfg,))
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_steps"] for r in rows] == [0, 0, 1, 2]  # logged every step; the 5th stopped the run
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == "step-00000004"


@SLOW
def test_ckpt_inspect_and_export(tmp_path, capsys):
    from dsoft_dist.cli import main
    from dsoft_dist.models import load_backbone

    cfg = ckpt_cfg(tmp_path / "run")
    interrupt(cfg, 4)
    root = tmp_path / "run" / "checkpoints"
    assert main(["ckpt", "inspect", str(root)]) == 0
    out = capsys.readouterr().out
    assert "step 4, written by 2 ranks" in out and "every size and sha256 matches" in out
    assert main(["ckpt", "export", str(root / "step-00000004"), str(tmp_path / "exp")]) == 0
    model, model_cfg = load_backbone(str(tmp_path / "exp" / "backbone.pt"))
    state = load_weights_only(str(root / "step-00000004" / "backbone.pt"))
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    head = torch.load(tmp_path / "exp" / "head.pt", weights_only=True)
    assert head["weight"].shape == (40, 16)  # both ranks' pieces merged into the whole classifier
    pieces = sorted((root / "step-00000004" / "head").glob("head-*.pt"))
    first = load_weights_only(str(pieces[0]))["head"]
    assert torch.equal(head["weight"][:first["num_local_classes"]], first["rows"]["weight"])
    (root / "step-00000004" / "backbone.pt").write_bytes(b"broken")
    assert main(["ckpt", "inspect", str(root / "step-00000004")]) == 1
    assert "FAILS" in capsys.readouterr().out


@SLOW
def test_background_saves_write_the_same_checkpoints_and_resume_exactly(tmp_path):
    cfg = ckpt_cfg(tmp_path / "async", checkpoint__async_save=True)
    # background saves at 2 and 4, then at 5; close() waits for the last
    _, sync = run_jobs([(cfg, 5), (ckpt_cfg(tmp_path / "sync"), None)])
    root = tmp_path / "async" / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-00000004", "step-00000005"]
    with distributed("gloo"):
        assert check_manifest(str(root / "step-00000005")) is None
    resumed = run(cfg)
    assert resumed["loss"] == sync["loss"]
    assert_same_params(resumed, sync, atol=0.0, rtol=0.0)
    a = load_weights_only(str(root / "step-00000008" / "backbone.pt"))
    b = load_weights_only(str(tmp_path / "sync" / "checkpoints" / "step-00000008" / "backbone.pt"))
    assert all(torch.equal(a[k], b[k]) for k in a)  # the copy taken at the step, not later weights
