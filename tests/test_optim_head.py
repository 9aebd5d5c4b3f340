"""Row-sparse SGD / AdamW: untouched rows stay bit-identical, touched rows follow torch.optim row by row,
dense mode equals torch.optim on the whole shard.

    python -m pytest tests/test_optim_head.py
"""
from __future__ import annotations

import pytest
import torch

from dsoft_dist.config.schema import OptimizerConfig
from dsoft_dist.head import RowSparseAdamW, RowSparseSGD, ShardedClassifier, build_head_optimizer

ROWS, D, STEPS = 12, 5, 5
SGD_CONFIGS = [dict(lr=0.1, momentum=0.9, weight_decay=0.01), dict(lr=0.1, momentum=0.9, weight_decay=0.01, nesterov=True),
               dict(lr=0.2, momentum=0.0, weight_decay=0.05)]
ADAMW_CONFIGS = [dict(lr=0.01, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1), dict(lr=0.03, betas=(0.8, 0.9), eps=1e-6,
                                                                                   weight_decay=0.0)]


def _schedule(seed=0):
    """STEPS sparse gradients over varying row sets; rows 10 and 11 are never touched."""
    gen = torch.Generator().manual_seed(seed)
    steps = []
    for _ in range(STEPS):
        rows = torch.randperm(10, generator=gen)[:4].sort().values
        steps.append((rows, torch.randn(rows.numel(), D, generator=gen)))
    return steps


def _sparse(rows, values):
    return torch.sparse_coo_tensor(rows[None], values, (ROWS, D), check_invariants=True)


def _state_names(opt):
    return [name for name in ("momentum_buffer", "exp_avg", "exp_avg_sq", "step") if name in opt.state[opt.param_groups[0]["params"][0]]]


def _run_sparse_and_check_untouched(make_opt):
    weight = torch.nn.Parameter(torch.randn(ROWS, D, generator=torch.Generator().manual_seed(1)))
    initial = weight.detach().clone()
    opt = make_opt([weight])
    for rows, values in _schedule():
        before = {"weight": weight.detach().clone(), **{n: opt.state[weight][n].clone() for n in _state_names(opt)}}
        weight.grad = _sparse(rows, values)
        opt.step()
        opt.zero_grad()
        untouched = torch.ones(ROWS, dtype=torch.bool)
        untouched[rows] = False
        after = {"weight": weight.detach(), **{n: opt.state[weight][n] for n in _state_names(opt)}}
        for name, tensor in after.items():
            assert torch.equal(tensor[untouched], before[name][untouched]), f"untouched rows of {name} changed"
            assert not torch.equal(tensor[rows], before[name][rows]), f"touched rows of {name} did not change"
    return initial, weight.detach(), opt


def _torch_per_row(initial, torch_cls, kwargs):
    """Each row trained by its own torch optimizer, stepped only in the steps that touched the row."""
    params = [torch.nn.Parameter(initial[r:r + 1].clone()) for r in range(ROWS)]
    opts = [torch_cls([p], **kwargs) for p in params]
    for rows, values in _schedule():
        for i, r in enumerate(rows.tolist()):
            params[r].grad = values[i:i + 1].clone()
            opts[r].step()
    return torch.cat([p.detach() for p in params]), opts, params


@pytest.mark.parametrize("kwargs", SGD_CONFIGS)
def test_sparse_sgd_matches_torch_row_by_row(kwargs):
    initial, got, opt = _run_sparse_and_check_untouched(lambda p: RowSparseSGD(p, **kwargs))
    want, torch_opts, params = _torch_per_row(initial, torch.optim.SGD, kwargs)
    # fp32: the in-place update rounds in a different order than torch (a few ulp)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    if kwargs["momentum"]:
        buf = torch.cat([o.state[p].get("momentum_buffer", torch.zeros(1, D)) for o, p in zip(torch_opts, params)])
        torch.testing.assert_close(opt.state[opt.param_groups[0]["params"][0]]["momentum_buffer"], buf, rtol=1e-5, atol=1e-6)
    assert torch.equal(got[10:], initial[10:])


@pytest.mark.parametrize("kwargs", ADAMW_CONFIGS)
def test_sparse_adamw_matches_torch_row_by_row(kwargs):
    initial, got, opt = _run_sparse_and_check_untouched(lambda p: RowSparseAdamW(p, **kwargs))
    want, _, _ = _torch_per_row(initial, torch.optim.AdamW, kwargs)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    touched = torch.zeros(ROWS, dtype=torch.int64)
    for rows, _ in _schedule():
        touched[rows] += 1
    assert torch.equal(opt.state[opt.param_groups[0]["params"][0]]["step"], touched)


@pytest.mark.parametrize("cls, torch_cls, kwargs", [(RowSparseSGD, torch.optim.SGD, k) for k in SGD_CONFIGS]
                         + [(RowSparseAdamW, torch.optim.AdamW, k) for k in ADAMW_CONFIGS])
