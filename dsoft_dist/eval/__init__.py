"""Evaluation: safe .bin loading, embedding extraction, k-fold verification, TAR@FAR / ROC,
rank-k identification with distractors, reports and export. See docs/eval.md.

    from dsoft_dist.eval import load_bin, verify_kfold, tar_at_far, identify, extract_embeddings
"""
from dsoft_dist.eval.binfile import BinFormatError, decode_images, load_bin, write_bin
from dsoft_dist.eval.extract import embed_pairs, extract_embeddings
from dsoft_dist.eval.identification import identification_ranks, identify
from dsoft_dist.eval.roc import auc, eer, roc_curve, roc_metrics, tar_at_far
from dsoft_dist.eval.verification import verify_kfold, verify_scores_kfold

__all__ = [
    "BinFormatError", "load_bin", "write_bin", "decode_images", "extract_embeddings", "embed_pairs",
    "verify_kfold", "verify_scores_kfold", "tar_at_far", "roc_curve", "roc_metrics", "auc", "eer",
    "identify", "identification_ranks",
]
