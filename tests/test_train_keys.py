"""Every config key is read: changing any field of the schema changes what a run does.

For each dotted key of ``Config`` the test runs a tiny real run (one gloo rank, 2 steps)
with the key at a changed value and compares it with the base run of its context (run once per
context, for every key that shares it: a fingerprint does not depend on the run's folder, which
test_the_fingerprint_does_not_depend_on_the_folder checks) by a fingerprint of
what ran: the loss and lr of every step, the final weights, the verification metrics, the
files written, the progress bar and wandb state, the report's title, or the error the run
raised. A key is covered when the fingerprints differ. Keys that only choose how the same
numbers are computed (model.activation_checkpointing, data.num_workers, head.chunk_size, head.logit_cache_mb, head.backend, head.compute_dtype,
eval.batch_size; optimizer.head_mode and optimizer.head_step_in_backward when every row is touched: with the
logit cache, the step inside backward and the separate step give the same bits) are seen in the component that
received them (the loader's workers, the head's chunk size, logit cache, backend and GEMM dtype, the head
optimizer's mode and where it steps, the batch size handed to the embedding extractor);
head.compute_dtype's effect on a GPU is tests/test_kernels_gpu.py's. The few keys only a multi-process
launch, DeepSpeed or a module of one's own (extra_modules) can show are listed in ELSEWHERE with the test
that shows them; the test checks that the three groups together are exactly the schema's fields.

    python -m pytest tests/test_train_keys.py
"""
from __future__ import annotations

import copy
import dataclasses
import os
import sys

import pytest
import torch

from dsoft_dist.config import config_from_dict
from dsoft_dist.config.schema import Config
from tests.test_data_fixtures import write_shards

pytestmark = pytest.mark.slow(reason="two short trainings per schema key (~100 keys)")

VECTORS = {
    "name": "keys", "seed": 0,
    "model": {"name": "mlp", "embedding_size": 8, "in_features": 12},
    "head": {"loss": "d_softmax", "negatives": "all", "scale": 16.0},
    "data": {"source": "synthetic", "synthetic_mode": "vectors", "vector_dim": 12, "num_classes": 12,
             "samples_per_class": 4, "batch_size": 8, "num_workers": 0},
    "optimizer": {"name": "sgd", "lr": 0.2},
    "schedule": {"steps": 2, "warmup_steps": 0, "decay": "cosine"},
    "parallel": {"nproc": 1, "backend": "gloo"},
    "logging": {"log_every": 1},
}
IMAGES = {"model": {"name": "iresnet_tiny", "embedding_size": 8, "input_size": 16, "in_features": 0},
          "data": {"synthetic_mode": "images", "image_size": 16}}

