"""DSoftmaxLoss / MarginSoftmaxLoss modules: gradients w.r.t. embeddings AND weights vs transcriptions."""
import pytest
import torch
import torch.nn.functional as F

import dsoft_dist
from dsoft_dist.losses import class_mask, select_classes
from dsoft_dist.registry import LOSSES
from tests.test_losses_reference import ref_d_softmax, ref_margin_softmax


def _inputs(b, c, d, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(b, d, generator=g, dtype=torch.float64).to(dtype)
    y = torch.randint(0, c, (b,), generator=g)
    y[0], y[-1] = 0, c - 1
    return emb, y


def _ref_grads(module, emb, y, ref_fn):
    e = emb.detach().double().clone().requires_grad_()
    w = module.weight.detach().double().clone().requires_grad_()
    cos = F.normalize(e, dim=1) @ F.normalize(w, dim=1).t()
    loss = ref_fn(cos)
    ge, gw = torch.autograd.grad(loss, (e, w))
    return loss, ge, gw


@pytest.mark.parametrize("negatives", ["all", "batch", "random", "partial"])
@pytest.mark.parametrize("correction", [False, True])
def test_dsoftmax_module_grads_match_transcription(negatives, correction):
    c = 23
    mod = dsoft_dist.DSoftmaxLoss(c, 8, scale=32.0, end_point=0.8, inter_weight=0.5, negatives=negatives,
                                  sample_rate=0.3, inter_correction=correction, seed=4).double()
    emb, y = _inputs(7, c, 8, seed=1)
    idx = select_classes(negatives, y, c, 0.3, seed=4, draw=0)
    k = c if idx is None else idx.numel()
    mask = class_mask(idx, 7, c)
    corr = c / k if correction else 1.0
    e = emb.clone().requires_grad_()
    loss = mod(e, y)
    loss.backward()
    ref, ge, gw = _ref_grads(mod, emb, y, lambda cos: ref_d_softmax(cos, y, 32.0, 0.8, 0.5, mask, corr))
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(e.grad, ge)
    torch.testing.assert_close(mod.weight.grad, gw)
    if idx is not None:  # untouched rows get no gradient
        touched = torch.zeros(c, dtype=torch.bool)
        touched[idx] = True
        touched[y] = True
        assert torch.all(mod.weight.grad[~touched] == 0)


@pytest.mark.parametrize("preset", ["normface", "arcface", "cosface", "sphereface"])
@pytest.mark.parametrize("negatives", ["all", "partial"])
def test_margin_module_grads_match_transcription(preset, negatives):
    c = 19
    mod = dsoft_dist.MarginSoftmaxLoss.preset(preset, c, 6, scale=16.0, negatives=negatives, sample_rate=0.4).double()
    emb, y = _inputs(6, c, 6, seed=2)
    m = LOSSES.get(preset).margins
    mask = class_mask(select_classes(negatives, y, c, 0.4, seed=0, draw=0), 6, c)
    e = emb.clone().requires_grad_()
    loss = mod(e, y)
    loss.backward()
    ref, ge, gw = _ref_grads(mod, emb, y, lambda cos: ref_margin_softmax(cos, y, 16.0, m["m1"], m["m2"], m["m3"], mask))
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(e.grad, ge)
    torch.testing.assert_close(mod.weight.grad, gw)


def test_softmax_preset_is_linear_cross_entropy():
    mod = dsoft_dist.MarginSoftmaxLoss.preset("softmax", 10, 4).double()
    emb, y = _inputs(5, 10, 4, seed=3)
    torch.testing.assert_close(mod(emb, y), F.cross_entropy(emb @ mod.weight.t(), y))


def test_module_diagnostics_and_step_counter():
    mod = dsoft_dist.DSoftmaxLoss(50, 8, negatives="random", sample_rate=0.2)
    emb, y = _inputs(9, 50, 8, seed=5, dtype=torch.float32)
    mod(emb, y)
    stats = mod.diagnostics()
    assert set(stats) == {"intra", "inter", "target_cos", "hardest_neg_cos"}
    cos = F.normalize(emb) @ F.normalize(mod.weight.detach()).t()
    assert stats["target_cos"] == pytest.approx(float(cos[torch.arange(9), y].mean()), abs=1e-5)
    assert stats["hardest_neg_cos"] > stats["target_cos"] - 1.0
    assert int(mod.step) == 1


def test_module_resumes_the_same_negative_sequence_from_its_state():
    emb, y = _inputs(9, 50, 8, seed=5, dtype=torch.float32)
    a = dsoft_dist.DSoftmaxLoss(50, 8, negatives="random", sample_rate=0.2, seed=3)
    a(emb, y)  # step 0
    b = dsoft_dist.DSoftmaxLoss(50, 8, negatives="random", sample_rate=0.2, seed=3)
    b.load_state_dict(a.state_dict())  # carries the weight and step=1
    assert torch.equal(a(emb, y), b(emb, y))  # both draw step 1's negatives
    c = dsoft_dist.DSoftmaxLoss(50, 8, negatives="random", sample_rate=0.2, seed=3)
    c.weight.data.copy_(a.weight.data)  # step 0 again: a different negative set
    assert not torch.equal(a(emb, y), c(emb, y))


def test_module_bf16_embeddings():
    mod = dsoft_dist.DSoftmaxLoss(30, 8)
    emb, y = _inputs(4, 30, 8, seed=6, dtype=torch.bfloat16)
    e = emb.clone().requires_grad_()
    loss = mod(e, y)
    loss.backward()
    assert loss.dtype == torch.float32 and e.grad.dtype == torch.bfloat16
    want = mod(emb.float(), y)
    torch.testing.assert_close(loss, want)


def test_module_rejects_bad_labels_and_shapes():
    mod = dsoft_dist.DSoftmaxLoss(10, 4)
    with pytest.raises(ValueError, match="labels contain 10, outside \\[0, 10\\)"):
        mod(torch.randn(2, 4), torch.tensor([1, 10]))
    with pytest.raises(ValueError, match="int64"):
        mod(torch.randn(2, 4), torch.tensor([1, 2], dtype=torch.int32))
    with pytest.raises(ValueError, match="embeddings must be \\(B, 4\\)"):
        mod(torch.randn(2, 5), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="negatives='some'"):
        dsoft_dist.DSoftmaxLoss(10, 4, negatives="some")
    with pytest.raises(ValueError, match="unknown"):
        dsoft_dist.MarginSoftmaxLoss.preset("magface", 10, 4)
