"""The trainer: distributed start-up, building the run, engines, one step, the loop, reports.

    dsoft train --config configs/demo.yaml            # or: python -m dsoft_dist.train ...
    from dsoft_dist.train.trainer import Trainer; from dsoft_dist.parallel.processes import distributed

Modules: distributed (start-up), build (backbone, head, optimizers), grads (the gradient
conventions), engines (ddp, deepspeed), step (one optimizer step), trainer
(the loop), validate (verification during training), metrics, report, schedule, cli.
"""
from dsoft_dist.train.schedule import lr_factor

__all__ = ["lr_factor"]
