"""The registries of dsoft_dist.registry: a part of one's own (a loss, a data source) registered, chosen by the
config and trained through the real Trainer on one gloo rank; unknown names, names taken twice, extra_modules
that cannot be imported; the schema's choices are the registries' names.

    python -m pytest tests/test_registry.py
"""
from __future__ import annotations

import dataclasses
import textwrap

import pytest
import torch
from torch.utils.data import IterableDataset

from dsoft_dist.config import config_from_dict, load_config
from dsoft_dist.config.schema import (
    DataConfig,
    HeadConfig,
    ModelConfig,
    OptimizerConfig,
    ParallelConfig,
    ScheduleConfig,
)
from dsoft_dist.data.datasets import Chunk, Slot
from dsoft_dist.data.pipeline import TrainLoader
from dsoft_dist.data.rng import hash_keys
from dsoft_dist.data.sources import DataSource, epoch_batches, loader_kwargs
from dsoft_dist.errors import ConfigError
from dsoft_dist.losses import functional as LF
from dsoft_dist.losses.forms import LossForm
from dsoft_dist.registry import DATA_SOURCES, ENGINES, LOSSES, LR_SCHEDULES, MODELS, OPTIMIZERS, Registry

REGISTRIES = (ENGINES, MODELS, LOSSES, DATA_SOURCES, LR_SCHEDULES, OPTIMIZERS)
# where the schema reads each registry's key: (section class, field)
SECTIONS = {"parallel.engine": (ParallelConfig, "engine"), "model.name": (ModelConfig, "name"),
            "head.loss": (HeadConfig, "loss"), "data.source": (DataConfig, "source"),
            "schedule.decay": (ScheduleConfig, "decay"), "optimizer.name": (OptimizerConfig, "name")}
NEEDS = {"webdataset": {"shards": "/data/train-{000000..000001}.tar"}}  # what a name needs beside it


# ----------------------------------------------------------------------------- the toy parts

def half_inter_rows(z, log_sum_with, head):
    """D-Softmax with half its inter term: intra + 0.5 inter (a loss the package does not have)."""
    intra = LF.intra_from_parts(z, head.scale, head.end_point)  # (B,)
    inter = log_sum_with(torch.zeros_like(z))  # (B,)
    return intra + 0.5 * inter, {"toy_intra": intra, "toy_inter": inter}


TOY_LOSS = LossForm(half_inter_rows, takes_margins=False, presets={"end_point": 0.9, "inter_weight_end": None})


class ToyVectors(IterableDataset):
    """Gaussian vectors (data.vector_dim) around one fixed center per class, drawn afresh per (epoch, rank, pass):
    one Chunk with this slot's share of the epoch (no sample ids)."""

    def __init__(self, cfg, slot: Slot, keys: bool):
        self.cfg, self.slot, self.keys = cfg, slot, keys

    def __iter__(self):
        c, s = self.cfg, self.slot
        centers = torch.randn(c.num_classes, c.vector_dim, generator=torch.Generator().manual_seed(c.seed))
        gen = torch.Generator().manual_seed(int(hash_keys(c.seed, s.epoch, s.rank, s.pass_index)))
        n = c.num_classes * c.samples_per_class // s.world_size
        labels = torch.randint(0, c.num_classes, (n,), generator=gen)
        x = centers[labels] + 0.1 * torch.randn(n, c.vector_dim, generator=gen)  # (n, D)
        keys = [f"toy-{i}" for i in range(n)] if self.keys else None
        yield Chunk(x, labels, torch.full((n,), -1, dtype=torch.int64), keys, {"worker": 0, "samples": n, "bad": {}})


LOADERS: list[tuple] = []  # (rank, world_size, epoch, start_batch) of every loader the toy source built