@pytest.mark.parametrize("sparse_grads", [True, False])
def test_dense_mode_matches_torch_on_the_whole_shard(cls, torch_cls, kwargs, sparse_grads):
    initial = torch.randn(ROWS, D, generator=torch.Generator().manual_seed(2))
    ours, ref = torch.nn.Parameter(initial.clone()), torch.nn.Parameter(initial.clone())
    opt, ref_opt = cls([ours], mode="dense", **kwargs), torch_cls([ref], **kwargs)
    for rows, values in _schedule(3):
        grad = _sparse(rows, values)
        ours.grad = grad if sparse_grads else grad.to_dense()
        ref.grad = grad.to_dense()
        opt.step()
        ref_opt.step()
    torch.testing.assert_close(ours.detach(), ref.detach(), rtol=1e-5, atol=1e-6)
    if kwargs["weight_decay"]:
        assert not torch.equal(ours.detach()[10:], initial[10:]), "dense mode must decay untouched rows"


def test_sparse_mode_with_a_dense_gradient_updates_every_row_like_torch():
    initial = torch.randn(ROWS, D)
    ours, ref = torch.nn.Parameter(initial.clone()), torch.nn.Parameter(initial.clone())
    opt, ref_opt = RowSparseSGD([ours], **SGD_CONFIGS[0]), torch.optim.SGD([ref], **SGD_CONFIGS[0])
    for _ in range(3):
        grad = torch.randn(ROWS, D)
        ours.grad, ref.grad = grad.clone(), grad.clone()
        opt.step()
        ref_opt.step()
    torch.testing.assert_close(ours.detach(), ref.detach(), rtol=1e-6, atol=1e-7)


def test_head_step_with_sampled_negatives_changes_only_touched_rows():
    head = ShardedClassifier(500, 8, negatives="random", sample_rate=0.02, seed=4)
    opt = build_head_optimizer(head, OptimizerConfig(name="adamw", lr=0.01, weight_decay=0.1))
    before = head.weight.detach().clone()
    labels = torch.randint(0, 500, (6,))
    touched = torch.unique(torch.cat([head.select_rows(labels), labels]))
    head(torch.randn(6, 8), labels).backward()
    opt.step()
    changed = (head.weight.detach() != before).any(dim=1).nonzero().squeeze(1)
    assert torch.equal(changed, touched)


def test_build_head_optimizer_from_config():
    head = ShardedClassifier(20, 4)
    sgd = build_head_optimizer(head, OptimizerConfig(name="sgd", lr=0.3, momentum=0.5, head_mode="dense"))
    assert isinstance(sgd, RowSparseSGD) and sgd.mode == "dense" and sgd.param_groups[0]["lr"] == 0.3
    adamw = build_head_optimizer(head, OptimizerConfig(name="adamw", lr=1e-3, betas=[0.8, 0.99]))
    assert isinstance(adamw, RowSparseAdamW) and adamw.param_groups[0]["betas"] == (0.8, 0.99)
    assert adamw.num_classes == 20 and adamw.class_start == 0


@pytest.mark.parametrize("make, match", [
    (lambda p: RowSparseSGD(p, lr=0.1, mode="lazy"), "mode='lazy' is invalid"),
    (lambda p: RowSparseSGD(p, lr=0.1, nesterov=True), "nesterov=True needs momentum > 0"),
    (lambda p: RowSparseSGD(p, lr=-1.0), "lr=-1.0 is invalid"),
    (lambda p: RowSparseAdamW(p, betas=(0.9, 1.5)), "betas=.* is invalid"),
    (lambda p: RowSparseAdamW([torch.nn.Parameter(torch.zeros(3))]), "2-D"),
])
def test_bad_hyperparameters_raise_clear_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make([torch.nn.Parameter(torch.zeros(3, 2))])


@pytest.mark.parametrize("cls, kwargs", [(RowSparseSGD, SGD_CONFIGS[1]), (RowSparseAdamW, ADAMW_CONFIGS[0])])
def test_uncoalesced_gradient_with_repeated_rows_equals_its_sum(cls, kwargs):
    """Two sparse gradients accumulated on .grad (unsorted, repeated rows) update like their sum."""
    initial = torch.randn(ROWS, D)
    a, b = torch.nn.Parameter(initial.clone()), torch.nn.Parameter(initial.clone())
    opt_a, opt_b = cls([a], **kwargs), cls([b], **kwargs)
    rows, values = torch.tensor([7, 2, 7, 5]), torch.randn(4, D)
    a.grad = torch.sparse_coo_tensor(rows[None], values, (ROWS, D), check_invariants=True)
    summed = torch.zeros(ROWS, D).index_put_((rows,), values, accumulate=True)
    touched = torch.tensor([2, 5, 7])
    b.grad = torch.sparse_coo_tensor(touched[None], summed[touched], (ROWS, D), check_invariants=True)
    opt_a.step()
    opt_b.step()
    torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-6, atol=1e-7)
    assert torch.equal(a.detach()[[0, 1, 3, 4, 6]], initial[[0, 1, 3, 4, 6]])



