"""arcface_torch's backbones in our registry: iresnet18-200, mbf, mbf_large, vit_t/s/b/l.

The contract with the weight importer (dsoft_dist.models.insightface): at 512-d and 112 px every model's
state_dict lists exactly arcface_torch's entries (tests/data/insightface/params.json, generated from its
code), in its order, with its shapes and last name components, and has its parameter count. Then the
forward at CPU size (32 px), the ViT's training-time token masking and stochastic depth, and bad values.

    python -m pytest tests/test_models_arcface.py
"""
from __future__ import annotations

import json
import os
import sys

import pytest
import torch

from dsoft_dist.models import build_model
from dsoft_dist.models.vit import VisionTransformer, drop_path, random_masking

PARAMS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "insightface", "params.json")
# arcface_torch's name -> ours
NAMES = {"r18": "iresnet18", "r34": "iresnet34", "r50": "iresnet50", "r100": "iresnet100", "r200": "iresnet200",
         "mbf": "mbf", "mbf_large": "mbf_large", "vit_t": "vit_t", "vit_s": "vit_s", "vit_b": "vit_b",
         "vit_l": "vit_l"}


@pytest.fixture(scope="module")
def reference() -> dict:
    with open(PARAMS, encoding="utf-8") as fh:
        return json.load(fh)


def test_the_reference_lists_every_arcface_torch_model(reference):
    assert sorted(reference) == sorted(NAMES)


@pytest.mark.parametrize("theirs", list(NAMES))
def test_state_dict_matches_arcface_torch_entry_by_entry(reference, theirs):
    with torch.device("meta"):  # structure only: no memory, no initialization cost
        model = build_model(NAMES[theirs], embedding_size=512, input_size=112)
    ours = [(name, list(t.shape)) for name, t in model.state_dict().items()]
    expected = reference[theirs]["entries"]
    assert len(ours) == len(expected), (len(ours), len(expected))
    for i, ((name, shape), (their_name, their_shape)) in enumerate(zip(ours, expected)):
        assert shape == their_shape, f"entry {i}: {name} {shape} vs {their_name} {their_shape}"
        assert name.rsplit(".", 1)[-1] == their_name.rsplit(".", 1)[-1], f"entry {i}: {name} vs {their_name}"
    assert sum(p.numel() for p in model.parameters()) == reference[theirs]["parameters"]


def test_vit_names_are_arcface_torchs(reference):
    """The ViT keeps arcface_torch's own names (pos_embed, blocks.N.attn.qkv, feature.0, ...), not only suffixes."""
    with torch.device("meta"):
        model = build_model("vit_b")
    assert list(model.state_dict()) == [name for name, _ in reference["vit_b"]["entries"]]


@pytest.mark.parametrize("name", ["mbf", "vit_t"])
def test_forward_at_cpu_size_and_gradients(name):
    torch.manual_seed(0)
    model = build_model(name, embedding_size=24, input_size=32)
    out = model(torch.rand(2, 3, 32, 32) * 2 - 1)  # training mode: BN batch statistics, masking, drop path
    assert out.shape == (2, 24) and torch.isfinite(out).all()
    out.square().sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing
    with torch.no_grad():
        assert model.eval()(torch.rand(3, 3, 32, 32)).shape == (3, 24)


def test_mbf_large_forward_at_cpu_size():
    """mbf_large is mbf's class with more blocks and width (its structure: the state_dict test above)."""
    torch.manual_seed(0)
    model = build_model("mbf_large", embedding_size=24, input_size=32).eval()
    with torch.no_grad():
        out = model(torch.rand(2, 3, 32, 32) * 2 - 1)
    assert out.shape == (2, 24) and torch.isfinite(out).all()


def test_mbf_global_depthwise_conv_follows_the_input_size():
    for size, side in ((112, 7), (32, 2), (40, 3)):
        with torch.device("meta"):
            model = build_model("mbf", input_size=size)
        assert model.gdconv[0].kernel_size == (side, side), size


def tiny_vit(**kw) -> VisionTransformer:
    """A CPU-sized ViT of the same class: width 32, 2 blocks, 32 px (9 tokens)."""
    args = dict(dim=32, depth=2, drop_path_rate=0.0, mask_ratio=0.0, embedding_size=8, input_size=32)
    return VisionTransformer(**{**args, **kw})