# key: (context: overrides applied to both runs, changed value). Context "images" = the IMAGES model and data.
CASES = {
    "seed": ({}, 1),
    "name": ({}, "other"),
    "model.name": ({}, "iresnet_tiny"),
    "model.embedding_size": ({}, 6),
    "model.input_size": ("images", 24),
    "model.in_features": ({}, 10),
    "model.dropout": ({}, 0.5),
    "model.activation_checkpointing": ("images", True),
    "head.loss": ({}, "arcface"),
    "head.negatives": ({}, "batch"),
    "head.sample_rate": ({"head.negatives": "random"}, 0.5),
    "head.inter_correction": ({"head.negatives": "random", "head.sample_rate": 0.5}, True),
    "head.nearest_per_class": ({"head.negatives": "nearest", "head.sample_rate": 0.5}, 1),
    "head.nearest_refresh": ({"head.negatives": "nearest", "head.sample_rate": 0.5, "head.nearest_per_class": 2}, 1),
    "head.scale": ({}, 30.0),
    "head.end_point": ({}, 0.5),
    "head.inter_weight": ({}, 0.5),
    "head.inter_weight_end": ({}, 0.5),
    "head.m1": ({"head.loss": "margin"}, 1.5),
    "head.m2": ({"head.loss": "margin"}, 0.3),
    "head.m3": ({"head.loss": "margin"}, 0.2),
    "head.chunk_size": ({}, 4),
    "head.logit_cache_mb": ({}, 0.0),
    "head.seed": ({}, 3),
    "head.backend": ({}, "torch"),
    "head.compute_dtype": ({}, "bf16"),
    "data.source": ("shards", "synthetic"),
    "data.shards": ("shards", "{dir}/missing-{{000000..000001}}.tar"),
    "data.manifest": ("shards", "{dir}/nowhere.json"),
    "data.num_classes": ({}, 14),
    "data.synthetic_mode": ({}, "images"),
    "data.samples_per_class": ({}, 8),
    "data.image_size": ("images", 24),
    "data.batch_size": ({}, 4),
    "data.num_workers": ({}, 1),
    "data.shuffle_buffer": ("shards", 0),
    "data.augment_flip": ("images", False),
    "data.color_jitter": ("images", 0.5),
    "data.bad_data": ("bad_shards", "fail"),
    "data.seed": ({}, 5),
    "data.steps_per_epoch": ({}, 1),
    "data.random_crop": ("images", True),
    "data.difficulty": ("images", "hard"),
    "data.vector_dim": ({}, 10),
    "optimizer.name": ({}, "adamw"),
    "optimizer.lr": ({}, 0.1),
    "optimizer.momentum": ({}, 0.5),
    "optimizer.nesterov": ({}, True),
    "optimizer.weight_decay": ({}, 0.1),
    "optimizer.betas": ({"optimizer.name": "adamw"}, [0.5, 0.9]),
    "optimizer.eps": ({"optimizer.name": "adamw"}, 1.0),
    "optimizer.head_mode": ({}, "dense"),
    "optimizer.head_step_in_backward": ({"optimizer.weight_decay": 0.1}, False),
    "optimizer.grad_clip": ({}, 0.01),
    "optimizer.clip_scope": ({"optimizer.grad_clip": 0.01}, "both"),
    "optimizer.grad_accum_steps": ({}, 2),
    "optimizer.decay_norm_and_bias": ({"optimizer.weight_decay": 0.5}, True),
    "optimizer.max_skipped_in_a_row": ({"optimizer.lr": 1e30, "head.loss": "softmax"}, 1),
    "schedule.steps": ({}, 3),
    "schedule.warmup_steps": ({}, 1),
    "schedule.decay": ({}, "constant"),
    "schedule.poly_power": ({"schedule.decay": "poly"}, 1.0),
    "schedule.min_lr_ratio": ({}, 0.5),
    "parallel.backend": ({}, "nccl"),
    "parallel.precision": ({}, "bf16"),
    "logging.output_dir": ({}, "{dir}/elsewhere"),
    "logging.log_every": ({"schedule.steps": 4}, 3),
    "logging.wandb": ({}, "offline"),
    "logging.wandb_project": ({"logging.wandb": "offline"}, "another-project"),
    "logging.progress": ({}, False),
    "logging.sample_keys": ({}, True),
    "logging.tensorboard": ({}, True),
    "eval.bins": ("images", ["{dir}/set.bin"]),
    "eval.pairs": ("images", ["{dir}/pairs.txt"]),
    "eval.every_steps": ("images+bins", 1),
    "eval.flip": ("images+bins", False),
    "eval.batch_size": ("images+bins", 3),
    "eval.folds": ("images+bins", 3),
    "eval.fars": ("images+pairs", [0.5]),
    "eval.at_start": ("images+bins", True),
    "eval.synthetic_identities": ("images", 4),
    "eval.synthetic_pairs": ("images+synthetic", 20),
    "checkpoint.dir": ({}, "{dir}/ckpts"),
    "checkpoint.every_steps": ({}, 1),
    "checkpoint.every_minutes": ({}, 0.000001),
    "checkpoint.keep_last": ({"checkpoint.every_steps": 1}, 1),
    "checkpoint.keep_best": ("images+bins", "set/accuracy"),
    "checkpoint.resume": ({}, "{dir}/no-such-checkpoint"),
    "checkpoint.init_from": ({}, "{dir}/no-such-checkpoint"),
    "checkpoint.signals": ({}, ["SIGUSR2"]),
    "checkpoint.async_save": ({"checkpoint.every_steps": 1}, True),
}
# keys whose effect needs several processes, DeepSpeed or a module of one's own: the test that shows it
ELSEWHERE = {
    "extra_modules": "tests/test_registry.py::test_a_loss_from_extra_modules_is_chosen_and_trained (the module it "
                     "names registers the loss the run trains with)",
    "parallel.nproc": "tests/test_demo.py::test_demo_two_ranks_learns_unseen_identities (world_size 2 from nproc)",
    "parallel.engine": "tests/test_train_deepspeed.py::test_ddp_and_deepspeed_zero_agree_after_three_steps",
    "parallel.zero_stage": "tests/test_train_deepspeed.py::test_ddp_and_deepspeed_zero_agree_after_three_steps",
    "parallel.timeout_s": "tests/test_train_dist.py::test_a_collective_timeout_names_what_to_check",
    "divergence.max_rollbacks": "tests/test_rollback.py::test_the_run_stops_when_the_roll_backs_are_used_up (and "
                                "::test_off_the_loss_is_not_watched: 0 trains through the explosion)",
    "divergence.steps": "tests/test_rollback.py::test_the_guard_counts_a_streak_and_keeps_a_window_of_good_steps",
    "divergence.factor": "tests/test_rollback.py::test_the_guard_counts_a_streak_and_keeps_a_window_of_good_steps",
    "divergence.window": "tests/test_rollback.py::test_the_guard_counts_a_streak_and_keeps_a_window_of_good_steps",
    "divergence.lr_scale": "tests/test_rollback.py::test_the_roll_back_discards_the_checkpoints_after_its_target_and_"
                           "scales_the_learning_rate",
    "data.max_bad_samples": "tests/test_data_faults.py::test_two_ranks_skip_a_shard_damaged_mid_epoch_and_stop_together_"
                            "past_the_limit (a shard damaged mid-run passes the limit; every rank stops)",
    "parallel.hang_timeout_minutes": "tests/test_hang.py::test_a_blocked_rank_is_named_and_the_restart_resumes_to_the_"
                                     "undisturbed_weights (a hang needs two ranks)",
    "logging.overwrite": "tests/test_run_folder.py::test_overwrite_replaces_the_old_run_and_leaves_none_of_its_"
                         "checkpoints (it acts on a folder holding an earlier run)",
}


