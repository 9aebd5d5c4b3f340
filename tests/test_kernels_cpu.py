"""The compiled CPU epilogues (dsoft_dist.kernels.cpu) against float64 torch math, and the head with and
without them. They are built with this machine's C compiler; where none works the build test fails,
because the CPU path would silently lose them.

    python -m pytest tests/test_kernels_cpu.py
"""
from __future__ import annotations

import logging
import math

import pytest
import torch
from dsoft_dist.kernels import cpu as cpu_kernels

from dsoft_dist.config.schema import OptimizerConfig
from dsoft_dist.head import ShardedClassifier, build_head_optimizer

LOG2E = 1.4426950408889634


@pytest.fixture
def epi():
    lib = cpu_kernels.cpu_epilogues()
    assert lib is not None, "the CPU epilogues did not build here (see the log); the head's CPU path needs them"
    return lib


def _slots(targets, chunk):
    """(chunk_id, offset) int32 for targets given as chunk-local rows of chunk ``chunk`` (-1: not in it)."""
    t = torch.as_tensor(targets, dtype=torch.int64)
    chunk_id = torch.where(t >= 0, torch.full_like(t, chunk), torch.full_like(t, -1))
    offset = torch.where(t >= 0, t, torch.zeros_like(t))
    return chunk_id.to(torch.int32), offset.to(torch.int32)


def test_exp2_is_accurate_and_flushes_below_the_normal_range(epi):
    """One row: run_sum_b = 2^x_b for x_b from -150 to 127 (0 at and below -127), run_max = x."""
    x = torch.cat([torch.linspace(-150.0, 127.0, 4001), torch.tensor([-126.0, -126.9, -127.0, 0.0, -0.5, 0.5])])
    n = x.numel()
    logits, inv = x[None, :].contiguous(), torch.ones(1, 1)
    run_max, run_sum = torch.full((n,), float("-inf")), torch.zeros(n)
    epi.forward_fixed(logits, inv, torch.zeros(1, n), _slots([-1] * n, 0), 0, run_max, run_sum)
    want = torch.exp2(x.double())
    normal = x > -126.0
    rel = ((run_sum.double() - want) / want)[normal].abs().max()
    assert rel < 1e-7, f"exp2 relative error {rel:.2e}"  # torch.exp2: 7e-8
    assert torch.all(run_sum[x <= -127.0] == 0)
    assert torch.all(run_sum[~normal] <= 2.0 ** -126)
    torch.testing.assert_close(run_max, x, rtol=0, atol=0)


@pytest.mark.parametrize("k,batch", [(1, 1), (37, 5), (300, 130)])
def test_forward_fixed_matches_float64(epi, k, batch):
    """max and sum over rows of L * inv + neg_shift, targets excluded, added to the running values."""
    gen = torch.Generator().manual_seed(k)
    plain = torch.randn(k, batch, generator=gen) * 25  # |x| < 128 (the fixed shift's guarantee)
    inv = torch.rand(k, 1, generator=gen) + 0.5
    neg_shift = -torch.rand(1, batch, generator=gen) * 60
    targets = torch.randint(-1, k, (batch,), generator=gen)
    owned = targets >= 0
    logits = plain.clone()
    logits[targets[owned], torch.arange(batch)[owned]] = 150.0  # would dominate max and sum if not excluded
    run_max0, run_sum0 = torch.randn(batch, generator=gen), torch.rand(batch, generator=gen)
    run_max, run_sum = run_max0.clone(), run_sum0.clone()
    epi.forward_fixed(logits, inv, neg_shift, _slots(targets, 3), 3, run_max, run_sum)
    x = logits.double() * inv.double() + neg_shift.double()
    mask = torch.zeros_like(x, dtype=torch.bool)
    mask[targets[owned], torch.arange(batch)[owned]] = True
    x = x.masked_fill(mask, float("-inf"))
    torch.testing.assert_close(run_max.double(), torch.maximum(run_max0.double(), x.amax(0)), rtol=1e-6, atol=1e-5)
    # x is rounded to fp32 before the exp, as with torch's ops: 2^x moves by up to ln2 |x| 2^-24 ~ 1e-5 here
    torch.testing.assert_close(run_sum.double(), run_sum0.double() + torch.exp2(x).sum(0), rtol=1e-5, atol=0)
    other = _slots(targets, 4)  # the targets sit in chunk 4: nothing is excluded in chunk 3
    run_max, run_sum = run_max0.clone(), run_sum0.clone()
    epi.forward_fixed(plain, inv, neg_shift, other, 3, run_max, run_sum)
    x = plain.double() * inv.double() + neg_shift.double()
    torch.testing.assert_close(run_sum.double(), run_sum0.double() + torch.exp2(x).sum(0), rtol=1e-5, atol=0)


