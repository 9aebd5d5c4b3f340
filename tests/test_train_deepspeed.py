"""DeepSpeed ZeRO-1/2 for the backbone against DDP, in real gloo processes on CPU.

The same tiny run (tests/test_train_dist.py) under parallel.engine=ddp and deepspeed: after 3
steps the backbone and the head agree; accumulation under DeepSpeed equals a larger batch; a
non-finite gradient makes DeepSpeed skip its step and the head's with it. (DeepSpeed's CPU
accelerator refuses fp16, so its loss scale is exercised on GPUs only; DDP's fp16 overflow
test is in tests/test_train_dist.py.)
"""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from dsoft_dist.config import config_from_dict
from dsoft_dist.parallel.processes import distributed, spawn_local
from tests.test_checkpoint import _epoch_keys, _train_on_a_full_disk, assert_resume_is_exact, ckpt_cfg, plant_payload
from tests.test_train_dist import (
    _strip_batchnorm,
    assert_same_params,
    inject_nonfinite,
    results,
    run,
    run_each,
    tiny,
)

pytest.importorskip("deepspeed")  # the test extra installs it; a machine without it runs the DDP tests
pytestmark = [pytest.mark.dist, pytest.mark.slow(reason="DeepSpeed in spawned gloo ranks: its import and engine "
                                                         "start-up take seconds, its C++ comm op a first build")]


@pytest.fixture(scope="module", autouse=True)
def extension_cache(tmp_path_factory):
    """DeepSpeed builds a small C++ comm op once (~35-65 s here); keep it for the whole module."""
    if "TORCH_EXTENSIONS_DIR" not in os.environ and "DSOFT_CACHE_DIR" not in os.environ:
        os.environ["DSOFT_CACHE_DIR"] = str(tmp_path_factory.mktemp("dsoft_cache"))
    yield


# DeepSpeed's CPU all-reduce never unlinks its ~69 MB /dev/shm segments; the engine does, so a run leaves
# none behind (before that fix every test here left two, in RAM, until reboot): tests/conftest.py's leak
# check fails any test that leaves a /dev/shm segment.


@pytest.mark.parametrize("stage", [1, 2])
def test_ddp_and_deepspeed_zero_agree_after_three_steps(tmp_path, stage):
    ddp, ds = run_each(tiny(tmp_path / "ddp", optimizer__grad_clip=1.0),
                       tiny(tmp_path / "ds", parallel__engine="deepspeed", parallel__zero_stage=stage,
                            optimizer__grad_clip=1.0))
    assert (ddp["report"]["engine"], ds["report"]["engine"]) == ("ddp", f"deepspeed ZeRO-{stage}")
    assert ds["loss"] == pytest.approx(ddp["loss"], rel=1e-5)
    assert_same_params(ds, ddp, atol=1e-5)
    assert ds["backbone"]["net.0.weight"].dtype == torch.float32


@pytest.mark.parametrize("stage", [1, 2])
def test_deepspeed_accumulation_equals_one_larger_batch(tmp_path, stage):
    ds = {"parallel__engine": "deepspeed", "parallel__zero_stage": stage}
    ddp, accum, big = run_each(tiny(tmp_path / "ddp", data__batch_size=8, optimizer__grad_accum_steps=2),
                               tiny(tmp_path / "acc", data__batch_size=8, optimizer__grad_accum_steps=2, **ds),
                               tiny(tmp_path / "big", data__batch_size=16, **ds), without_batchnorm=True)
    assert accum["loss"] == pytest.approx(big["loss"], rel=1e-5)
    assert_same_params(accum, big, atol=2e-6)
    assert_same_params(accum, ddp, atol=2e-6)  # and both engines accumulate the same way


def test_deepspeed_bf16_trains(tmp_path):
    res = run(tiny(tmp_path / "bf16", parallel__engine="deepspeed", parallel__zero_stage=2, parallel__precision="bf16",
                   schedule__steps=30, logging__log_every=10))
    assert res["loss"][-1] < res["loss"][0] - 1.0
    assert res["backbone"]["net.0.weight"].dtype == torch.float32  # written as fp32 for dsoft eval


def test_deepspeed_skipped_step_skips_the_head_step(tmp_path):
    cfg = tiny(tmp_path / "run", parallel__engine="deepspeed", parallel__zero_stage=2,
               optimizer__head_step_in_backward=False)
    spawn_local(inject_nonfinite, 2, (cfg, str(tmp_path)))
    for rank in (0, 1):
        rec = torch.load(tmp_path / f"rank{rank}.pt")
        assert [r["applied"] for r in rec] == [True, False, True]
        assert [(r["backbone_changed"], r["head_changed"]) for r in rec] == [(True, True), (False, False), (True, True)]