def test_vit_eval_is_deterministic_and_training_masking_changes_outputs():
    torch.manual_seed(0)
    masked = tiny_vit(mask_ratio=0.4)
    plain = tiny_vit(mask_ratio=0.0)
    plain.load_state_dict(masked.state_dict())
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        masked.eval(), plain.eval()
        assert torch.equal(masked(x), masked(x)) and torch.equal(masked(x), plain(x))  # eval: never masked
        masked.train(), plain.train()
        assert torch.equal(plain(x), plain(x))  # no masking, no drop path: training is deterministic too
        torch.manual_seed(1)
        first = masked(x)
        second = masked(x)  # another draw of the mask
        torch.manual_seed(1)
        again = masked(x)  # the same seed, the same mask
    assert torch.equal(first, again)
    assert not torch.allclose(first, second) and not torch.allclose(first, plain(x))


def test_random_masking_keeps_a_random_subset_and_restores_the_order():
    torch.manual_seed(0)
    x = torch.arange(2 * 10 * 3, dtype=torch.float32).reshape(2, 10, 3)  # (B, N, D), every token distinct
    kept, restore = random_masking(x, 0.3)
    assert kept.shape == (2, 7, 3)  # int(10 * 0.7)
    filler = torch.full((2, 3, 3), -1.0)
    back = torch.gather(torch.cat([kept, filler], 1), 1, restore[..., None].expand(-1, -1, 3))
    is_kept = back[..., 0] >= 0  # (B, N)
    assert is_kept.sum(1).tolist() == [7, 7]
    assert torch.equal(back[is_kept], x[is_kept])  # every kept token is back at its own position
    assert random_masking(torch.zeros(1, 1, 3), 0.1)[0].shape == (1, 1, 3)  # one token is always kept


def test_drop_path_drops_whole_samples_and_rescales_the_rest():
    x = torch.rand(2000, 3, 4) + 1.0
    assert drop_path(x, 0.25, training=False) is x and drop_path(x, 0.0, training=True) is x
    torch.manual_seed(0)
    y = drop_path(x, 0.25, training=True)
    dropped = (y == 0).all(dim=(1, 2))
    assert torch.allclose(y[~dropped], x[~dropped] / 0.75)
    assert 0.2 < dropped.float().mean().item() < 0.3


def test_vit_attention_runs_in_float32_under_bf16(monkeypatch):
    """Softmax attention sees float32 under bf16 autocast and with bf16 parameters (DeepSpeed's bf16)."""
    vit_module = sys.modules[VisionTransformer.__module__]
    seen = []
    real = vit_module.F.scaled_dot_product_attention

    def spy(q, k, v):
        seen.append(q.dtype)
        return real(q, k, v)

    monkeypatch.setattr(vit_module.F, "scaled_dot_product_attention", spy)
    torch.manual_seed(0)
    model = tiny_vit().eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(x).shape == (2, 8)
    with torch.no_grad():
        assert model.to(torch.bfloat16)(x.to(torch.bfloat16)).dtype == torch.bfloat16
    assert seen == [torch.float32] * 4  # 2 blocks, 2 runs


def test_vit_needs_one_patch_and_other_bad_values():
    with pytest.raises(ValueError, match=r"input_size=8 is too small for vit_t.*>= 9"):
        build_model("vit_t", input_size=8)
    with torch.device("meta"):
        assert build_model("vit_t", embedding_size=8, input_size=9).num_patches == 1
    with pytest.raises(ValueError, match="mask_ratio=1.0"):
        tiny_vit(mask_ratio=1.0)
    with pytest.raises(ValueError, match="num_heads=8"):
        tiny_vit(dim=36)
    model = build_model("mbf", embedding_size=8, input_size=32)
    with pytest.raises(ValueError, match=r"\(B, 3, 32, 32\).*input_size=48"):
        model(torch.randn(2, 3, 48, 48))


def test_mbf_flops_at_112_px_are_arcface_torchs():
    """FLOPs counted by torch (meta device: no compute); arcface_torch's README gives 0.45G MACs for mbf."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = build_model("mbf").eval()
        x = torch.zeros(1, 3, 112, 112)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x)
    assert 0.43e9 < counter.get_total_flops() / 2 < 0.46e9  # multiply-adds