@pytest.mark.parametrize("cls, kwargs", [(RowSparseSGD, SGD_CONFIGS[0]), (RowSparseAdamW, ADAMW_CONFIGS[0])])
@pytest.mark.parametrize("tail", ["new rows, zeros on the run's first row", "a nonzero value on a row of the run",
                                  "only zeros on the run's first row"])
def test_a_sorted_run_then_slots_steps_like_the_coalesced_gradient(cls, kwargs, tail):
    """The head's gradient is a sorted run of distinct rows, then B slots (owned targets outside the run; unused
    slots add zeros to the run's first row): stepped without coalescing the run, it equals the coalesced step."""
    run = torch.tensor([1, 3, 4, 8])
    slots = {"new rows, zeros on the run's first row": ([9, 1, 0, 1], [True, False, True, False]),
             "a nonzero value on a row of the run": ([9, 4, 1, 1], [True, True, False, False]),
             "only zeros on the run's first row": ([1, 1], [False, False])}[tail]
    slot_rows, used = torch.tensor(slots[0]), torch.tensor(slots[1])
    values = torch.cat([torch.randn(run.numel(), D), torch.randn(slot_rows.numel(), D) * used[:, None]])
    grad = torch.sparse_coo_tensor(torch.cat([run, slot_rows])[None], values, (ROWS, D), check_invariants=True)
    initial = torch.randn(ROWS, D)
    a, b = torch.nn.Parameter(initial.clone()), torch.nn.Parameter(initial.clone())
    opt_a, opt_b = cls([a], **kwargs), cls([b], **kwargs)
    for _ in range(2):  # the second step also reads the state the first one wrote
        a.grad, b.grad = grad, grad.coalesce()
        opt_a.step()
        opt_b.step()
    torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-6, atol=1e-7)
    for name in _state_names(opt_b):
        torch.testing.assert_close(opt_a.state[a][name], opt_b.state[b][name], rtol=1e-6, atol=1e-7)
    untouched = [r for r in range(ROWS) if r not in set(b.grad.indices()[0].tolist())]
    assert torch.equal(a.detach()[untouched], initial[untouched])

@pytest.mark.parametrize("cls, kwargs", [(RowSparseSGD, k) for k in SGD_CONFIGS] +
                         [(RowSparseAdamW, k) for k in ADAMW_CONFIGS])
@pytest.mark.parametrize("with_coef", (True, False))
def test_update_rows_product_equals_update_rows_with_the_formed_gradient(cls, kwargs, with_coef):
    """update_rows_product(lhs, rhs, c, values) steps rows (a slice or a row list) exactly like
    update_rows(lhs @ rhs + c values) over STEPS steps (float64; SGD without nesterov takes its own
    addmm-into-momentum path, the others form the gradient), and leaves the other rows alone."""
    gen = torch.Generator().manual_seed(3)
    weights = [torch.nn.Parameter(torch.randn(ROWS, D, generator=gen, dtype=torch.float64)) for _ in range(2)]
    weights[1].data.copy_(weights[0].data)
    opts = [cls([w], **kwargs) for w in weights]
    for step, (rows, _) in enumerate(_schedule()):
        lhs, rhs = (torch.randn(rows.numel(), 7, generator=gen, dtype=torch.float64),
                    torch.randn(7, D, generator=gen, dtype=torch.float64))
        coef = torch.randn(rows.numel(), generator=gen, dtype=torch.float64) if with_coef else None
        as_slice = step % 2 == 0  # even steps: the contiguous rows [2, 2 + n) by start, odd: the row list
        sel = torch.arange(2, 2 + rows.numel()) if as_slice else rows
        where = dict(start=2) if as_slice else dict(rows=rows)
        values = weights[0].detach()[sel].clone()
        grad = lhs @ rhs + (coef[:, None] * values if with_coef else 0)
        before = weights[0].detach().clone()
        opts[0].update_rows_product(weights[0], lhs, rhs, coef, values, **where)
        opts[1].update_rows(weights[1], grad, **where)
        torch.testing.assert_close(weights[0].detach(), weights[1].detach(), rtol=1e-12, atol=1e-14)
        others = torch.ones(ROWS, dtype=torch.bool)
        others[sel] = False
        assert torch.equal(weights[0].detach()[others], before[others])
    for name in _state_names(opts[0]):
        torch.testing.assert_close(opts[0].state[weights[0]][name], opts[1].state[weights[1]][name], rtol=1e-12,
                                   atol=1e-14)