def test_deepspeed_resume_on_the_same_world_size_is_exact(tmp_path):
    ds = {"parallel__engine": "deepspeed", "parallel__zero_stage": 2, "model__dropout": 0.0}
    assert_resume_is_exact(tmp_path, **ds)
    cfg = ckpt_cfg(tmp_path / "resumed", **ds)
    # DeepSpeed itself reads with weights_only=False: a crafted partition is refused before it does
    root = tmp_path / "resumed" / "checkpoints"
    folder = root / (root / "latest").read_text().strip()
    name = "engine/engine/zero_pp_rank_1_mp_rank_00_optim_states.pt"
    plant_payload(folder, name, tmp_path / "pwned")
    cfg["parallel"]["nproc"], cfg["checkpoint"]["resume"] = 2, str(folder)
    with pytest.raises(Exception, match="zero_pp_rank_1_mp_rank_00_optim_states.pt could not be loaded as plain"):
        run(cfg)
    assert not (tmp_path / "pwned").exists()


def test_a_full_disk_during_a_deepspeed_save_keeps_the_previous_checkpoint_and_the_run_goes_on(tmp_path, capfd):
    """DeepSpeed writes its part in a collective save of its own: rank 1's full disk there (steps 4 and 6) is
    agreed on by every rank as a DDP save's is (tests/test_checkpoint.py), not left with rank 0 waiting in
    DeepSpeed's barrier; step 2 stays ``latest``, the save of step 8 works again."""
    cfg = ckpt_cfg(tmp_path / "run", parallel__engine="deepspeed", parallel__zero_stage=2, model__dropout=0.0)
    spawn_local(_train_on_a_full_disk, 2, (cfg, (4, 6), 1, str(tmp_path / "counted.json")))
    err = capfd.readouterr().err
    assert json.loads((tmp_path / "counted.json").read_text()) == {"failed": 2, "written": 8}
    assert err.count("could not be written") == 1, err[-3000:]
    assert "checkpoint step-00000004 could not be written (rank 1: OSError: [Errno 28] No space left on device" in err
    root = tmp_path / "run" / "checkpoints"
    assert sorted(os.listdir(root)) == ["latest", "step-00000002", "step-00000008"]  # no .tmp folder left
    assert (root / "latest").read_text().strip() == "step-00000008"


# ----------------------------------------------------------------------------- another world size

def _full_state(engine) -> dict:
    """Collective: each backbone parameter's fp32 master and partitioned optimizer states, put together by
    DeepSpeed's public ``safe_get_full_*`` (the same on any world size), and each param group's optimizer
    values that are not partitioned (AdamW's step)."""
    from deepspeed.utils import (
        lazy_init_hp_params_optimizer_state,
        safe_get_full_fp32_param,
        safe_get_full_optimizer_state,
    )

    if not engine.ds.zero_optimization():  # ZeRO-0: the client optimizer over the parameters themselves
        state = engine.optimizer.state
        return {"params": {name: {"fp32": p.detach().cpu().clone(), **{k: v.cpu() for k, v in state[p].items()}}
                           for name, p in engine.module.named_parameters()}, "groups": []}
    base = engine.optimizer.optimizer  # the client optimizer: one flat fp32 partition per param group
    params = [p for p in engine.module.parameters() if p._hp_mapping is not None]
    for g, group in enumerate(base.param_groups):  # DeepSpeed 0.19 links the fragments of the groups whose state
        # exists after the first group's first step only: the other groups' states are linked here
        lazy_init_hp_params_optimizer_state([p for p in params if p._hp_mapping.param_group_index == g],
                                            group["params"][0], base.state)
    groups = [base.state[g["params"][0]] for g in base.param_groups]
    keys = sorted({k for state in groups for k, v in state.items() if v.dim()})
    full = {name: {"fp32": safe_get_full_fp32_param(p).cpu(),
                   **{k: safe_get_full_optimizer_state(p, k).cpu() for k in keys}}
            for name, p in engine.module.named_parameters()}
    return {"params": full, "groups": [{k: v for k, v in state.items() if not v.dim()} for state in groups]}


def _train_and_dump(cfg_dict: dict, stop_after: int | None, out_file: str) -> None:
    """Every rank, without BatchNorm: stop_after k trains to step k, saves and dumps ``_full_state``; None
    dumps it right after the resume, then trains to the end."""
    from dsoft_dist.train import trainer

    build = trainer.build_backbone
    trainer.build_backbone = lambda cfg: _strip_batchnorm(build(cfg))
    with distributed("gloo") as env:
        t = trainer.Trainer(config_from_dict(cfg_dict), env)
        try:
            if stop_after is not None:
                t.run_steps(stop_after - t.state.step)
                t.save_checkpoint()
            state = _full_state(t.engine)
            if env.is_main:
                torch.save(state, out_file)
            if stop_after is None:
                t.train()
        finally:
            t.close()