def toy_loader(cfg, rank, world_size, epoch, start_batch=0, done=None, keys=False) -> TrainLoader:
    """The toy source's loader: ToyVectors streams, batched by the package's TrainLoader."""
    if done is not None:
        raise ValueError("data.source=toy_vectors has no sample ids: it cannot resume on another world size")
    LOADERS.append((rank, world_size, epoch, start_batch))
    total = cfg.num_classes * cfg.samples_per_class
    batches = epoch_batches(total, world_size, cfg.batch_size, cfg.steps_per_epoch, None)
    slot = Slot(rank=rank, world_size=world_size, epoch=epoch, seed=cfg.seed)
    return TrainLoader(lambda p: ToyVectors(cfg, dataclasses.replace(slot, pass_index=p), keys), batches,
                       normalize=False, **loader_kwargs(cfg, rank, world_size, epoch, start_batch, None, keys))



TOY_SOURCE = DataSource(toy_loader, lambda cfg: None, lambda cfg: {"source": "toy_vectors", "dim": cfg.vector_dim})


@pytest.fixture
def registries(monkeypatch):
    """Every registry with its built-ins, restored after the test (its private table is swapped for a copy), so
    the parts a test registers do not become choices of the tests after it."""
    for registry in REGISTRIES:
        registry.names()  # the built-ins loaded first
        monkeypatch.setattr(registry, "_parts", dict(registry._parts))
    return REGISTRIES


def tiny_run(tmp_path, **sections) -> dict:
    """The smallest run: an MLP on 12-d vectors, 12 classes, 2 steps of 8 on one gloo rank."""
    cfg = {"name": "toy", "seed": 0,
           "model": {"name": "mlp", "embedding_size": 8, "in_features": 12},
           "head": {"loss": "d_softmax", "scale": 16.0},
           "data": {"source": "synthetic", "synthetic_mode": "vectors", "vector_dim": 12, "num_classes": 12,
                    "samples_per_class": 4, "batch_size": 8, "num_workers": 0},
           "optimizer": {"name": "sgd", "lr": 0.2},
           "schedule": {"steps": 2, "warmup_steps": 0, "decay": "constant"},
           "parallel": {"nproc": 1, "backend": "gloo"},
           "logging": {"output_dir": str(tmp_path / "run"), "log_every": 1, "progress": False},
           "checkpoint": {"resume": "never"}}
    for key, value in sections.items():
        cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) else value
    return cfg


def train(cfg_dict: dict) -> dict:
    """Trains ``cfg_dict`` in this process through the real Trainer; the summary."""
    from dsoft_dist.parallel.processes import distributed
    from dsoft_dist.train.trainer import Trainer

    cfg = config_from_dict(cfg_dict)
    with distributed(cfg.parallel.backend) as env:
        trainer = Trainer(cfg, env)
        try:
            return trainer.train()
        finally:
            trainer.close()


# ----------------------------------------------------------------------------- tests


def test_a_toy_loss_and_data_source_are_chosen_by_the_config_and_trained(registries, tmp_path):
    LOSSES.register("toy_half_inter", TOY_LOSS)
    DATA_SOURCES.register("toy_vectors", TOY_SOURCE)
    LOADERS.clear()
    summary = train(tiny_run(tmp_path, head={"loss": "toy_half_inter"}, data={"source": "toy_vectors"}))
    rows = summary["log"]
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:  # the toy loss ran (its terms are logged) and is what the step minimized
        assert {"toy_intra", "toy_inter"} <= set(row) and "intra" not in row
        assert row["loss"] == pytest.approx(row["toy_intra"] + 0.5 * row["toy_inter"], rel=1e-5)
    assert rows[1]["loss"] != rows[0]["loss"]
    assert LOADERS and LOADERS[0] == (0, 1, 0, 0)  # the toy source built the epoch's loader on rank 0 of 1
    assert summary["config"]["data"]["source"] == "toy_vectors" and summary["config"]["head"]["loss"] == \
        "toy_half_inter"