@pytest.mark.parametrize("k,batch", [(1, 1), (37, 5), (300, 130)])
def test_backward_block_matches_float64(epi, k, batch):
    """In place: block = 2^(L inv + s) (coef at targets) * inv; minus_radial = inv_sq sum_b sl_b L block."""
    gen = torch.Generator().manual_seed(10 + k)
    logits = torch.randn(k, batch, generator=gen) * 20
    inv = torch.rand(k, 1, generator=gen) + 0.5
    inv_sq = inv[:, 0].square()
    neg_shift = -torch.rand(1, batch, generator=gen) * 40 - 20
    neg_shift[0, 0] = float("-inf")  # a row without gradient (g = 0 or no negatives): all zeros
    targets = torch.randint(-1, k, (batch,), generator=gen)
    coef = torch.randn(batch, generator=gen)
    sign_ln2 = torch.where(torch.rand(batch, generator=gen) < 0.3, 1.0, -1.0) * math.log(2)
    block, minus_radial = logits.clone(), torch.empty(k)
    epi.backward_block(block, inv, inv_sq, neg_shift, _slots(targets, 2), 2, coef, sign_ln2, minus_radial)
    want = torch.exp2(logits.double() * inv.double() + neg_shift.double())
    owned = targets >= 0
    want[targets[owned], torch.arange(batch)[owned]] = coef.double()[owned]
    want = want * inv.double()
    torch.testing.assert_close(block.double(), want, rtol=1e-5, atol=1e-30)  # fp32 x: see the forward test
    assert torch.all(block[:, 0][targets[0] != torch.arange(k)] == 0)
    want_radial = inv_sq.double() * (logits.double() * want * sign_ln2.double()).sum(1)
    scale = float(want_radial.abs().max()) + 1e-30
    torch.testing.assert_close(minus_radial.double(), want_radial, rtol=1e-5, atol=1e-6 * scale)


def test_sgd_tail_matches_torch(epi):
    gen = torch.Generator().manual_seed(3)
    w, buf = torch.randn(41, 19, generator=gen), torch.randn(41, 19, generator=gen)
    coef = torch.randn(41, generator=gen)
    w2, buf2 = w.clone(), buf.clone()
    version = w._version
    epi.sgd_tail(w, buf, coef, 0.1)
    buf2.addcmul_(w2, coef[:, None])
    w2.add_(buf2, alpha=-0.1)
    torch.testing.assert_close(buf, buf2)
    torch.testing.assert_close(w, w2)
    assert w._version > version  # autograd sees the in-place change


def test_epilogues_refuse_tensors_they_would_misread(epi):
    logits = torch.randn(8, 6).t()  # (6, 8), not contiguous
    with pytest.raises(ValueError, match="contiguous"):
        epi.forward_fixed(logits, torch.ones(6, 1), torch.zeros(1, 8), _slots([-1] * 8, 0), 0,
                          torch.zeros(8), torch.zeros(8))
    with pytest.raises(ValueError, match="of 6 elements"):  # inv too short: the C code would read past it
        epi.forward_fixed(logits.contiguous(), torch.ones(5, 1), torch.zeros(1, 8), _slots([-1] * 8, 0), 0,
                          torch.zeros(8), torch.zeros(8))
    with pytest.raises(ValueError, match="torch.int32"):  # int64 slots
        epi.forward_fixed(logits.contiguous(), torch.ones(6, 1), torch.zeros(1, 8), (torch.zeros(8, dtype=torch.int64),
                          torch.zeros(8, dtype=torch.int32)), 0, torch.zeros(8), torch.zeros(8))
    with pytest.raises(ValueError, match="of 12 elements"):  # momentum of another shape
        epi.sgd_tail(torch.zeros(3, 4), torch.zeros(4, 4), torch.zeros(3), 0.1)


