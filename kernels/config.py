"""Tile sizes and launch settings of the triton backend's shard-statistics kernels.

One ``KernelConfig`` drives all three kernels (no autotune: it needs 2+ configs, which the
interpreter cannot run, and a sweep belongs in the benchmark, which measures it):

    forward        grid (row tiles, column splits)        tile (block_m, block_n), D in block_k steps
    grad features  grid (row tiles, column splits, D slices)  accumulator (block_m, block_d)
    grad weight    grid (column tiles, D slices)          accumulator (block_n, block_d)

block_d = 0 takes the whole embedding (next power of two of D) in one slice: one recompute
of the logits per backward kernel. Smaller slices cut registers but recompute per slice.
col_splits / feature_splits = 0 pick enough programs to fill the GPU (1 in the interpreter).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

_POW2_MIN = 16  # tl.dot needs every tile dim >= 16


def _check_pow2(name: str, value: int, allow_zero: bool = False) -> None:
    if allow_zero and value == 0:
        return
    if value < _POW2_MIN or value & (value - 1):
        raise ValueError(f"KernelConfig.{name}={value} is invalid: must be a power of two >= {_POW2_MIN}"
                         + (" or 0 (automatic)" if allow_zero else ""))


@dataclass(frozen=True)
class KernelConfig:
    """Tiles (powers of two >= 16), warps/stages (GPU only), split counts (0 = automatic)."""

    block_m: int = 64
    block_n: int = 128
    block_k: int = 64
    block_d: int = 0
    num_warps: int = 8
    num_stages: int = 3
    col_splits: int = 0
    feature_splits: int = 0
    bwd_block_m: int = 64
    bwd_block_n: int = 64

    def __post_init__(self):
        for name in ("block_m", "block_n", "block_k", "bwd_block_m", "bwd_block_n"):
            _check_pow2(name, getattr(self, name))
        _check_pow2("block_d", self.block_d, allow_zero=True)
        for name in ("num_warps", "num_stages"):
            if getattr(self, name) < 1:
                raise ValueError(f"KernelConfig.{name}={getattr(self, name)} is invalid: must be >= 1")
        for name in ("col_splits", "feature_splits"):
            if getattr(self, name) < 0:
                raise ValueError(f"KernelConfig.{name}={getattr(self, name)} is invalid: must be >= 0 (0 = auto)")

    def with_(self, **changes) -> "KernelConfig":
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)


# tile settings tried by ``dsoft bench kernels --sweep`` (fixed in advance; the best by median step time is used);
# all compile for sm_90 without spills beyond 16 bytes (python -m dsoft_dist.kernels.compile_check --sweep)
SWEEP_CONFIGS = [
    dict(block_m=128, block_n=128, block_k=64, block_d=256, bwd_block_m=64, bwd_block_n=64, num_warps=8,
         num_stages=3),  # the default GPU config: backward in two D slices (recomputes the logits twice)
    dict(block_m=128, block_n=128, block_k=64, block_d=512, bwd_block_m=64, bwd_block_n=32, num_warps=8,
         num_stages=2),  # whole D=512 per backward program: one recompute, narrower column tiles
    dict(block_m=128, block_n=128, block_k=64, block_d=512, bwd_block_m=64, bwd_block_n=32, num_warps=8,
         num_stages=3),
    dict(block_m=128, block_n=128, block_k=64, block_d=256, bwd_block_m=64, bwd_block_n=64, num_warps=8,
         num_stages=4),
]


def next_pow2(n: int) -> int:
    """Smallest power of two >= max(n, 16)."""
    p = _POW2_MIN
    while p < n:
        p *= 2
    return p


def default_config(dim: int, interpret: bool) -> KernelConfig:
    """The config used when none is given: large tiles in the interpreter (few, big numpy ops)."""
    if interpret:
        return KernelConfig(block_m=64, block_n=128, block_k=next_pow2(min(dim, 128)), num_warps=4,
                            num_stages=1, col_splits=1, feature_splits=1, bwd_block_m=64, bwd_block_n=128)
    # GPU guess for D <= 512 (to be confirmed by `python -m dsoft_dist.bench.kernels --sweep`)
    return KernelConfig(block_m=128, block_n=128, block_k=64, block_d=min(next_pow2(dim), 256), num_warps=8,
                        num_stages=3, bwd_block_m=64, bwd_block_n=64)
