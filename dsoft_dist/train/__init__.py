"""The trainer: building the run, the engines, one optimizer step's update, the loop, checkpoints, reports.

    dsoft train --config configs/demo.yaml            # or: python -m dsoft_dist.train ...
    from dsoft_dist.train.trainer import Trainer; from dsoft_dist.parallel.processes import distributed

Modules: build (backbone, head, optimizers), grads (the gradient conventions), engines (the
Engine protocol; ddp, deepspeed), update (one optimizer step's micro-batches and update), state
(the checkpoint parts, TrainState), checkpoint and ckpt_files (run checkpoints), trainer (the
loop), verify (verification during training), data, metrics, report, schedule, preempt, cli.
"""
from dsoft_dist.train.schedule import inter_weight_at, lr_factor

__all__ = ["inter_weight_at", "lr_factor"]
