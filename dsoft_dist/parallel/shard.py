"""Class-shard math: which contiguous block of class rows each rank owns (DESIGN.md §2).

    start, count = shard_range(num_classes=37, world_size=4, rank=1)   # (10, 9)
    ranges = shard_ranges(37, 4)                                        # [(0, 10), (10, 9), (19, 9), (28, 9)]

Rank p owns C_local = C // P + (p < C % P) rows starting at class_start = (C // P) p + min(p, C % P),
so the first C % P ranks hold one extra row and every class has exactly one owner.
"""
from __future__ import annotations


def check_world(num_classes: int, world_size: int) -> None:
    """Raises ValueError unless every rank can own at least one class row."""
    if num_classes < 1:
        raise ValueError(f"num_classes={num_classes} is invalid: must be >= 1")
    if world_size < 1:
        raise ValueError(f"world_size={world_size} is invalid: must be >= 1")
    if world_size > num_classes:
        raise ValueError(f"world size {world_size} is larger than num_classes={num_classes}: every rank must own "
                         f"at least one class row; use a head process group of at most {num_classes} ranks")


def shard_range(num_classes: int, world_size: int, rank: int) -> tuple[int, int]:
    """(class_start, num_local_classes) of ``rank``'s class shard."""
    check_world(num_classes, world_size)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} is outside [0, {world_size})")
    base, extra = divmod(num_classes, world_size)
    return base * rank + min(rank, extra), base + (1 if rank < extra else 0)


def shard_ranges(num_classes: int, world_size: int) -> list[tuple[int, int]]:
    """[(class_start, num_local_classes)] for every rank, in rank order."""
    return [shard_range(num_classes, world_size, p) for p in range(world_size)]
