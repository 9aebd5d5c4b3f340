"""Model-parallel plumbing: class-shard math and counted autograd collectives."""
from dsoft_dist.parallel.comm import (
    CommCounter,
    all_gather_cat,
    all_reduce,
    broadcast,
    gather_rows,
    group_rank_size,
    reduce_replicated,
    reduce_scatter_rows,
)
from dsoft_dist.parallel.ports import free_port
from dsoft_dist.parallel.shard import check_world, shard_range, shard_ranges

__all__ = [
    "CommCounter", "all_gather_cat", "all_reduce", "broadcast", "gather_rows", "group_rank_size", "reduce_replicated",
    "reduce_scatter_rows", "check_world", "free_port", "shard_range", "shard_ranges",
]
