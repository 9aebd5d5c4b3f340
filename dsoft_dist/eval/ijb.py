"""IJB-B / IJB-C evaluation of a backbone: align each image by its five landmarks, embed (over all ranks),
pool per template, score the 1:1 pairs and, when the lists are there, the 1:N search.

    from dsoft_dist.eval.ijb import evaluate_ijb
    res = evaluate_ijb(model, "/data/IJB_release/IJBC", "IJBC", batch_size=128)
    res["tar_at_far"]["0.0001"], res["identification"]["rank"]["1"]      # fractions in [0, 1]

    dsoft eval --checkpoint ckpt/backbone.pt --ijb /data/IJB_release/IJBC --ijb-target IJBC --report out/
    dsoft eval --checkpoint ckpt/backbone.pt --ijb ROOT --nproc 4       # 4 local processes share the images
    torchrun --nproc-per-node 8 -m dsoft_dist.cli eval --checkpoint CKPT --ijb ROOT   # the launched ranks do

The protocol is arcface_torch's ``eval_ijbc.py`` and InsightFace's ``ijb_1n.py`` (docs/eval.md): the layout
is read and checked by ``ijb_meta``, the arithmetic is in ``ijb_protocol``. Each image is decoded
(``data.decode.decode_image``, RGB), aligned to the 112 x 112 template (``data.align.align_face``; a
model of another input_size gets the template scaled to it), normalized as every model input
(``extract.images_to_tensor``) and embedded WITHOUT normalizing the output; with flip its mirror
image's embedding is added. In a process group, rank r embeds the contiguous share
``parallel.shard_range(N, world, r)`` of the image list and rank 0 gathers the features (N x D
float32: ``ijb_features``) and computes every figure (``ijb_figures``); the other ranks return None.
"""
from __future__ import annotations

import os

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from dsoft_dist.data.align import align_face
from dsoft_dist.data.decode import decode_image
from dsoft_dist.eval.extract import extract_embeddings, model_input_size
from dsoft_dist.eval.ijb_meta import IJBLayout, load_layout
from dsoft_dist.eval.ijb_protocol import identification_figures, pair_scores, template_features, verification_figures
from dsoft_dist.eval.roc import DEFAULT_FARS
from dsoft_dist.observability import get_logger
from dsoft_dist.parallel import group_rank_size, shard_range, shard_ranges

log = get_logger(__name__)


def aligned_crop(layout: IJBLayout, index: int, size: int = 112) -> np.ndarray:
    """Image ``index`` of the layout, decoded and aligned: (size, size, 3) uint8 RGB.

    A file that cannot be read or decoded raises ValueError naming its landmark-file line and path.
    """
    path = os.path.join(layout.image_dir, layout.names[index])
    try:
        with open(path, "rb") as fh:
            image = decode_image(fh.read())
    except Exception as err:  # Pillow and simplejpeg raise many types for a corrupt file
        raise ValueError(f"{layout.where(index)}: image {path} cannot be decoded ({type(err).__name__}: {err}): "
                         "replace it with the release's file") from err
    return align_face(image, layout.landmarks[index], size)


class AlignedCrops:
    """Images [start, stop) of the layout as a sequence whose slices are uint8 (B, size, size, 3) aligned crops,
    made on demand (``extract_embeddings`` embeds it one batch at a time)."""

    def __init__(self, layout: IJBLayout, start: int, stop: int, size: int):
        self.layout, self.start, self.stop, self.size = layout, start, stop, size

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, rows: slice) -> np.ndarray:
        first, last, _ = rows.indices(len(self))
        return np.stack([aligned_crop(self.layout, self.start + i, self.size) for i in range(first, last)])


def embed_images(model: nn.Module, layout: IJBLayout, start: int, stop: int, batch_size: int = 128,
                 flip: bool = True, device=None, progress: bool = False) -> np.ndarray:
    """Raw image features of images [start, stop): (stop - start, D) float32, NOT normalized.

    feature = f(x) (+ f(mirror(x)) with flip), x the aligned crop in [-1, 1] (``extract_embeddings`` with
    normalize=False); a progress bar is drawn on a terminal when ``progress``.
    """
    if stop <= start:
        raise ValueError(f"no image in [{start}, {stop}): nothing to embed")
    crops = AlignedCrops(layout, start, stop, model_input_size(model))
    return extract_embeddings(model, crops, batch_size=batch_size, flip=flip, device=device, progress=progress,
                              desc=f"{layout.target} images", normalize=False)


