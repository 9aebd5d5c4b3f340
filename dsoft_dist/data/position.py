"""The epoch position that survives a change of world size: which samples of the epoch are done.

A *sample id* numbers a sample in its data set, whatever the split: synthetic sources use
identity * samples_per_class + index; shards with a manifest use the shard's first id (shards
in manifest order) + the sample's position in its tar. A *done mask* is a packed bitmap over
sample ids (uint8, ceil(N / 8) bytes; bit i set: sample i was trained on this epoch), so the
position of a 42M-sample epoch costs 5 MB in a checkpoint on any number of ranks.

Resuming on another world size (or batch size) cuts the epoch's *remaining* samples, its
order with the done ones left out, into the new (rank, worker) parts, so nothing trained on
is read again and nothing left is lost; as in every epoch, a tail that does not fill one
batch per rank is dropped.

    python -c "from dsoft_dist.data.position import *; m = new_mask(10); mark(m, [1, 9]); print(count_done(m))"
"""
from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from dsoft_dist.parallel import group_rank_size


def new_mask(num_samples: int) -> np.ndarray:
    """An all-clear done mask for ``num_samples`` sample ids: (ceil(N / 8),) uint8."""
    return np.zeros((num_samples + 7) // 8, dtype=np.uint8)


def mark(mask: np.ndarray, ids) -> None:
    """Sets the bits of ``ids`` (int array) in ``mask``, in place."""
    ids = np.asarray(ids, dtype=np.int64)
    np.bitwise_or.at(mask, ids >> 3, (np.uint8(128) >> (ids & 7)).astype(np.uint8))


def is_done(mask: np.ndarray, ids) -> np.ndarray:
    """(n,) bool: whether each of ``ids`` is set in ``mask``."""
    ids = np.asarray(ids, dtype=np.int64)
    return (mask[ids >> 3] >> (7 - (ids & 7)).astype(np.uint8)) & 1 == 1


def done_range(mask: np.ndarray, start: int, stop: int) -> np.ndarray:
    """(stop - start,) bool: the bits of sample ids [start, stop)."""
    first = start // 8
    bits = np.unpackbits(mask[first:(stop + 7) // 8])
    return bits[start - first * 8:stop - first * 8].astype(bool)


def count_done(mask: np.ndarray) -> int:
    """The number of set bits."""
    return int(np.unpackbits(mask).sum())


def union_over_ranks(mask: np.ndarray, group=None) -> np.ndarray:
    """Collective: the bitwise OR of every rank's mask (on a gloo group: NCCL has no bitwise OR;
    ``group=None`` uses the default group, which must then be gloo). One rank: the mask itself."""
    if group_rank_size(group)[1] == 1:
        return mask.copy()
    t = torch.from_numpy(mask.copy())
    dist.all_reduce(t, op=dist.ReduceOp.BOR, group=group)
    return t.numpy()


def to_tensor(mask: np.ndarray | None) -> torch.Tensor | None:
    """The mask as a uint8 tensor (what a weights-only checkpoint can hold)."""
    return None if mask is None else torch.from_numpy(mask.copy())


def from_tensor(value, num_samples: int) -> np.ndarray:
    """A mask read back from a checkpoint; ValueError when its size does not fit ``num_samples``."""
    mask = np.asarray(value.numpy() if isinstance(value, torch.Tensor) else value, dtype=np.uint8)
    if mask.shape != ((num_samples + 7) // 8,):
        raise ValueError(f"the saved data position covers {mask.size * 8} sample ids but this data set has "
                         f"{num_samples}: resume with the data the checkpoint was written with")
    return mask
