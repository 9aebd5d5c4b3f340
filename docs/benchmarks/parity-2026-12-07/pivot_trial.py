"""A trial outside the package (inter-pivot-trial.md): D-Softmax whose inter term's virtual target sits at
cosine t instead of 0, inter = log(1 + sum_k exp(s (z_k - t))), so that a row's push fades once its negatives
are well under t, as ArcFace's fades once its target leads. t is read from head.m3 (the only free float key a
trial can sweep); the module replaces the registered d_softmax so that the bench's d_softmax method trains it:

    PYTHONPATH=docs/benchmarks/parity-2026-12-07 dsoft bench accuracy --parts images --image-steps 900 \
      --image-classes 2000 --seeds 0 --methods d_softmax --sweep "extra_modules=[pivot_trial]" \
      --sweep head.end_point=1.0 --sweep head.m3=0.4,0.5,0.6 --out runs/pivot
"""
import torch

from dsoft_dist.losses import functional as LF
from dsoft_dist.losses.forms import LossForm
from dsoft_dist.registry import LOSSES


def pivot_rows(z, log_sum_with, head):
    intra = LF.intra_from_parts(z, head.scale, head.end_point)
    shift = head.scale * head.m3
    inter = log_sum_with(torch.full_like(z, shift)) - shift
    return intra + head.inter_weight * inter, {"intra": intra, "inter": inter}


# the trial replaces d_softmax so that the bench's d_softmax method trains it (head.m3 = t, given by --sweep)
LOSSES.register("d_softmax", LossForm(pivot_rows), replace=True)