def gather_to_main(local: np.ndarray, counts: list, device=None, group=None) -> np.ndarray | None:
    """Every rank's rows (counts[r], D) concatenated in rank order on rank 0: (sum(counts), D); None elsewhere.

    One ``dist.gather`` of equal-sized (padded) blocks, so only rank 0 ever holds all N x D features.
    ``device``: where the collective's tensors live (cuda for nccl, cpu for gloo).
    """
    rank, world = group_rank_size(group)
    if world == 1:
        return local
    block = torch.zeros((max(counts), local.shape[1]), dtype=torch.float32, device=device)
    block[:len(local)] = torch.from_numpy(local).to(block.device)
    parts = [torch.empty_like(block) for _ in range(world)] if rank == 0 else None
    dist.gather(block, parts, dst=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
    if rank != 0:
        return None
    return np.concatenate([p[:c].cpu().numpy() for p, c in zip(parts, counts)])


def ijb_figures(features: np.ndarray, layout: IJBLayout, use_score: bool = True, normalize: bool = False,
                fars=DEFAULT_FARS) -> dict:
    """Every figure of the protocol from the raw image features (N, D) of the layout's images, in list order.

    {"images", "templates" (distinct templates of face_tid_mid, all pooled), "pairs", "tar_at_far",
    "far_read", "auc", "same_pairs", "different_pairs", "curve", and "identification" with the 1:N lists}.
    """
    weights = layout.scores if use_score else None
    ids, tfeat = template_features(features, layout.templates, layout.medias, weights=weights,
                                   normalize_images=normalize)
    scores = pair_scores(ids, tfeat, layout.pair_t1, layout.pair_t2)
    result = {"images": len(layout.names), "templates": len(ids), "pairs": len(scores),
              **verification_figures(scores, layout.pair_labels, fars)}
    if layout.gallery is not None:
        result["identification"] = identification_figures(
            ids, tfeat, layout.gallery.templates, layout.gallery.subjects, layout.probes.templates,
            layout.probes.subjects)
    return result


def ijb_features(model: nn.Module, layout: IJBLayout, flip: bool = True, batch_size: int = 128, device=None,
                 progress: bool = False, group=None) -> np.ndarray | None:
    """Raw features (N, D) float32 of every image of the layout, in list order, on rank 0; None on other ranks.

    In a process group (``group``, or the default group when initialized) rank r embeds its contiguous
    share ``shard_range(N, world, r)`` and rank 0 gathers them; a collective: every rank calls it.
    """
    rank, world = group_rank_size(group)
    n = len(layout.names)
    if world > n:
        raise ValueError(f"{world} ranks for {n} images: use at most {n} processes")
    start, count = shard_range(n, world, rank)
    log.info("%s: rank %d embeds images %d..%d of %d", layout.target, rank, start, start + count - 1, n)
    local = embed_images(model, layout, start, start + count, batch_size=batch_size, flip=flip, device=device,
                         progress=progress)
    return gather_to_main(local, [c for _, c in shard_ranges(n, world)], device=device, group=group)


def evaluate_ijb(model: nn.Module | None, root: str, target: str = "IJBC", flip: bool = True, use_score: bool = True,
                 normalize: bool = False, fars=DEFAULT_FARS, batch_size: int = 128, device=None,
                 progress: bool = False, layout: IJBLayout | None = None, group=None,
                 features: np.ndarray | None = None) -> dict | None:
    """The whole evaluation of one release folder (see the module doc). Returns ijb_figures plus "options" on
    rank 0 (the only rank in a single process), None on the other ranks of a process group.

    flip: add the mirror image's embedding; use_score: weigh each image by its detector score;
    normalize: L2-normalize each image feature before weighting (the standard script's "norm" variant).
    layout: an already loaded ``load_layout(root, target)``; features: the images' raw features when they
    are already embedded (``ijb_features``, with the same flip), so the model is not run again.
    """
    layout = layout if layout is not None else load_layout(root, target)
    if features is None:
        features = ijb_features(model, layout, flip=flip, batch_size=batch_size, device=device, progress=progress,
                                group=group)
        if features is None:
            return None
    result = ijb_figures(features, layout, use_score=use_score, normalize=normalize, fars=fars)
    result["options"] = {"flip": bool(flip), "detector_score": bool(use_score), "normalize_images": bool(normalize)}
    log.info("%s 1:1: %d templates, %d pairs, TAR@FAR %s", layout.target, result["templates"], result["pairs"],
             ", ".join(f"{k}: {v:.4f}" for k, v in result["tar_at_far"].items()))
    return result
