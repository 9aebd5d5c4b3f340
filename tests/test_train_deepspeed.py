"""DeepSpeed ZeRO-1/2 for the backbone against DDP, in real gloo processes on CPU.

The same tiny run (tests/test_train_dist.py) under parallel.engine=ddp and deepspeed: after 3
steps the backbone and the head agree; accumulation under DeepSpeed equals a larger batch; a
non-finite gradient makes DeepSpeed skip its step and the head's with it. (DeepSpeed's CPU
accelerator refuses fp16, so its loss scale is exercised on GPUs only; DDP's fp16 overflow
test is in tests/test_train_dist.py.)
"""
from __future__ import annotations

import os

import pytest
import torch

from dsoft_dist.parallel.processes import spawn_local
from tests.test_train_dist import assert_same_params, inject_nonfinite, run, run_each, run_jobs, tiny

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
    from tests.test_checkpoint import ckpt_cfg, plant_payload

    ds = {"parallel__engine": "deepspeed", "parallel__zero_stage": 2, "model__dropout": 0.0}
    cfg = ckpt_cfg(tmp_path / "resumed", **ds)
    _, whole = run_jobs([(cfg, 5), (ckpt_cfg(tmp_path / "whole", **ds), None)])
    resumed = run(cfg)
    assert resumed["loss"] == whole["loss"]
    assert_same_params(resumed, whole, atol=0.0, rtol=0.0)
    cfg["parallel"]["nproc"] = 1  # ZeRO partitions are per rank: another world size is refused, by name
    with pytest.raises(Exception, match="a DeepSpeed checkpoint resumes on the world size that wrote it"):
        run(cfg)
    # DeepSpeed itself reads with weights_only=False: a crafted partition is refused before it does
    root = tmp_path / "resumed" / "checkpoints"
    folder = root / (root / "latest").read_text().strip()
    name = "engine/engine/zero_pp_rank_1_mp_rank_00_optim_states.pt"
    plant_payload(folder, name, tmp_path / "pwned")
    cfg["parallel"]["nproc"], cfg["checkpoint"]["resume"] = 2, str(folder)
    with pytest.raises(Exception, match="zero_pp_rank_1_mp_rank_00_optim_states.pt could not be loaded as plain"):
        run(cfg)
    assert not (tmp_path / "pwned").exists()
