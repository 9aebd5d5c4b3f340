"""The trainer in real gloo processes: determinism, accumulation, precision, fp16 overflow, engines.

Each test spawns its ranks with ``dsoft_dist.parallel.processes.spawn_local`` (the same start-up
``dsoft train`` uses) on a tiny run (MLP on synthetic vectors) and compares what the runs wrote:
metrics.jsonl (the loss per step), backbone.pt and the head checkpoint.

    python -m pytest tests/test_train_dist.py -m dist
"""
from __future__ import annotations

import copy
import json
import math
import os

import pytest
import torch
from torch import nn

from dsoft_dist.config import config_from_dict
from dsoft_dist.head import ShardedClassifier, load_head_checkpoint
from dsoft_dist.models.checkpoint import read_backbone_file
from dsoft_dist.parallel.processes import distributed, spawn_local

pytestmark = pytest.mark.dist
SLOW = pytest.mark.slow(reason="spawns gloo ranks or torchrun (seconds each); "
                        "test_same_seed_same_loss_sequence[2] is the default tier's trainer case")

TINY = {
    "name": "tiny", "seed": 0,
    "model": {"name": "mlp", "embedding_size": 16, "in_features": 24},
    "head": {"loss": "d_softmax", "negatives": "all", "scale": 16.0},
    "data": {"source": "synthetic", "synthetic_mode": "vectors", "vector_dim": 24, "num_classes": 40,
             "samples_per_class": 8, "batch_size": 8, "num_workers": 0},
    "optimizer": {"name": "sgd", "lr": 0.2, "momentum": 0.9, "weight_decay": 5e-4},
    "schedule": {"steps": 3, "warmup_steps": 0, "decay": "constant"},
    "parallel": {"nproc": 2, "backend": "gloo"},
    "logging": {"log_every": 1, "progress": False},
}


def tiny(out, **sections) -> dict:
    """TINY with ``section.key`` values replaced and the output directory set."""
    cfg = copy.deepcopy(TINY)
    for dotted, value in sections.items():
        section, key = dotted.split("__")
        cfg.setdefault(section, {})[key] = value
    cfg["logging"]["output_dir"] = str(out)
    return cfg


def _strip_batchnorm(module: nn.Module) -> nn.Module:
    """BatchNorm couples the samples of a batch, so a micro-batch is not a slice of a batch: identities."""
    for name, child in module.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            setattr(module, name, nn.Identity())
        else:
            _strip_batchnorm(child)
    return module


def _train_jobs(jobs: list[tuple[dict, int | None]], without_batchnorm: bool = False) -> None:
    """Every rank: each (config, stop_after) in turn, in one process group. stop_after None trains the whole
    run; k trains to step k, writes a checkpoint and stops without finishing (what a crash right after a
    checkpoint leaves)."""
    from dsoft_dist.train import trainer

    if without_batchnorm:
        build = trainer.build_backbone
        trainer.build_backbone = lambda cfg: _strip_batchnorm(build(cfg))
    cfgs = [config_from_dict(cfg_dict) for cfg_dict, _ in jobs]
    with distributed(cfgs[0].parallel.backend) as env:
        for cfg, (_, stop_after) in zip(cfgs, jobs):
            t = trainer.Trainer(cfg, env)
            try:
                if stop_after is None:
                    t.train()
                else:
                    t.run_steps(stop_after - t.state.step)
                    t.save_checkpoint()
            finally:
                t.close()


def results(cfg_dict: dict) -> dict:
    """What a finished run wrote: its losses and metric rows, backbone state, full head weight and report."""
    out = cfg_dict["logging"]["output_dir"]
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    head = ShardedClassifier(cfg_dict["data"]["num_classes"], cfg_dict["model"]["embedding_size"])
    load_head_checkpoint(os.path.join(out, "head"), head)
    return {"loss": [r["loss"] for r in rows if "loss" in r], "rows": rows,
            "backbone": read_backbone_file(os.path.join(out, "backbone.pt"))["state_dict"],
            "head": head.weight.detach().clone(), "report": json.load(open(os.path.join(out, "report.json")))}


