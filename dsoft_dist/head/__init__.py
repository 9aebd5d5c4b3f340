"""The class-sharded classifier head: module, local shard kernels (torch path), row-sparse optimizers, state."""
from dsoft_dist.head.backend import BACKEND_NAMES, get_local_backend, register_local_backend
from dsoft_dist.head.local import auto_chunk_size, torch_local_shard_stats
from dsoft_dist.head.optim import RowSparseAdamW, RowSparseSGD, build_head_optimizer
from dsoft_dist.head.sharded import ShardedClassifier, init_shard_weight
from dsoft_dist.head.state import assemble_rows, load_head_checkpoint, save_head_checkpoint

__all__ = [
    "BACKEND_NAMES", "auto_chunk_size", "get_local_backend", "register_local_backend", "torch_local_shard_stats",
    "RowSparseAdamW", "RowSparseSGD", "build_head_optimizer", "ShardedClassifier", "init_shard_weight",
    "assemble_rows", "load_head_checkpoint", "save_head_checkpoint",
]
