"""Counter-based randomness: the same numbers for the same keys in every process.

The data layer must give identical samples and identical shuffles on every rank,
worker and restart without sharing state. Everything random here is therefore a pure
function of integer keys (seed, epoch, identity, sample, ...):

- ``hash_uniform(keys, n)``: n uniforms in [0, 1) from a splitmix64 hash of the keys;
- ``hash_normal(keys, n)``: n standard normals (Box-Muller over hash_uniform);
- ``FeistelPermutation(n, key)``: a pseudo-random permutation of range(n) evaluated
  pointwise in O(1) memory (a 4-round Feistel network with cycle walking), used to
  shuffle tens of millions of synthetic samples without materializing a permutation.

    python -c "from dsoft_dist.data.rng import FeistelPermutation as P; print(P(10, 3)(range(10)))"
"""
from __future__ import annotations

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer on a uint64 array (wrap-around arithmetic)."""
    with np.errstate(over="ignore"):
        z = np.asarray(x, dtype=np.uint64) + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
        return z ^ (z >> np.uint64(31))


def hash_keys(*keys) -> np.ndarray:
    """Folds integer keys (scalars or broadcastable int arrays) into one uint64 hash array."""
    h = mix64(np.zeros((), dtype=np.uint64))
    for key in keys:
        if isinstance(key, int):
            k = np.uint64(key & 0xFFFFFFFFFFFFFFFF)  # python ints of any size, e.g. another hash
        else:
            k = np.asarray(key)
            k = k if k.dtype == np.uint64 else k.astype(np.int64).astype(np.uint64)
        h = mix64(h ^ mix64(k))
    return h


def hash_uniform(keys: tuple, n: int) -> np.ndarray:
    """Uniforms in [0, 1), shape (*broadcast(keys), n), float64; a pure function of keys."""
    h = hash_keys(*keys)
    with np.errstate(over="ignore"):
        counters = np.arange(1, n + 1, dtype=np.uint64) * _GOLDEN  # (n,)
        z = mix64(np.asarray(h)[..., None] ^ counters)
    return (z >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def hash_normal(keys: tuple, n: int) -> np.ndarray:
    """Standard normals, shape (*broadcast(keys), n), float64 (Box-Muller)."""
    half = (n + 1) // 2
    u = hash_uniform(keys, 2 * half)
    r = np.sqrt(-2.0 * np.log1p(-u[..., :half]))  # 1-u in (0, 1]
    t = 2.0 * np.pi * u[..., half:]
    return np.concatenate([r * np.cos(t), r * np.sin(t)], axis=-1)[..., :n]


class FeistelPermutation:
    """A seeded bijection of range(n) computed pointwise: ``perm(i)`` for any index array.

    A balanced Feistel network on the smallest even bit width covering n, with cycle
    walking to stay inside [0, n). Memory O(1), cost O(len(i)) (plus a few walks).
    """

    def __init__(self, n: int, key: int, rounds: int = 4):
        if n < 1:
            raise ValueError(f"FeistelPermutation needs n >= 1, got n={n}")
        self.n = int(n)
        bits = max(2, int(np.ceil(np.log2(max(n, 2)))))
        self.half = (bits + 1) // 2
        self.mask = np.uint64((1 << self.half) - 1)
        self.round_keys = [np.uint64(hash_keys(key, r)) for r in range(rounds)]

    def _encrypt(self, x: np.ndarray) -> np.ndarray:
        half = np.uint64(self.half)
        left, right = x >> half, x & self.mask
        for rk in self.round_keys:
            left, right = right, left ^ (mix64(right ^ rk) & self.mask)
        return (left << half) | right

    def __call__(self, index) -> np.ndarray:
        x = np.asarray(index, dtype=np.int64)
        shape, x = x.shape, x.reshape(-1)
        if x.size and (x.min() < 0 or x.max() >= self.n):
            raise ValueError(f"permutation index out of range [0, {self.n}): min={x.min()}, max={x.max()}")
        y = self._encrypt(x.astype(np.uint64))
        out = y >= np.uint64(self.n)
        while out.any():  # cycle walking: re-encrypt until back inside [0, n)
            y[out] = self._encrypt(y[out])
            out = y >= np.uint64(self.n)
        return y.astype(np.int64).reshape(shape)
