"""Training pieces shared by `dsoft demo` and the trainer: learning-rate schedule, step helpers."""
from dsoft_dist.train.schedule import lr_factor

__all__ = ["lr_factor"]