def _step(monkeypatch, enabled, negatives, in_backward, seed=0):
    """One float32 D-Softmax head step with the epilogues on or off: loss, embedding grad, weight (grad)."""
    head = ShardedClassifier(3000, 24, negatives=negatives, sample_rate=0.4, chunk_size=256, seed=seed, init_std=0.3,
                             backend="cpu-c" if enabled else "torch")
    opt = build_head_optimizer(head, OptimizerConfig(name="sgd", lr=0.5, momentum=0.9, weight_decay=0.01,
                                                     head_step_in_backward=in_backward))
    gen = torch.Generator().manual_seed(seed)
    emb = torch.randn(40, 24, generator=gen).requires_grad_(True)
    labels = torch.randint(0, 3000, (40,), generator=gen)
    labels[3] = -1
    out = []
    for _ in range(2):
        emb.grad = None
        loss = head(emb, labels)
        loss.backward()
        grad_w = head.weight.grad
        out.append((loss.detach(), emb.grad.clone(),
                    None if grad_w is None else (grad_w.to_dense() if grad_w.is_sparse else grad_w).clone()))
        opt.step()
        opt.zero_grad()
    return out, head.weight.detach().clone(), opt.state[head.weight]["momentum_buffer"].clone()


@pytest.mark.parametrize("negatives,in_backward", [("all", True), ("all", False), ("random", True), ("random", False)])
def test_head_steps_agree_with_and_without_the_epilogues(monkeypatch, epi, negatives, in_backward):
    """Two SGD steps: losses, embedding and weight gradients, weights and momentum match the torch ops."""
    with_c, w_c, buf_c = _step(monkeypatch, True, negatives, in_backward)
    without, w_t, buf_t = _step(monkeypatch, False, negatives, in_backward)
    for (loss_c, ge_c, gw_c), (loss_t, ge_t, gw_t) in zip(with_c, without):
        torch.testing.assert_close(loss_c, loss_t, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(ge_c, ge_t, rtol=1e-5, atol=1e-5 * float(ge_t.abs().max()))
        if gw_t is not None:
            torch.testing.assert_close(gw_c, gw_t, rtol=1e-5, atol=1e-5 * float(gw_t.abs().max()))
    torch.testing.assert_close(w_c, w_t, rtol=1e-5, atol=2e-6 * float(w_t.abs().max()))
    torch.testing.assert_close(buf_c, buf_t, rtol=1e-5, atol=2e-6 * float(buf_t.abs().max()))


def test_build_is_cached_and_a_broken_compiler_falls_back(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("DSOFT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(cpu_kernels, "_loaded", {})
    first = cpu_kernels.cpu_epilogues()
    assert first is not None and first.path.parent == tmp_path / "cache"
    built = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert built == [first.path.name]  # the temporary file was renamed, nothing else left
    monkeypatch.setattr(cpu_kernels, "_loaded", {})
    assert cpu_kernels.cpu_epilogues().path == first.path  # same key: no rebuild
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == built

    monkeypatch.setattr(cpu_kernels, "_loaded", {})
    monkeypatch.setenv("DSOFT_CACHE_DIR", str(tmp_path / "other"))
    monkeypatch.setenv("CC", "false")  # a compiler that always fails
    with caplog.at_level(logging.WARNING):
        assert cpu_kernels.cpu_epilogues() is None
    assert "could not build the CPU epilogues" in caplog.text
    head = ShardedClassifier(500, 8, chunk_size=64, backend="cpu-c")  # the torch ops take over
    head(torch.randn(6, 8), torch.randint(0, 500, (6,))).backward()
    assert head.weight.grad is not None


def test_disabled_by_the_environment(monkeypatch):
    monkeypatch.setenv(cpu_kernels.ENV_VAR, "0")
    assert cpu_kernels.cpu_epilogues() is None