def all_keys(cls=Config, prefix="") -> list[str]:
    out = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(f.type) or f.name in ("model", "head", "data", "optimizer", "divergence",
                                                           "schedule", "parallel", "logging", "eval", "checkpoint"):
            out += all_keys(type(getattr(cls(), f.name)), f"{prefix}{f.name}.")
        else:
            out.append(prefix + f.name)
    return out


def test_every_schema_key_has_a_case():
    assert sorted(CASES) + sorted(ELSEWHERE) and set(CASES) | set(ELSEWHERE) == set(all_keys())
    assert not set(CASES) & set(ELSEWHERE)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tiny shard set (+ one with a corrupt image), a .bin and a pair list of 16 px synthetic faces."""
    from dsoft_dist.data.verification import collect_synthetic, sample_pairs, write_bin

    root = tmp_path_factory.mktemp("keys")
    write_shards(str(root / "shards"), [12, 12], size=16, num_classes=24)
    write_shards(str(root / "bad"), [12, 12], size=16, num_classes=24, overrides={3: {"jpg": b"\xff\xd8 broken"}})
    groups = collect_synthetic(6, per_identity=4, image_size=16, seed=0, fmt="png")
    write_bin(str(root / "set.bin"), sample_pairs(groups, 30, seed=0))
    from dsoft_dist.data.verification import write_pair_list

    write_pair_list(str(root / "pairs.txt"), sample_pairs(groups, 30, seed=1), copy_images=True)
    return root


def _set(cfg: dict, dotted: str, value) -> None:
    section, _, key = dotted.rpartition(".")
    (cfg.setdefault(section, {}) if section else cfg)[key] = value


def build_case(context, dotted, value, root, run_dir) -> dict:
    cfg = copy.deepcopy(VECTORS)
    cfg["logging"]["output_dir"] = str(run_dir)
    names = context.split("+") if isinstance(context, str) else []
    if "images" in names or {"shards", "bad_shards"} & set(names):
        for section, values in IMAGES.items():
            cfg[section].update(values)
    if {"shards", "bad_shards"} & set(names):
        folder = root / ("shards" if "shards" in names else "bad")
        cfg["data"].update(source="webdataset", manifest=str(folder / "manifest.json"), num_classes=24,
                           shuffle_buffer=100)
    if "bins" in names:
        cfg["eval"] = {"bins": [str(root / "set.bin")]}
    if "pairs" in names:
        cfg["eval"] = {"pairs": [str(root / "pairs.txt")]}
    if "synthetic" in names:
        cfg["eval"] = {"synthetic_identities": 4}
    for k, v in (context.items() if isinstance(context, dict) else []):
        _set(cfg, k, v)
    if dotted is not None:
        fill = lambda v: v.format(dir=root) if isinstance(v, str) else v  # noqa: E731
        _set(cfg, dotted, [fill(v) for v in value] if isinstance(value, list) else fill(value))
    return cfg


def fingerprint(cfg_dict: dict, root) -> dict:
    """What one in-process run did (or the error it raised)."""
    from dsoft_dist.parallel.processes import distributed
    from dsoft_dist.train import verify
    from dsoft_dist.train.trainer import Trainer

    calls = []
    # undone after this run: a second run's patch would otherwise wrap this one, and its calls would land in
    # this run's list too (a base run shared by many keys kept growing)
    with pytest.MonkeyPatch.context() as patch:
        real_extract = verify.extract_embeddings
        patch.setattr(verify, "extract_embeddings",
                      lambda *a, **kw: calls.append(kw["batch_size"]) or real_extract(*a, **kw))
        patch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
        try:
            cfg = config_from_dict(cfg_dict)
            with distributed(cfg.parallel.backend) as env:
                t = Trainer(cfg, env)
                wandb_run = t.metrics.sink._wandb
                fp = {"bar": t.metrics.bar.disable, "wandb": wandb_run.project if wandb_run is not None else None,
                      "workers": t.data.loader.num_workers, "chunk": t.head.chunk_size,
                      "cache_mb": t.head.logit_cache_mb,
                      "head_optimizer": (t.head_optimizer.mode, t.head_config.head_step_in_backward),
                      "backend": t.head.backend, "compute_dtype": str(t.head.compute_dtype),
                      "signals": sorted(s.name for s in t.preemption._previous),
                      "checkpointing": getattr(t.engine.module, "activation_checkpointing", None)}
                checkpointer = t.checkpointer
                summary = t.train()
                t.close()
            params = [p.detach().double().sum().item() for p in t.engine.module.parameters()]
            files = sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs
                           if "wandb" not in d or f.endswith(".wandb"))
            fp.update(loss=[r["loss"] for r in summary["log"]], lr=[r["lr"] for r in summary["log"]],
                      params=params, head=t.head.weight.detach().double().sum().item(), evals=summary["evals"],
                      title=summary["report"].splitlines()[0], files=[f for f in files if "-run-" not in f],
                      wandb_files=any(".wandb" in f for f in files), eval_batches=calls,
                      background_saves=checkpointer.background_saves)
            return fp
        except (ValueError, RuntimeError, OSError) as err:
            return {"error": f"{type(err).__name__}: {err}"}


@pytest.fixture(scope="module")
def base_run(assets, tmp_path_factory):
    """The base run's fingerprint, once per context (many keys share one): fingerprint(context)."""
    made: dict[str, dict] = {}

    def get(context) -> dict:
        if repr(context) not in made:
            root = tmp_path_factory.mktemp("base")
            made[repr(context)] = fingerprint(build_case(context, None, None, assets, root / "run"), root)
        return made[repr(context)]
    return get


def test_the_fingerprint_does_not_depend_on_the_folder(assets, tmp_path):
    """What makes base_run's sharing sound: a run's fingerprint is the same from any folder."""
    for i, context in enumerate(({}, "images+bins")):
        a, b = tmp_path / f"{i}a", tmp_path / f"{i}b"
        first = fingerprint(build_case(context, None, None, assets, a / "run"), a)
        second = fingerprint(build_case(context, None, None, assets, b / "run"), b)
        assert "error" not in first and first == second, context


@pytest.mark.parametrize("dotted", sorted(CASES))
def test_changing_the_key_changes_what_runs(dotted, assets, base_run, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)  # logging.wandb must decide here
    context, value = CASES[dotted]
    base = base_run(context)
    assert "error" not in base, base  # the base run of every context works
    changed = fingerprint(build_case(context, dotted, value, assets, tmp_path / "run"), tmp_path)
    assert changed != base, f"{dotted}={value!r} changed nothing that ran"
    torch.set_num_threads(min(2, os.cpu_count() or 1))
