"""Evaluation: safe .bin loading, embedding extraction, k-fold verification, TAR@FAR / ROC,
rank-k identification with distractors, the IJB-B / IJB-C protocol, reports and export. See docs/eval.md.

    from dsoft_dist.eval import load_bin, verify_kfold, tar_at_far, identify, extract_embeddings, evaluate_ijb
"""
from dsoft_dist.eval.binfile import BinFormatError, decode_images, load_bin, write_bin
from dsoft_dist.eval.extract import embed_pairs, extract_embeddings
from dsoft_dist.eval.identification import identification_ranks, identify
from dsoft_dist.eval.ijb import evaluate_ijb
from dsoft_dist.eval.ijb_meta import load_layout
from dsoft_dist.eval.roc import auc, eer, roc_corners, roc_curve, roc_metrics, tar_at_far, tar_at_far_nearest
from dsoft_dist.eval.verification import verify_kfold, verify_scores_kfold

__all__ = [
    "BinFormatError", "load_bin", "write_bin", "decode_images", "extract_embeddings", "embed_pairs",
    "verify_kfold", "verify_scores_kfold", "tar_at_far", "tar_at_far_nearest", "roc_curve", "roc_corners",
    "roc_metrics", "auc", "eer", "identify", "identification_ranks", "evaluate_ijb", "load_layout",
]