def _whole_batch_cfg(out, nproc: int, stage: int, optimizer: str) -> dict:
    """8 classes x 3 vectors, 24 // nproc a rank: every step trains on the whole epoch, on any world size."""
    cfg = ckpt_cfg(out, parallel__engine="deepspeed", parallel__zero_stage=stage, model__dropout=0.0,
                   data__num_classes=8, data__samples_per_class=3, data__batch_size=24 // nproc,
                   optimizer__name=optimizer, optimizer__lr=0.2 if optimizer == "sgd" else 0.01)
    cfg["parallel"]["nproc"] = nproc
    return cfg


def _assert_same_state(loaded: dict, written: dict) -> None:
    """Two ``_full_state`` dumps hold the same parameters, state keys (the fp32 master and at least one
    optimizer state each) and values, bit for bit."""
    assert loaded["params"].keys() == written["params"].keys()
    for name, state in written["params"].items():
        assert state.keys() == loaded["params"][name].keys() and len(state) >= 2, (name, state.keys())
        for key, value in state.items():
            torch.testing.assert_close(loaded["params"][name][key], value, atol=0, rtol=0, msg=f"{name} {key}")
    assert loaded["groups"] == written["groups"]


@pytest.mark.parametrize("stage,optimizer", [(0, "sgd"), (1, "adamw"), (2, "sgd")])
def test_deepspeed_resume_on_another_world_size_repartitions_the_optimizer_state_exactly(tmp_path, stage,
                                                                                        optimizer):
    """2 ranks train 3 steps and save; the checkpoint resumes on 1 rank and on 2. Right after the resume every
    parameter's fp32 master and optimizer state, put together by DeepSpeed over the new ranks, equal what the
    2 writing ranks held, bit for bit (ZeRO-0 partitions nothing: DeepSpeed's own load). The rest of the run
    equals the resume on 2 ranks up to rounding: each step trains on the whole epoch (24 samples, no
    BatchNorm, no dropout), so only the order of the sums differs (the gradient all-reduce over another
    number of ranks, the head's class shards): the tolerance is float32 rounding over 5 more steps: on CPU
    the losses agreed within 1.7e-7 relative and the weights within 2.4e-7 (1e-6 here)."""
    spawn_local(_train_and_dump, 2, (_whole_batch_cfg(tmp_path / "interrupted", 2, stage, optimizer), 3,
                                     str(tmp_path / "written.pt")))
    for name in ("same", "on1"):
        shutil.copytree(tmp_path / "interrupted", tmp_path / name)
    same = run(_whole_batch_cfg(tmp_path / "same", 2, stage, optimizer), without_batchnorm=True)
    cfg = _whole_batch_cfg(tmp_path / "on1", 1, stage, optimizer)
    spawn_local(_train_and_dump, 1, (cfg, None, str(tmp_path / "loaded.pt")))
    _assert_same_state(torch.load(tmp_path / "loaded.pt"), torch.load(tmp_path / "written.pt"))
    resumed = results(cfg)
    assert (resumed["report"]["world_size"], resumed["report"]["engine"]) == (1, f"deepspeed ZeRO-{stage}")
    assert resumed["loss"][:3] == same["loss"][:3]  # the history before the checkpoint, as written
    assert resumed["loss"] == pytest.approx(same["loss"], rel=1e-6)
    assert_same_params(resumed, same, atol=1e-6, rtol=1e-5)


def test_deepspeed_resume_on_another_world_size_trains_on_each_sample_of_the_epoch_once(tmp_path):
    """ZeRO-2, 2 ranks x 6 train 4 steps (48 of the epoch's 240 samples) and save; the run resumes on 3 ranks
    x 4: the optimizer state comes back re-partitioned bit for bit, and the sample keys show each of the 240
    trained on exactly once in epoch 0 (16 more steps)."""
    cfg = ckpt_cfg(tmp_path / "run", parallel__engine="deepspeed", parallel__zero_stage=2, data__samples_per_class=6,
                   data__batch_size=6, schedule__steps=22, logging__sample_keys=True)
    spawn_local(_train_and_dump, 2, (cfg, 4, str(tmp_path / "written.pt")))
    cfg["parallel"]["nproc"], cfg["data"]["batch_size"] = 3, 4
    spawn_local(_train_and_dump, 3, (cfg, None, str(tmp_path / "loaded.pt")))
    _assert_same_state(torch.load(tmp_path / "loaded.pt"), torch.load(tmp_path / "written.pt"))
    assert results(cfg)["report"]["world_size"] == 3
    by_step = _epoch_keys(tmp_path / "run")
    assert sorted(by_step) == list(range(1, 21))  # 4 steps before, 16 after the resume
    keys = sum(by_step.values(), [])
    assert len(keys) == len(set(keys)) == 240, "a sample of the epoch was trained on twice or never"