def run_jobs(jobs: list[tuple[dict, int | None]], without_batchnorm: bool = False) -> list[dict | None]:
    """Spawns parallel.nproc ranks once (every job's) for all the jobs (``_train_jobs``): a spawn costs
    seconds, a tiny run a fraction of one. Returns each whole run's results, None for an interrupted one.
    The runs of one process see each other's leftovers (RNG, caches), so a run that depends on anything
    but its config differs from its twin in a fresh process: tests/test_checkpoint.py's resumes are
    spawned on their own after their interruption shared a process with another run."""
    nprocs = {cfg_dict["parallel"]["nproc"] for cfg_dict, _ in jobs}
    assert len(nprocs) == 1, f"one spawn, one world size: got {sorted(nprocs)}"
    spawn_local(_train_jobs, nprocs.pop(), (jobs, without_batchnorm))
    return [results(cfg_dict) if stop_after is None else None for cfg_dict, stop_after in jobs]


def run_each(*cfg_dicts: dict, without_batchnorm: bool = False) -> list[dict]:
    """Whole runs of the configs in one spawn (``run_jobs``), their results in order."""
    return run_jobs([(cfg_dict, None) for cfg_dict in cfg_dicts], without_batchnorm)


def run(cfg_dict: dict, without_batchnorm: bool = False) -> dict:
    """Spawns parallel.nproc ranks; returns the run's losses, backbone state and full head weight."""
    return run_each(cfg_dict, without_batchnorm=without_batchnorm)[0]


def assert_same_params(a: dict, b: dict, atol: float, rtol: float = 1e-4) -> None:
    for key in a["backbone"]:
        torch.testing.assert_close(a["backbone"][key].float(), b["backbone"][key].float(), atol=atol, rtol=rtol,
                                   msg=lambda m, k=key: f"backbone {k}: {m}")
    torch.testing.assert_close(a["head"], b["head"], atol=atol, rtol=rtol)


def _start_method(out_file: str) -> None:
    import multiprocessing

    with open(out_file, "w") as fh:
        fh.write(multiprocessing.get_start_method())


def test_spawned_ranks_start_processes_as_their_parent_does(tmp_path):
    """A rank spawn_local started forks its DataLoader workers as a torchrun worker does (the parent's method),
    instead of the "spawn" a spawned child inherits (each worker would re-import torch, every epoch)."""
    import multiprocessing

    spawn_local(_start_method, 1, (str(tmp_path / "method"),))
    assert (tmp_path / "method").read_text() == multiprocessing.get_start_method() != "spawn"


def test_close_ends_the_data_workers_of_an_unfinished_epoch(tmp_path):
    """Trainer.close ends the loader's workers (a run stopped mid-epoch otherwise keeps them until the iterator
    is collected, and at exit torch waits up to 5 s for each)."""
    from dsoft_dist.observability.procs import children
    from dsoft_dist.train.trainer import Trainer

    # each worker's share must outlast the 2 steps: a worker whose share is read out (its last chunk of up to
    # 256 vectors fetched ahead) is ended by the loader itself, which made a share of 160 vectors flaky
    cfg = config_from_dict(tiny(tmp_path / "run", parallel__nproc=1, data__num_workers=2,
                                data__samples_per_class=200))
    before = set(children(os.getpid()))  # helpers of earlier tests (multiprocessing's resource tracker)
    with distributed("gloo") as env:
        t = Trainer(cfg, env)
        t.run_steps(2)  # of an epoch of 40 classes x 200 / 8 = 1000 steps: 4000 vectors per worker
        workers = set(children(os.getpid())) - before
        assert len(workers) == 2, workers
        t.close()
        assert not workers & set(children(os.getpid()))


