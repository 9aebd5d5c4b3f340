"""Evaluation runs shared by ``dsoft eval`` and the trainer: .bin sets and pair lists for one model.

    from dsoft_dist.eval.runner import evaluate_all, evaluate_bin, evaluate_pairs, flat_metrics
    res = evaluate_bin(model, "lfw.bin", batch_size=256, flip=True)   # res["accuracy"], ...
    res = evaluate_pairs(model, "pairs.txt", fars=(1e-4, 1e-3))        # res["tar_at_far"], res["auc"], ...
    metrics = flat_metrics(evaluate_all(model, cfg.eval))             # {"lfw/accuracy": ..., ...} for logging

In distributed training call these on one rank (they embed everything on that rank's device).
"""
from __future__ import annotations

import os

import numpy as np
from torch import nn

from dsoft_dist.eval.arrays import as_numpy_2d, cosine_scores
from dsoft_dist.eval.binfile import load_bin
from dsoft_dist.eval.extract import embed_pairs, extract_embeddings
from dsoft_dist.eval.pairs import FileImages, read_pair_list, read_pair_npz
from dsoft_dist.eval.roc import DEFAULT_FARS, roc_curve, roc_metrics
from dsoft_dist.eval.verification import verify_kfold
from dsoft_dist.observability import get_logger

log = get_logger(__name__)


def set_name(path: str) -> str:
    """'data/lfw.bin' -> 'lfw'."""
    return os.path.splitext(os.path.basename(path))[0]


def evaluate_bin(model: nn.Module, path: str, batch_size: int = 256, flip: bool = True, folds: int = 10,
                 far: float = 1e-3, device=None, progress: bool = False) -> dict:
    """Loads a .bin set safely, embeds its 2N images and runs the k-fold protocol (see verify_kfold)."""
    images, issame = load_bin(path)
    return evaluate_loaded(model, images, issame, set_name(path), batch_size, flip, folds, far, device, progress)


def evaluate_loaded(model: nn.Module, images, issame, name: str, batch_size: int = 256, flip: bool = True,
                    folds: int = 10, far: float = 1e-3, device=None, progress: bool = False) -> dict:
    """``evaluate_bin`` on a set already decoded by ``load_bin`` (to score several models on one decode)."""
    emb1, emb2 = embed_pairs(model, images, batch_size=batch_size, flip=flip, device=device, progress=progress,
                             desc=name)
    result = verify_kfold(emb1, emb2, issame, folds=folds, far=far)
    result["name"] = name
    log.info("%s: accuracy %.4f +- %.4f (threshold %.3f), VAL@FAR=%g %.4f", result["name"], result["accuracy"],
             result["accuracy_std"], result["threshold"], far, result["val"])
    return result


def pair_scores(model: nn.Module | None, path: str, batch_size: int = 256, flip: bool = True, device=None,
                progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Scores (N,) float64 and issame (N,) bool of a pair list; each distinct image is embedded once."""
    if path.endswith(".npz"):
        data = read_pair_npz(path)
        if "scores" in data:
            return np.asarray(data["scores"], dtype=np.float64), data["issame"].astype(bool)
        emb1, emb2 = as_numpy_2d(data["emb1"], "emb1"), as_numpy_2d(data["emb2"], "emb2")
        return cosine_scores(emb1, emb2), data["issame"].astype(bool)
    if model is None:
        raise ValueError(f"pair list {path!r} holds image paths: pass --checkpoint so they can be embedded")
    p1, p2, issame = read_pair_list(path)
    unique = sorted(set(p1) | set(p2))
    row = {p: i for i, p in enumerate(unique)}
    emb = extract_embeddings(model, FileImages(unique), batch_size=batch_size, flip=flip, device=device,
                             progress=progress, desc=set_name(path))  # (U, D)
    a, b = emb[[row[p] for p in p1]], emb[[row[p] for p in p2]]
    return np.einsum("nd,nd->n", a.astype(np.float64), b.astype(np.float64)), issame


def evaluate_pairs(model: nn.Module | None, path: str, fars=DEFAULT_FARS, interpolation: str = "linear",
                   **kwargs) -> dict:
    """ROC metrics of a pair list (roc_metrics) plus the ROC vertices under "curve" for plotting."""
    scores, issame = pair_scores(model, path, **kwargs)
    result = roc_metrics(scores, issame, fars=fars, interpolation=interpolation)
    far, tar, _ = roc_curve(scores, issame)
    result.update(name=set_name(path), num_pairs=int(len(scores)), curve=(far, tar))
    log.info("%s: AUC %.4f, EER %.4f on %d pairs", result["name"], result["auc"], result["eer"], len(scores))
    return result


def evaluate_all(model: nn.Module | None, eval_cfg, device=None, far: float = 1e-3, progress: bool = False,
                 interpolation: str = "linear") -> dict:
    """Runs every .bin set and pair list named by an EvalConfig (bins, pairs, flip, batch_size, folds, fars).

    Returns {"bins": [evaluate_bin results], "pairs": [evaluate_pairs results]}.
    """
    common = dict(batch_size=eval_cfg.batch_size, flip=eval_cfg.flip, device=device, progress=progress)
    bins = [evaluate_bin(model, path, folds=eval_cfg.folds, far=far, **common) for path in eval_cfg.bins]
    pairs = [evaluate_pairs(model, path, fars=eval_cfg.fars, interpolation=interpolation, **common)
             for path in eval_cfg.pairs]
    return {"bins": bins, "pairs": pairs}


def flat_metrics(results: dict) -> dict[str, float]:
    """{"lfw/accuracy", "lfw/accuracy_std", "lfw/threshold", "lfw/val_at_far", "<list>/tar@1e-04", "<list>/auc",
    "<list>/eer"} for logs. ``val_at_far`` is a .bin set's VAL at the FAR it was run at (1e-3 in training),
    spelled out so that a set named "val" logs ``val/val_at_far``, not ``val/val``."""
    out = {}
    for r in results.get("bins", []):
        for key in ("accuracy", "accuracy_std", "threshold"):
            out[f"{r['name']}/{key}"] = float(r[key])
        out[f"{r['name']}/val_at_far"] = float(r["val"])
    for r in results.get("pairs", []):
        for key, row in r["tar_at_far"].items():
            out[f"{r['name']}/tar@{key}"] = float(row["tar"])
        out[f"{r['name']}/auc"], out[f"{r['name']}/eer"] = float(r["auc"]), float(r["eer"])
    return out
