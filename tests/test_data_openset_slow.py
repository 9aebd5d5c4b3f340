"""The synthetic task is a real open-set embedding task: a tiny CNN trained briefly through
build_train_loader verifies *unseen* identities clearly above chance (and its untrained self)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dsoft_dist.config.schema import DataConfig
from dsoft_dist.data import EVAL_IDENTITY_OFFSET, SyntheticIdentities, build_train_loader
from dsoft_dist.data.decode import normalize_images
from dsoft_dist.observability import get_logger

NUM_CLASSES, SIZE = 100, 32


class TinyCNN(nn.Module):
    """4 conv blocks (32 -> 2 px) + a linear embedding; defined here, not in dsoft_dist.models."""

    def __init__(self, dim: int = 64):
        super().__init__()
        block = lambda i, o: nn.Sequential(nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o),  # noqa
                                           nn.ReLU(), nn.MaxPool2d(2))
        self.features = nn.Sequential(block(3, 16), block(16, 32), block(32, 64), block(64, 64))
        self.embed = nn.Linear(64 * 2 * 2, dim)

    def forward(self, x):  # (B, 3, 32, 32) -> (B, dim)
        return self.embed(self.features(x).flatten(1))


def _eval_pairs(num_identities=200, per=10, pairs=600, seed=1):
    """Pairs of unseen identities (global ids from EVAL_IDENTITY_OFFSET): half same, half different."""
    src = SyntheticIdentities(num_identities, image_size=SIZE, identity_offset=EVAL_IDENTITY_OFFSET)
    rng = np.random.default_rng(seed)
    a, b, same = [], [], []
    for k in range(pairs):
        if k % 2 == 0:
            i = rng.integers(num_identities)
            j1, j2 = rng.choice(per, 2, replace=False)
            a.append(src.sample(i, j1)), b.append(src.sample(i, j2)), same.append(True)
        else:
            i1, i2 = rng.choice(num_identities, 2, replace=False)
            a.append(src.sample(i1, rng.integers(per))), b.append(src.sample(i2, rng.integers(per))), same.append(False)
    as_tensor = lambda xs: normalize_images(torch.from_numpy(np.stack(xs)))  # noqa: E731
    return as_tensor(a), as_tensor(b), np.array(same)


def _verification_accuracy(net, a, b, same) -> float:
    """Two-fold: the threshold is picked on one half of the pairs and scored on the other."""
    net.eval()
    with torch.no_grad():
        sim = (F.normalize(net(a)) * F.normalize(net(b))).sum(1).numpy()
    net.train()
    half, scores = len(sim) // 2, []
    for fit, test in ((slice(0, half), slice(half, None)), (slice(half, None), slice(0, half))):
        best = max(np.sort(sim[fit]), key=lambda t: ((sim[fit] >= t) == same[fit]).mean())
        scores.append(((sim[test] >= best) == same[test]).mean())
    return float(np.mean(scores))


@pytest.fixture
def one_thread():
    """Tiny convs on a shared 2-core machine: one intra-op thread avoids OpenMP spin contention (~10x)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.slow(reason="trains a CNN until it verifies unseen identities (~30 s)")
def test_tiny_cnn_verifies_unseen_synthetic_identities(one_thread):
    torch.manual_seed(0)
    a, b, same = _eval_pairs()
    net = TinyCNN()
    centers = nn.Parameter(torch.randn(NUM_CLASSES, 64) * 0.01)
    untrained = _verification_accuracy(net, a, b, same)
    opt = torch.optim.SGD(list(net.parameters()) + [centers], lr=0.1, momentum=0.9, weight_decay=5e-4)
    cfg = DataConfig(num_classes=NUM_CLASSES, samples_per_class=24, image_size=SIZE, batch_size=64, num_workers=1)
    steps = 0
    for epoch in range(11):  # 37 steps per epoch
        for x, y in build_train_loader(cfg, rank=0, world_size=1, epoch=epoch):
            cos = F.normalize(net(x)) @ F.normalize(centers).t()  # (B, C)
            loss = F.cross_entropy(16.0 * (cos - 0.2 * F.one_hot(y, NUM_CLASSES)), y)  # CosFace, s=16, m=0.2
            opt.zero_grad()
            loss.backward()
            opt.step()
            steps += 1
    trained = _verification_accuracy(net, a, b, same)
    get_logger(__name__).info("unseen-identity verification: untrained %.3f, trained %.3f (%d steps)",
                              untrained, trained, steps)
    assert steps == 11 * 37
    assert trained > 0.70 and trained > untrained + 0.1, (untrained, trained)
