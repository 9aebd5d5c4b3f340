"""A steady head step reads nothing back to the host in the `all` and `random` modes.

On a GPU every host read (``.item()``, ``.tolist()``, ``if tensor:``, an op whose output
size depends on the data such as ``nonzero`` or ``unique``) stalls the stream until the
queued work is done. ``no_host_reads`` makes each of them raise on CPU: the Tensor methods
that read values are patched, and a dispatch mode rejects the data-dependent aten ops.
The first step is taken normally (it checks the inputs across ranks and logs the path);
the second runs forward and backward (and the optimizer, when it runs inside backward)
under the guard. The GPU tests do the same with ``torch.cuda.set_sync_debug_mode("error")``
(tests/test_kernels_gpu.py::test_a_steady_head_step_does_not_synchronize).
"""
from __future__ import annotations

import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dsoft_dist.config.schema import OptimizerConfig
from dsoft_dist.head import ShardedClassifier, build_head_optimizer

C, D, B = 50, 8, 12
_READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__")
_aten = torch.ops.aten
# ops whose result is a host value or whose output size depends on the data
_DATA_DEPENDENT = {_aten._local_scalar_dense.default, _aten.nonzero.default, _aten._unique2.default,
                   _aten.unique_dim.default, _aten.unique_consecutive.default, _aten.masked_select.default,
                   _aten.is_nonzero.default, _aten.equal.default, _aten.allclose.default}


class HostReadError(AssertionError):
    pass


class _RejectDataDependent(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        bool_index = func is _aten.index.Tensor and any(
            t is not None and t.dtype == torch.bool for t in (args[1] if len(args) > 1 else ()))
        if func in _DATA_DEPENDENT or bool_index:
            raise HostReadError(f"{func} reads device data back to the host")
        return func(*args, **kwargs)


@contextlib.contextmanager
def no_host_reads():
    """Inside, every host read of a tensor raises HostReadError."""
    saved = {name: getattr(torch.Tensor, name) for name in _READS}

    def refuse(name):
        def method(self, *args, **kwargs):
            raise HostReadError(f"Tensor.{name} reads a tensor back to the host")
        return method

    try:
        for name in _READS:
            setattr(torch.Tensor, name, refuse(name))
        with _RejectDataDependent():
            yield
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)


def _batch(step):
    gen = torch.Generator().manual_seed(step)
    labels = torch.randint(0, C, (B,), generator=gen)
    labels[0], labels[1], labels[2] = -1, labels[3], labels[3]  # an ignored row and a repeated class
    return torch.randn(B, D, generator=gen, requires_grad=True), labels


def _head(negatives, optimizer=None, **kwargs):
    head = ShardedClassifier(C, D, negatives=negatives, sample_rate=0.2, chunk_size=4, **kwargs)
    opt = None
    if optimizer is not None:
        opt = build_head_optimizer(head, OptimizerConfig(name=optimizer, lr=0.1, momentum=0.9, weight_decay=5e-4,
                                                         head_step_in_backward=True))
    emb, labels = _batch(0)
    head(emb, labels).backward()  # the first step: input check across ranks, path logged
    return head, opt


@pytest.mark.parametrize("loss", ["d_softmax", "arcface", "softmax"])
@pytest.mark.parametrize("negatives", ["all", "random"])
@pytest.mark.parametrize("optimizer", [None, "sgd", "adamw"])
@pytest.mark.parametrize("logit_cache_mb", [0.0, 1.0])
def test_a_steady_step_reads_nothing_back(loss, negatives, optimizer, logit_cache_mb):
    head, _ = _head(negatives, optimizer, loss=loss, logit_cache_mb=logit_cache_mb,
                    inter_correction=negatives == "random")
    emb, labels = _batch(1)
    with no_host_reads():
        loss_value = head(emb, labels)
        loss_value.backward()
    assert torch.isfinite(loss_value.detach()).all() and emb.grad.abs().sum() > 0
    if optimizer is None:
        assert head.weight.grad is not None and head.weight.grad.is_sparse == (negatives == "random")
    else:
        assert head.weight.grad is None  # the optimizer ran inside backward


def test_the_guard_catches_each_kind_of_host_read():
    """The guard can fail: an input check every step (.tolist()), batch negatives (unique), a mask index."""
    head, _ = _head("all", checks="always")
    emb, labels = _batch(1)
    with pytest.raises(HostReadError, match="tolist"), no_host_reads():
        head(emb, labels)
    head, _ = _head("batch")
    with pytest.raises(HostReadError, match="index|unique|nonzero"), no_host_reads():
        head(emb, labels)
    with pytest.raises(HostReadError, match="index"), no_host_reads():
        emb[labels >= 0]
    with pytest.raises(HostReadError, match="item"), no_host_reads():
        emb.sum().item()


def test_checks_modes_and_the_environment_override(monkeypatch):
    head = ShardedClassifier(C, D)
    assert head.checks == "first"
    emb, labels = _batch(1)
    bad = labels.clone()
    bad[4] = C + 3
    with pytest.raises(ValueError, match=f"contain {C + 3}"):
        head(emb, bad)  # the first forward is checked
    head(emb, labels)
    head(emb, bad)  # later forwards are not: the trainer's loader checks every label
    assert ShardedClassifier(C, D, checks=True).checks == "always"
    assert ShardedClassifier(C, D, checks=False).checks == "never"
    monkeypatch.setenv("DSOFT_CHECKS", "always")
    assert ShardedClassifier(C, D, checks="never").checks == "always"
    monkeypatch.setenv("DSOFT_CHECKS", "sometimes")
    with pytest.raises(ValueError, match="DSOFT_CHECKS='sometimes' is invalid"):
        ShardedClassifier(C, D)
    monkeypatch.delenv("DSOFT_CHECKS")
    with pytest.raises(ValueError, match="checks='each' is invalid"):
        ShardedClassifier(C, D, checks="each")