@pytest.mark.parametrize("nproc", [pytest.param(1, marks=SLOW), 2])
def test_same_seed_same_loss_sequence(tmp_path, nproc):
    # one process group: the second run starts where the first left the RNG and caches, so it matches only
    # if a run depends on its config alone
    first, second, other = run_each(tiny(tmp_path / "a", parallel__nproc=nproc, schedule__steps=4),
                                    tiny(tmp_path / "b", parallel__nproc=nproc, schedule__steps=4),
                                    tiny(tmp_path / "c", parallel__nproc=nproc, schedule__steps=4, data__seed=1))
    assert len(first["loss"]) == 4 and first["loss"] == second["loss"]  # bit-identical
    assert_same_params(first, second, atol=0.0, rtol=0.0)
    assert other["loss"] != first["loss"]  # the comparison can fail


@SLOW
@pytest.mark.parametrize("loss", ["d_softmax", "arcface"])
def test_accumulating_k_micro_batches_equals_one_k_times_larger_batch(tmp_path, loss):
    # exact negatives only: a sampled negative set (batch, random) is drawn per micro-batch, so it
    # equals the larger batch's only in expectation
    # and a schedule that moves every step: the lr must move per optimizer step, not per micro-batch
    k, sched = 2, {"schedule__decay": "cosine", "schedule__warmup_steps": 1, "schedule__steps": 4}
    accum, big = run_each(
        tiny(tmp_path / "acc", data__batch_size=8, optimizer__grad_accum_steps=k, head__loss=loss, **sched),
        tiny(tmp_path / "big", data__batch_size=8 * k, head__loss=loss, **sched), without_batchnorm=True)
    assert [r["lr"] for r in accum["rows"] if "lr" in r] == [r["lr"] for r in big["rows"] if "lr" in r]
    assert accum["report"]["head_step_in_backward"] is False and big["report"]["head_step_in_backward"] is True
    assert accum["loss"] == pytest.approx(big["loss"], rel=1e-5)
    assert_same_params(accum, big, atol=2e-6)
    assert accum["backbone"]["net.0.weight"].ne(0).any()


@SLOW
def test_bf16_autocast_trains(tmp_path):
    res, fp32 = run_each(tiny(tmp_path / "bf16", parallel__precision="bf16", schedule__steps=30, logging__log_every=10),
                         tiny(tmp_path / "fp32", schedule__steps=30, logging__log_every=10))
    assert res["loss"][-1] < res["loss"][0] - 1.0
    assert res["loss"][-1] == pytest.approx(fp32["loss"][-1], rel=0.05)  # bf16 follows the fp32 run
    assert res["loss"] != fp32["loss"]  # ... but it did run in bf16


def inject_nonfinite(cfg_dict: dict, out_dir: str) -> None:
    """Every rank: three steps, with +inf injected into one backbone gradient on rank 0 at the second;
    records per step whether it was applied and whether the backbone and the head changed."""
    from dsoft_dist.train.trainer import Trainer

    cfg = config_from_dict(cfg_dict)
    with distributed("gloo") as env:
        t = Trainer(cfg, env)
        scaler = getattr(t.engine, "scaler", None)  # DDP's; DeepSpeed keeps its own
        if scaler is not None:
            scaler.scale = 2.0 ** 10  # low enough that only the injected step overflows
        inject = [False]
        first = next(t.engine.module.parameters())
        first.register_hook(lambda g: torch.full_like(g, math.inf) if inject[0] and env.rank == 0 else g)
        records = []
        for i in range(3):
            inject[0] = i == 1
            before = [p.detach().clone() for p in t.engine.module.parameters()] + [t.head.weight.detach().clone()]
            scale = scaler.scale if scaler is not None else None
            out = t.updater(t.data, 0.1)
            after = [p.detach() for p in t.engine.module.parameters()] + [t.head.weight.detach()]
            records.append({"applied": out.applied, "scale_before": scale,
                            "scale_after": scaler.scale if scaler is not None else None,
                            "backbone_changed": any(not torch.equal(a, b) for a, b in zip(before[:-1], after[:-1])),
                            "head_changed": not torch.equal(before[-1], after[-1]), "loss": float(out.loss)})
        torch.save(records, os.path.join(out_dir, f"rank{env.rank}.pt"))
        t.close()


