"""The trainer's single-process pieces against plain-torch references: gradient conventions, clipping,
loss scaling, parameter groups, the head-step decision and the up-front label checks."""
import math

import pytest
import torch
from torch import nn

from dsoft_dist.config import config_from_dict
from dsoft_dist.errors import ConfigError
from dsoft_dist.losses.functional import validate_labels
from dsoft_dist.train.build import backbone_param_groups, resolve_head_step
from dsoft_dist.train.grads import LossScaler, all_finite, clip_grads_, embedding_grad_factor


@pytest.mark.parametrize("world,expected", [(1, 1.0), (4, 4.0), (2, 2.0)])
def test_embedding_grad_factor(world, expected):
    assert embedding_grad_factor(world) == expected  # x P for the engine's average; k is in the loss already


def _params(seed, shapes, sparse_last=False):
    gen = torch.Generator().manual_seed(seed)
    ps = [nn.Parameter(torch.randn(*s, generator=gen)) for s in shapes]
    for p in ps:
        p.grad = torch.randn(p.shape, generator=gen)
    if sparse_last:
        g = ps[-1].grad.clone()
        g[1::2] = 0.0  # half the rows untouched, as a sampled step leaves them
        rows = torch.arange(0, g.shape[0], 2)
        ps[-1].grad = torch.sparse_coo_tensor(rows[None], g[rows], g.shape)
    return ps


@pytest.mark.parametrize("scope", ["backbone", "head", "both"])
@pytest.mark.parametrize("max_norm", [0.5, 1e3])
def test_clip_matches_torch_clip_grad_norm(scope, max_norm):
    backbone, head = _params(0, [(5, 3), (3,)]), _params(1, [(8, 3)], sparse_last=True)
    ref_b = [p.grad.clone() for p in backbone]
    ref_h = head[0].grad.to_dense().clone()
    # the reference: torch's clip over exactly the parameters in scope, head densified
    dense = [nn.Parameter(p.detach().clone()) for p in backbone + head]
    for d, g in zip(dense, ref_b + [ref_h]):
        d.grad = g.clone()
    chosen = {"backbone": dense[:2], "head": dense[2:], "both": dense}[scope]
    norm = torch.nn.utils.clip_grad_norm_(chosen, max_norm)
    norms = clip_grads_(backbone, head, max_norm, scope)
    got = norms["grad_norm_backbone"] if scope == "backbone" else norms["grad_norm_head"] if scope == "head" else \
        math.hypot(norms["grad_norm_backbone"], norms["grad_norm_head"])
    assert got == pytest.approx(float(norm), rel=1e-5)
    for p, d in zip(backbone + head, dense):
        torch.testing.assert_close(p.grad.to_dense(), d.grad, rtol=1e-5, atol=1e-6)
    assert head[0].grad.is_sparse  # sparse gradients stay sparse


def test_all_finite_sees_dense_and_sparse():
    ps = _params(2, [(4, 2), (6, 2)], sparse_last=True)
    assert all_finite(ps)
    ps[1].grad = torch.sparse_coo_tensor(torch.tensor([[0]]), torch.tensor([[float("inf"), 0.0]]), (6, 2))
    assert not all_finite(ps)
    ps = _params(3, [(4, 2)])
    ps[0].grad[2, 1] = float("nan")
    assert not all_finite(ps)


def test_loss_scaler_backs_off_grows_and_round_trips():
    s = LossScaler(init_scale=1024.0, growth_interval=2)
    p = nn.Parameter(torch.zeros(3))
    p.grad = torch.full((3,), 2048.0)
    s.unscale_([p])
    assert torch.equal(p.grad, torch.full((3,), 2.0))
    s.update(False)
    assert (s.scale, s.skipped) == (512.0, 1)
    s.update(True)
    s.update(True)
    assert s.scale == 1024.0
    t = LossScaler()
    t.load_state_dict(s.state_dict())
    assert t.state_dict() == s.state_dict()
    off = LossScaler(enabled=False)
    assert off.scale == 1.0
    off.update(False)
    assert (off.scale, off.skipped) == (1.0, 1)


def test_param_groups_exempt_norms_and_biases_unless_asked():
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.PReLU(8), nn.Linear(8, 2, bias=False))
    decay, plain = backbone_param_groups(model, 5e-4)
    assert decay["weight_decay"] == 5e-4 and plain["weight_decay"] == 0.0
    assert {id(p) for p in decay["params"]} == {id(model[0].weight), id(model[3].weight)}
    assert len(plain["params"]) == 4  # linear bias, BN weight and bias, PReLU slopes
    (everything,) = backbone_param_groups(model, 5e-4, decay_norm_and_bias=True)
    assert len(everything["params"]) == len(list(model.parameters()))


def _cfg(**sections):
    return config_from_dict(sections)


def test_head_step_in_backward_is_on_where_legal_and_off_with_the_reason():
    assert resolve_head_step(_cfg()).head_step_in_backward is True
    for sections in ({"optimizer": {"grad_accum_steps": 2}}, {"optimizer": {"head_mode": "dense"}},
                     {"optimizer": {"grad_clip": 5.0, "clip_scope": "both"}}, {"parallel": {"precision": "fp16"}}):
        assert resolve_head_step(_cfg(**sections)).head_step_in_backward is False
    assert resolve_head_step(_cfg(optimizer={"grad_clip": 5.0})).head_step_in_backward is True  # backbone only
    assert resolve_head_step(_cfg(optimizer={"head_step_in_backward": False})).head_step_in_backward is False


@pytest.mark.parametrize("sections,match", [
    ({"optimizer": {"head_step_in_backward": True, "grad_accum_steps": 4}}, "grad_accum_steps=4"),
    ({"optimizer": {"head_step_in_backward": True, "grad_clip": 1.0, "clip_scope": "head"}}, "clip_scope=head"),
    ({"optimizer": {"head_step_in_backward": True}, "parallel": {"precision": "fp16"}}, "fp16"),
])
def test_head_step_in_backward_true_where_illegal_is_a_clear_error(sections, match):
    with pytest.raises(ConfigError, match=f"optimizer.head_step_in_backward=True is invalid.*{match}"):
        _cfg(**sections)


def test_label_checks_name_the_value_and_the_fix():
    """The trainer's check of its first batch: the loss modules' validate_labels with the trainer's advice."""
    fix = "set data.num_classes to the data's class count (the manifest's num_classes), or fix the labels"
    validate_labels(torch.tensor([0, 9, -1]), 10, fix=fix)
    with pytest.raises(ValueError, match=r"int64 class ids, got torch.int32; use labels.long\(\)"):
        validate_labels(torch.tensor([0, 1], dtype=torch.int32), 10, fix=fix)
    with pytest.raises(ValueError, match=r"labels contain 10, outside \[0, 10\).*data.num_classes.*manifest"):
        validate_labels(torch.tensor([3, 10]), 10, fix=fix)
    with pytest.raises(ValueError, match="labels contain -5, "):
        validate_labels(torch.tensor([-5, 1]), 10, fix=fix)


def test_synthetic_verification_needs_synthetic_data():
    with pytest.raises(ConfigError, match="eval.synthetic_identities=100 is invalid.*eval.bins"):
        _cfg(data={"source": "webdataset", "shards": "/x/{0..1}.tar"}, eval={"synthetic_identities": 100})
