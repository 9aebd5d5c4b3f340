"""Backbones: output shapes for every registered model, parameter counts, input checks, checkpoints."""
import os
import pickle

import pytest
import torch

from dsoft_dist.config.schema import ModelConfig
from dsoft_dist.models import build_model, load_backbone, save_backbone
from dsoft_dist.registry import MODELS


def n_params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name,expected_m,tol_m", [
    ("iresnet18", 24.03, 0.1), ("iresnet34", 34.14, 0.1), ("iresnet50", 43.59, 0.1), ("iresnet100", 65.16, 0.2),
])
def test_iresnet_shape_and_param_count(name, expected_m, tol_m):
    torch.manual_seed(0)
    model = build_model(name, embedding_size=512, input_size=112).eval()
    assert abs(n_params(model) / 1e6 - expected_m) < tol_m  # InsightFace sizes: r50 ~43.6M, r100 ~65.2M
    with torch.no_grad():
        out = model(torch.rand(1, 3, 112, 112) * 2 - 1)
    assert out.shape == (1, 512) and torch.isfinite(out).all()


def test_mobilefacenet_matches_paper_size():
    model = build_model("mobilefacenet", embedding_size=128).eval()
    assert 0.95e6 < n_params(model) < 1.05e6  # the paper reports 0.99M parameters at 128-d
    with torch.no_grad():
        assert model(torch.randn(2, 3, 112, 112)).shape == (2, 128)


@pytest.mark.parametrize("name", ["iresnet_tiny", "mobilefacenet_tiny"])
@pytest.mark.parametrize("size", [32, 112, 40])
def test_tiny_models_any_size(name, size):
    model = build_model(name, embedding_size=24, input_size=size)
    out = model(torch.randn(3, 3, size, size))  # train mode: BN uses batch statistics
    assert out.shape == (3, 24)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert n_params(model) < 2e6


def test_every_registered_name_builds():
    for name in MODELS.names():
        if name in ("iresnet200", "vit_s", "vit_b", "vit_l"):
            continue  # built on the meta device, entry by entry: tests/test_models_arcface.py
        kwargs = {"in_features": 10} if name == "mlp" else {}
        size = 112 if name.startswith(("iresnet1", "iresnet3", "iresnet5", "mobilefacenet")) else 32
        model = build_model(name, embedding_size=8, input_size=size, **kwargs).eval()
        x = torch.randn(1, 10) if name == "mlp" else torch.randn(1, 3, size, size)
        with torch.no_grad():
            assert model(x).shape == (1, 8), name


def test_mlp_vectors_and_dropout():
    model = build_model("mlp", embedding_size=16, in_features=12, dropout=0.5)
    assert model(torch.randn(5, 12)).shape == (5, 16)
    with pytest.raises(ValueError, match="in_features=7"):
        model(torch.randn(5, 7))
    with pytest.raises(ValueError, match="in_features"):
        build_model("mlp", embedding_size=16)


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="resnet9000"):
        build_model("resnet9000")
    with pytest.raises(ValueError, match="embedding_size=0"):
        build_model("iresnet_tiny", embedding_size=0)
    with pytest.raises(ValueError, match="input_size=4"):
        build_model("iresnet_tiny", input_size=4)
    model = build_model("iresnet_tiny", embedding_size=8, input_size=32)
    with pytest.raises(ValueError, match=r"\(B, 3, 32, 32\).*input_size=48"):
        model(torch.randn(2, 3, 48, 48))


@pytest.mark.parametrize("name", ["iresnet_tiny", "mobilefacenet_tiny", "mlp"])
def test_checkpoint_round_trip(tmp_path, name):
    torch.manual_seed(1)
    cfg = {"name": name, "embedding_size": 16, "input_size": 32, "in_features": 20 if name == "mlp" else 0}
    model = build_model(**cfg)
    model(torch.randn(4, 20) if name == "mlp" else torch.randn(4, 3, 32, 32))  # move BN running stats off init
    model.eval()
    path = str(tmp_path / "sub" / "backbone.pt")
    save_backbone(path, model, cfg, extra={"step": 7})
    assert sorted(os.listdir(tmp_path / "sub")) == ["backbone.pt"]  # the temp file was renamed away
    loaded, loaded_cfg = load_backbone(path)
    assert loaded_cfg == {**cfg, "dropout": 0.0, "activation_checkpointing": False}
    assert not loaded.training
    x = torch.randn(3, 20) if name == "mlp" else torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    assert torch.load(path, weights_only=True)["extra"] == {"step": 7}


def test_checkpoint_accepts_dataclass_and_ddp_prefix(tmp_path):
    cfg = ModelConfig(name="iresnet_tiny", embedding_size=8, input_size=32)
    model = build_model("iresnet_tiny", embedding_size=8, input_size=32).eval()
    wrapper = torch.nn.Module()
    wrapper.module = model  # what DistributedDataParallel looks like: state_dict keys get "module."
    save_backbone(str(tmp_path / "b.pt"), wrapper, cfg)
    loaded, _ = load_backbone(str(tmp_path / "b.pt"))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_checkpoint_is_rejected_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"format": "dsoft_backbone", "version": 1, "model": {"name": "iresnet_tiny"},
                "state_dict": {}, "extra": _Payload(marker)}, str(path))
    with pytest.raises(ValueError, match="could not be loaded safely"):
        load_backbone(str(path))
    assert not marker.exists()
    with open(path.with_suffix(".pkl"), "wb") as f:  # a plain pickle, not a torch zip file
        pickle.dump(_Payload(marker), f)
    with pytest.raises(ValueError):
        load_backbone(str(path.with_suffix(".pkl")))
    assert not marker.exists()


def test_checkpoint_mismatch_and_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_backbone(str(tmp_path / "nope.pt"))
    model = build_model("iresnet_tiny", embedding_size=8, input_size=32)
    sd = model.state_dict()
    torch.save({"format": "dsoft_backbone", "version": 1,
                "model": {"name": "iresnet_tiny", "embedding_size": 16, "input_size": 32}, "state_dict": sd,
                "extra": {}}, str(tmp_path / "bad.pt"))
    with pytest.raises(ValueError, match="do not match"):
        load_backbone(str(tmp_path / "bad.pt"))
    torch.save({"weights": sd}, str(tmp_path / "other.pt"))
    with pytest.raises(ValueError, match="not a dsoft backbone"):
        load_backbone(str(tmp_path / "other.pt"))
