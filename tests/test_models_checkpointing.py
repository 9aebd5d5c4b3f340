"""Activation checkpointing (model.activation_checkpointing): the same numbers, less stored.

With it on, IResNet recomputes each residual block and the ViT each transformer block in backward. Loss,
every gradient, BatchNorm's running statistics and the RNG stream after the step must be bit-identical to
a step without it (the recomputation replays dropout, drop path and the token mask). The recomputation is
observed (a block's forward runs twice per step), so a flag that did nothing would fail here. Then the
boundaries (models without blocks refuse it; backbone files keep it; old files load it as false) and,
in the slow tier, real 2-rank `dsoft train` runs under DDP and DeepSpeed.

    python -m pytest tests/test_models_checkpointing.py            # the fast ones
    python -m pytest -m slow tests/test_models_checkpointing.py    # the spawned trainer runs
"""
from __future__ import annotations

import pytest
import torch
import yaml

from dsoft_dist.cli import main
from dsoft_dist.config.schema import ModelConfig
from dsoft_dist.errors import ConfigError
from dsoft_dist.models import build_model, checkpointing_models, load_backbone, save_backbone
from dsoft_dist.models.vit import VisionTransformer


def _twins(make) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(plain, checkpointed): the same weights, checkpointing off and on."""
    torch.manual_seed(0)
    plain, ckpt = make(False), make(True)
    ckpt.load_state_dict(plain.state_dict())
    return plain, ckpt


def _step(model: torch.nn.Module, x: torch.Tensor, block: torch.nn.Module) -> dict:
    """One training-mode forward + backward from seed 5: loss, gradients, buffers, RNG after, block calls."""
    calls = []
    hook = block.register_forward_pre_hook(lambda *_: calls.append(1))  # a recomputation may stop before the end
    model.train()
    torch.manual_seed(5)
    loss = model(x).square().mean()
    loss.backward()
    hook.remove()
    return {"loss": loss.detach(), "grads": {n: p.grad for n, p in model.named_parameters()},
            "buffers": {n: b.clone() for n, b in model.named_buffers()}, "rng": torch.get_rng_state(),
            "calls": len(calls)}


def _assert_identical(plain: dict, ckpt: dict) -> None:
    assert torch.equal(plain["loss"], ckpt["loss"])
    for name, grad in plain["grads"].items():
        assert grad is not None and torch.equal(grad, ckpt["grads"][name]), name
    for name, buf in plain["buffers"].items():
        assert torch.equal(buf, ckpt["buffers"][name]), name  # running statistics updated once, not twice
    assert torch.equal(plain["rng"], ckpt["rng"])  # the RNG stream goes on as without checkpointing


def test_iresnet_checkpointing_gives_the_same_loss_gradients_and_statistics():
    plain, ckpt = _twins(lambda on: build_model("iresnet_tiny", embedding_size=16, input_size=32, dropout=0.3,
                                                activation_checkpointing=on))
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    a = _step(plain, x, plain.stages[1][0])
    b = _step(ckpt, x, ckpt.stages[1][0])
    assert (a["calls"], b["calls"]) == (1, 2)  # recomputed in backward
    _assert_identical(a, b)
    assert b["buffers"]["stages.1.0.bn1.num_batches_tracked"].item() == 1


def _vit(on: bool) -> VisionTransformer:
    """A CPU-sized ViT with every source of randomness on: drop path, token masking, dropout."""
    return VisionTransformer(dim=32, depth=3, drop_path_rate=0.5, mask_ratio=0.3, embedding_size=8, input_size=32,
                             dropout=0.1, activation_checkpointing=on)


def test_vit_checkpointing_gives_the_same_loss_and_gradients_with_masks_and_drop_path():
    plain, ckpt = _twins(_vit)
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    a = _step(plain, x, plain.blocks[2])
    b = _step(ckpt, x, ckpt.blocks[2])
    assert (a["calls"], b["calls"]) == (1, 2)
    _assert_identical(a, b)
    torch.manual_seed(6)  # the comparison can fail: another draw of masks and drop path gives another loss
    assert not torch.equal(plain.train()(x).square().mean(), a["loss"])


def test_checkpointing_is_off_in_eval_mode_and_without_autograd():
    plain, ckpt = _twins(_vit)
    x = torch.rand(2, 3, 32, 32)
    calls = []
    ckpt.blocks[0].register_forward_pre_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        assert torch.equal(ckpt.eval()(x), plain.eval()(x))
        torch.manual_seed(1)
        first = ckpt.train()(x)
        torch.manual_seed(1)
        assert torch.equal(first, plain.train()(x))
    assert len(calls) == 2  # once per forward: nothing to recompute


def test_build_model_passes_the_flag_to_every_model_that_has_it():
    assert set(checkpointing_models()) == {"iresnet18", "iresnet34", "iresnet50", "iresnet100", "iresnet200",
                                           "iresnet_tiny", "vit_t", "vit_s", "vit_b", "vit_l", "vit_tiny"}
    for name in checkpointing_models():
        with torch.device("meta"):
            assert build_model(name, activation_checkpointing=True).activation_checkpointing, name
            assert not build_model(name).activation_checkpointing, name


@pytest.mark.parametrize("name", ["mlp", "mobilefacenet", "mobilefacenet_tiny", "mbf", "mbf_large"])
def test_models_without_blocks_refuse_it(name):
    with pytest.raises(ValueError, match=rf"activation_checkpointing=True is not supported by model '{name}'.*"
                                         r"iresnet18.*vit_l.*model.activation_checkpointing=false"):
        build_model(name, in_features=8, activation_checkpointing=True)
    with pytest.raises(ConfigError, match=rf"model.activation_checkpointing=True is invalid: model '{name}'.*vit_t"):
        ModelConfig(name=name, in_features=8, activation_checkpointing=True)


def test_the_trainer_builds_the_backbone_with_the_configs_value():
    from dsoft_dist.config import config_from_dict
    from dsoft_dist.train.build import build_backbone

    for on in (False, True):
        cfg = config_from_dict({"model": {"name": "vit_tiny", "embedding_size": 8, "input_size": 18,
                                          "activation_checkpointing": on}})
        assert build_backbone(cfg).activation_checkpointing is on


def test_dsoft_train_refuses_it_in_one_line(tmp_path, capfd):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"model": {"name": "mobilefacenet_tiny", "activation_checkpointing": True},
                                   "logging": {"output_dir": str(tmp_path / "run")}}))
    assert main(["train", "--config", str(cfg)]) == 2
    err = capfd.readouterr().err
    assert "dsoft train: error: model.activation_checkpointing=True is invalid" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_backbone_files_keep_the_flag_and_old_files_load_it_as_false(tmp_path):
    cfg = {"name": "iresnet_tiny", "embedding_size": 8, "input_size": 16, "activation_checkpointing": True}
    model = build_model(**cfg)
    save_backbone(str(tmp_path / "new.pt"), model, cfg)
    loaded, loaded_cfg = load_backbone(str(tmp_path / "new.pt"))
    assert loaded_cfg["activation_checkpointing"] is True and loaded.activation_checkpointing
    old = torch.load(tmp_path / "new.pt", weights_only=True)
    del old["model"]["activation_checkpointing"]  # what a file written before the key existed holds
    torch.save(old, tmp_path / "old.pt")
    loaded, loaded_cfg = load_backbone(str(tmp_path / "old.pt"))
    assert loaded_cfg["activation_checkpointing"] is False and not loaded.activation_checkpointing
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))


# ----------------------------------------------------------------------------- under the trainer

SPAWNED = pytest.mark.slow(reason="spawns 2 gloo ranks for two runs each (DeepSpeed: its start-up and C++ op)")


def _image_run(out, model: str, size: int, **sections) -> dict:
    from tests.test_train_dist import tiny

    return tiny(out, model__name=model, model__embedding_size=16, model__input_size=size, model__in_features=0,
                model__dropout=0.2, data__synthetic_mode="images", data__image_size=size, **sections)


def _assert_same_runs(plain: dict, ckpt: dict) -> None:
    from tests.test_train_dist import assert_same_params

    assert len(plain["loss"]) == 3 and plain["loss"] == ckpt["loss"]  # bit-identical per step
    assert_same_params(plain, ckpt, atol=0.0, rtol=0.0)


@pytest.mark.dist
@SPAWNED
def test_ddp_runs_with_and_without_checkpointing_are_identical(tmp_path):
    from tests.test_train_dist import run_each

    on = {"model__activation_checkpointing": True}
    runs = run_each(_image_run(tmp_path / "r", "iresnet_tiny", 16),
                    _image_run(tmp_path / "rc", "iresnet_tiny", 16, **on),
                    _image_run(tmp_path / "v", "vit_tiny", 27), _image_run(tmp_path / "vc", "vit_tiny", 27, **on))
    _assert_same_runs(runs[0], runs[1])
    _assert_same_runs(runs[2], runs[3])
    assert runs[0]["loss"] != runs[2]["loss"]


@pytest.mark.dist
@SPAWNED
def test_deepspeed_runs_with_and_without_checkpointing_are_identical(tmp_path):
    pytest.importorskip("deepspeed")
    from tests.test_train_dist import run_each

    ds = {"parallel__engine": "deepspeed", "parallel__zero_stage": 2}
    plain, ckpt = run_each(_image_run(tmp_path / "p", "iresnet_tiny", 16, **ds),
                           _image_run(tmp_path / "c", "iresnet_tiny", 16, model__activation_checkpointing=True, **ds))
    assert plain["report"]["engine"] == "deepspeed ZeRO-2"
    _assert_same_runs(plain, ckpt)