def test_a_loss_from_extra_modules_is_chosen_and_trained(registries, tmp_path, monkeypatch):
    """The module named in extra_modules is imported before the sections are built: its loss validates and
    trains, and a learning-rate decay it registers is the schedule's."""
    module = f"toy_parts_{tmp_path.name}"  # a fresh module name: an imported module is not imported again
    (tmp_path / f"{module}.py").write_text(textwrap.dedent("""
        from dsoft_dist.losses.forms import LossForm, margin_rows
        from dsoft_dist.registry import LOSSES, LR_SCHEDULES

        LOSSES.register("toy_arc", LossForm(margin_rows, {"m1": 1.0, "m2": 0.25, "m3": 0.0}))
        LR_SCHEDULES.register("toy_halving", lambda p, sched: 0.5 ** (p * sched.steps))
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError, match="head.loss='toy_arc' is invalid"):
        load_config(None, ["head.loss=toy_arc"])  # not a choice before its module is imported
    cfg = tiny_run(tmp_path, extra_modules=[module], head={"loss": "toy_arc"},
                   schedule={"decay": "toy_halving", "steps": 3})
    assert config_from_dict(cfg).head.margins() == (1.0, 0.25, 0.0)
    rows = train(cfg)["log"]
    assert [r["lr"] for r in rows] == pytest.approx([0.2, 0.1, 0.05])
    assert all("loss" in r and "intra" not in r for r in rows)


@pytest.mark.parametrize("registry", REGISTRIES, ids=lambda r: r.key)
def test_an_unknown_name_lists_the_registered_names(registry):
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"{registry.key}=no_such_part"])
    message = str(err.value)
    assert f"{registry.key}='no_such_part' is invalid" in message and "extra_modules" in message
    assert all(name in message for name in registry.names())


@pytest.mark.parametrize("registry", REGISTRIES, ids=lambda r: r.key)
def test_the_schema_accepts_exactly_the_registered_names(registry, registries):
    section, field = SECTIONS[registry.key]
    for name in registry.names():
        assert getattr(section(**{field: name}, **NEEDS.get(name, {})), field) == name
    with pytest.raises(ConfigError, match=f"{registry.key}='toy_part' is invalid"):
        section(**{field: "toy_part"})
    registry.register("toy_part", registry.get(registry.names()[0]))  # a new name is a choice at once
    assert getattr(section(**{field: "toy_part"}), field) == "toy_part"


def test_a_name_taken_twice_is_refused(registries):
    with pytest.raises(ValueError, match="loss 'd_softmax' is registered already .*losses.forms.LossForm"):
        LOSSES.register("d_softmax", TOY_LOSS)
    assert LOSSES.get("d_softmax") is not TOY_LOSS
    LOSSES.register("toy_half_inter", TOY_LOSS)
    LOSSES.register("toy_half_inter", TOY_LOSS)  # the same part again (a module imported twice): no change
    with pytest.raises(ValueError, match="registered already"):
        DATA_SOURCES.register("webdataset", TOY_SOURCE)
    own = Registry("toy", "toy.name", ())
    own.register("a", 1)
    with pytest.raises(ValueError, match="toy 'a' is registered already"):
        own.register("a", 2)
    own.register("a", 2, replace=True)
    assert own.get("a") == 2 and own.names() == ("a",)


def test_extra_modules_that_cannot_be_imported_are_one_line_config_errors():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["extra_modules=[no_such_module_for_dsoft]"])
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("extra_modules[0]='no_such_module_for_dsoft' cannot be imported")
    with pytest.raises(ConfigError, match=r"extra_modules\[1\]='' is invalid"):
        load_config(None, ["extra_modules=[json, '']"])
    with pytest.raises(ConfigError, match="extra_modules='json' is invalid: expected a list"):
        load_config(None, ["extra_modules=json"])
    assert load_config(None, ["extra_modules=[json]"]).extra_modules == ["json"]
