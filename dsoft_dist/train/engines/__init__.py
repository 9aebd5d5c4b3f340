"""Engines for the backbone, registered in ``dsoft_dist.registry.ENGINES`` under ``parallel.engine``:
``ddp`` (engines/ddp.py) and ``deepspeed`` (engines/deepspeed.py). The head is never inside one."""
from dsoft_dist.train.engines import ddp, deepspeed

__all__ = ["ddp", "deepspeed"]