@SLOW
def test_fp16_overflow_skips_backbone_and_head_step_together(tmp_path):
    cfg = tiny(tmp_path / "fp16", parallel__precision="fp16")
    spawn_local(inject_nonfinite, 2, (cfg, str(tmp_path)))
    for rank in (0, 1):
        rec = torch.load(tmp_path / f"rank{rank}.pt")
        assert [r["applied"] for r in rec] == [True, False, True]
        assert rec[0]["backbone_changed"] and rec[0]["head_changed"]
        assert not rec[1]["backbone_changed"] and not rec[1]["head_changed"]  # both skipped, on every rank
        assert rec[2]["backbone_changed"] and rec[2]["head_changed"]
        assert rec[1]["scale_after"] == rec[1]["scale_before"] / 2 == 2.0 ** 9
        assert all(math.isfinite(r["loss"]) for r in rec)


def _yaml(tmp_path, cfg_dict) -> str:
    import yaml

    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg_dict))
    return str(path)


def _torchrun(args, tmp_path):
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TORCHELASTIC_ERROR_FILE"}
    env["WANDB_MODE"] = "disabled"
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "dsoft_dist.train", *args], capture_output=True, text=True, cwd=tmp_path,
                          timeout=600, env=env)


@SLOW
def test_torchrun_and_python_m_run_the_same_trainer(tmp_path):
    """The entry point under torchrun (2 ranks) and as python -m on one process gives the same first loss
    as the ranks dsoft train spawns itself."""
    import subprocess
    import sys

    spawned = run(tiny(tmp_path / "spawned"))
    proc = _torchrun(["--config", _yaml(tmp_path, tiny(tmp_path / "torchrun"))], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(x) for x in open(tmp_path / "torchrun" / "metrics.jsonl")]
    assert [r["loss"] for r in rows] == spawned["loss"]  # same ranks, same data, same numbers
    assert "Written to" in proc.stdout
    single = subprocess.run([sys.executable, "-m", "dsoft_dist.train", "--config", _yaml(tmp_path, tiny(tmp_path / "one")),
                             "--nproc", "1"], capture_output=True, text=True, timeout=600,
                            env={**os.environ, "WANDB_MODE": "disabled"})
    assert single.returncode == 0, single.stderr[-3000:]
    assert json.loads(open(tmp_path / "one" / "report.json").read())["world_size"] == 1


@SLOW
def test_torchrun_reports_the_failing_ranks_traceback(tmp_path):
    cfg = tiny(tmp_path / "fails", eval__bins=[str(tmp_path / "missing.bin")], eval__at_start=True)
    proc = _torchrun(["--config", _yaml(tmp_path, cfg)], tmp_path)
    assert proc.returncode != 0
    assert "Root Cause" in proc.stderr and "missing.bin" in proc.stderr  # @record: the rank's error reaches torchrun


def _stuck_rank(timeout_s: float) -> None:
    """Rank 1 skips a collective rank 0 waits in."""
    import time

    with distributed("gloo", timeout_s=timeout_s) as env:
        if env.rank == 0:
            torch.distributed.all_reduce(torch.ones(1))
        else:
            time.sleep(3 * timeout_s)
            torch.distributed.all_reduce(torch.ones(1))  # too late


@SLOW
def test_a_collective_timeout_names_what_to_check():
    """parallel.timeout_s reaches the process group: a stuck rank fails the other after it, with a message
    naming MASTER_ADDR, NCCL_SOCKET_IFNAME / GLOO_SOCKET_IFNAME and the setting."""
    import time

    t0 = time.time()
    with pytest.raises(Exception) as info:
        spawn_local(_stuck_rank, 2, (2.0,))
    text = str(info.value)
    assert "a collective timed out (parallel.timeout_s=2)" in text
    assert "MASTER_ADDR=127.0.0.1" in text and "GLOO_SOCKET_IFNAME" in text and "NCCL_SOCKET_IFNAME" in text
    assert time.time() - t0 < 60
