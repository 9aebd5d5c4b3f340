"""The loss family: D-Softmax and the margin softmax baselines, functional and as modules; the losses the
head computes, registered under their ``head.loss`` names (``dsoft_dist.losses.forms``)."""
from dsoft_dist.losses.forms import LossForm, margin_losses, resolve_margins
from dsoft_dist.losses.functional import (
    d_softmax,
    d_softmax_from_parts,
    d_softmax_terms,
    inter_from_parts,
    intra_from_parts,
    margin_softmax,
    margin_softmax_from_parts,
    margin_target,
    masked_logsumexp,
    softmax,
    validate_labels,
)
from dsoft_dist.losses.modules import DSoftmaxLoss, MarginSoftmaxLoss
from dsoft_dist.losses.negatives import (
    MODES,
    NEGATIVES,
    class_mask,
    draw_seed,
    num_sampled,
    sample_without_replacement,
    select_classes,
    select_shard_classes,
)

__all__ = [
    "d_softmax", "d_softmax_from_parts", "d_softmax_terms", "inter_from_parts", "intra_from_parts",
    "margin_softmax", "margin_softmax_from_parts", "margin_target", "masked_logsumexp", "softmax",
    "validate_labels", "LossForm", "margin_losses", "DSoftmaxLoss", "MarginSoftmaxLoss", "resolve_margins", "MODES",
    "NEGATIVES", "class_mask", "num_sampled", "sample_without_replacement", "select_classes",
    "select_shard_classes", "draw_seed",
]
