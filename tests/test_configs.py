"""The GPU recipes in configs/: every data set x loss variant validates and follows the recipe it states."""
from pathlib import Path

import pytest
import torch

from dsoft_dist.config import load_config
from dsoft_dist.models import build_model
from dsoft_dist.train.build import resolve_head_step
from dsoft_dist.train.engines.deepspeed import deepspeed_config

ROOT = Path(__file__).resolve().parents[1]
# data set: (identities, images, GPUs the recipe is sized for, backbone)
DATASETS = {"ms1m_r50": (85_742, 5_822_653, 8, "iresnet50"), "glint360k_r100": (360_232, 17_091_657, 8, "iresnet100"),
            "webface42m_r100": (2_059_906, 42_474_557, 64, "iresnet100")}
# variant: (loss, negatives, sample rate)
VARIANTS = {"dsoftmax": ("d_softmax_paper", "all", 1.0), "dsoftmax_k64": ("d_softmax_paper", "random", 1 / 64),
            "dsoftmax_b": ("d_softmax_paper", "batch", 1.0), "arcface": ("arcface", "all", 1.0),
            "partialfc": ("arcface", "partial", 0.1)}
RECIPES = [(d, v) for d in DATASETS for v in VARIANTS]
# arcface_torch's WebFace42M backbones, on its own recipes (configs/wf42m_pfc03_*): name: (backbone, GPUs, images per
# GPU, epochs, warmup epochs, optimizer, lr, weight decay, activation checkpointing)
ARCFACE_TORCH_RECIPES = {
    "webface42m_vit_t_dsoftmax": ("vit_t", 64, 384, 40, 4, "adamw", 1e-3, 0.1, False),
    "webface42m_vit_s_dsoftmax": ("vit_s", 64, 384, 40, 4, "adamw", 1e-3, 0.1, False),
    "webface42m_vit_b_dsoftmax": ("vit_b", 64, 384, 40, 4, "adamw", 1e-3, 0.1, True),
    "webface42m_r200_dsoftmax": ("iresnet200", 32, 128, 20, 2, "sgd", 0.4, 5e-4, False),
}


def test_every_recipe_file_exists_and_nothing_else_is_unaccounted():
    shipped = {p.stem for p in (ROOT / "configs").glob("*.yaml")}
    assert shipped == {f"{d}_{v}" for d, v in RECIPES} | set(ARCFACE_TORCH_RECIPES) | {"demo"}


@pytest.mark.parametrize("dataset,variant", RECIPES)
def test_recipe(dataset, variant):
    cfg = load_config(ROOT / "configs" / f"{dataset}_{variant}.yaml")
    ids, images, gpus, backbone = DATASETS[dataset]
    loss, negatives, rate = VARIANTS[variant]
    assert (cfg.data.num_classes, cfg.model.name, cfg.name) == (ids, backbone, f"{dataset}_{variant}")
    assert (cfg.head.loss, cfg.head.negatives, cfg.head.sample_rate) == (loss, negatives, rate)
    global_batch = cfg.data.batch_size * gpus * cfg.optimizer.grad_accum_steps
    assert cfg.schedule.steps == round(20 * images / global_batch)  # 20 epochs, as the header says
    assert f"{gpus} GPUs x {cfg.data.batch_size} images" in (ROOT / "configs" / f"{dataset}_{variant}.yaml").read_text()
    assert 0 < cfg.schedule.warmup_steps <= round(2 * images / global_batch)  # at most 2 epochs of warmup
    assert (cfg.parallel.precision, cfg.head.compute_dtype, cfg.optimizer.name, cfg.optimizer.lr) == \
        ("bf16", "bf16", "sgd", 0.1)
    assert cfg.data.source == "webdataset" and cfg.eval.bins and cfg.eval.every_steps > 0
    assert resolve_head_step(cfg).head_step_in_backward is True  # no accumulation, backbone-only clipping, bf16
    assert deepspeed_config(cfg)["gradient_clipping"] == cfg.optimizer.grad_clip  # also valid under DeepSpeed
    assert cfg.model.input_size == cfg.data.image_size == 112
    model = build_model(cfg.model.name, embedding_size=cfg.model.embedding_size, input_size=cfg.model.input_size)
    assert sum(p.numel() for p in model.parameters()) > 40e6  # a real IResNet-50/100, not a tiny variant


@pytest.mark.parametrize("name", sorted(ARCFACE_TORCH_RECIPES))
def test_arcface_torch_backbone_recipe(name):
    """The WebFace42M recipes of arcface_torch's larger backbones: D-Softmax on its schedule and optimizer."""
    path = ROOT / "configs" / f"{name}.yaml"
    cfg = load_config(path)
    backbone, gpus, per_gpu, epochs, warmup_epochs, optimizer, lr, decay, checkpointing = ARCFACE_TORCH_RECIPES[name]
    ids, images = DATASETS["webface42m_r100"][:2]
    assert (cfg.name, cfg.model.name, cfg.data.num_classes, cfg.data.batch_size) == (name, backbone, ids, per_gpu)
    assert (cfg.head.loss, cfg.head.negatives) == ("d_softmax_paper", "all")
    global_batch = per_gpu * gpus * cfg.optimizer.grad_accum_steps
    assert cfg.schedule.steps == round(epochs * images / global_batch)
    assert cfg.schedule.warmup_steps == round(warmup_epochs * images / global_batch)
    assert f"{gpus} GPUs x {per_gpu} images" in path.read_text() and f"{epochs} epochs" in path.read_text()
    assert (cfg.optimizer.name, cfg.optimizer.lr, cfg.optimizer.weight_decay) == (optimizer, lr, decay)
    assert cfg.model.activation_checkpointing is checkpointing
    assert (cfg.parallel.precision, cfg.head.compute_dtype, cfg.schedule.decay) == ("bf16", "bf16", "poly")
    assert cfg.model.input_size == cfg.data.image_size == 112 and cfg.eval.bins
    assert resolve_head_step(cfg).head_step_in_backward is True
    assert deepspeed_config(cfg)["gradient_clipping"] == cfg.optimizer.grad_clip
    with torch.device("meta"):  # the real network at its real size, without allocating it
        model = build_model(cfg.model.name, embedding_size=512, input_size=112)
    assert sum(p.numel() for p in model.parameters()) > 19e6  # vit_t is the smallest: 19.1M
