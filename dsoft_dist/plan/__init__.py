"""``dsoft plan``: what the sharded head needs on a cluster, from closed forms checked against ``dsoft bench head``.

    from dsoft_dist.plan import PlanInputs, build_plan
    res = build_plan(PlanInputs(classes=10**7, gpus=64, dim=512, batch_per_gpu=128, sample_rate=1 / 64))
    res["memory"]["total"], res["links"]["per_link"], res["flops"]["model"]

estimate.py: inputs, shard, rows per step, state, collectives, FLOPs; memory.py: the transient
workspace and the backbone; timing.py: the step time from a measured profile; profile.py:
measuring one; report.py: the result dict and its text; cli.py: the subcommand. docs/scale.md.
"""
from dsoft_dist.plan.estimate import PlanInputs
from dsoft_dist.plan.report import build_plan

__all__ = ["PlanInputs", "build_plan"]
