"""Batched embedding extraction for any backbone: decode -> normalize -> forward (+ flip) -> L2-normalize.

Inputs are decoded one batch at a time and written into a preallocated float32 output
(pass ``out=np.memmap(...)`` for millions of images), so memory stays O(batch).

    from dsoft_dist.eval import extract_embeddings
    emb = extract_embeddings(model, bins, batch_size=256, flip=True)  # (N, D) float32, unit rows

Flip augmentation: embedding = normalize(f(x) + f(mirror(x))), mirror = flip along width.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import nn

from dsoft_dist.eval.binfile import decode_image
from dsoft_dist.observability.progress import progress_bar


def images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (B, H, W, 3) RGB -> float32 (B, 3, H, W) in [-1, 1] ((x / 255 - 0.5) / 0.5)."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
    return x.div_(127.5).sub_(1.0)


def _batch(images, start: int, stop: int, input_size: int) -> torch.Tensor:
    """Rows [start, stop) of any supported input as a float32 model input tensor."""
    if isinstance(images, torch.Tensor):
        return images[start:stop].float()
    if isinstance(images, np.ndarray):
        if np.issubdtype(images.dtype, np.floating):  # already normalized (N, 3, H, W) or (N, F)
            return torch.from_numpy(np.asarray(images[start:stop], dtype=np.float32))
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"image array must be uint8 (N, H, W, 3) RGB or float, got {images.dtype} "
                             f"{images.shape}: convert it first")
        chunk = images[start:stop]
        if chunk.shape[1:3] != (input_size, input_size):
            chunk = np.stack([decode_image(im, input_size) for im in chunk])
        return images_to_tensor(chunk)
    items = images[start:stop]
    if isinstance(items, np.ndarray):  # a lazy sequence whose slices are uint8 (B, H, W, 3) images (IJB crops)
        return images_to_tensor(items)
    return images_to_tensor(np.stack([decode_image(item, input_size) for item in items]))


def model_input_size(model: nn.Module) -> int:
    """The square image side ``model`` takes (its ``input_size``; 112 when it has none), through DDP wrappers."""
    inner = getattr(model, "module", model)
    return int(getattr(inner, "input_size", 112))


@torch.inference_mode()
def extract_embeddings(model: nn.Module, images, batch_size: int = 256, flip: bool = False, device=None,
                       progress: bool = False, out: np.ndarray | None = None, desc: str = "embeddings",
                       normalize: bool = True) -> np.ndarray:
    """Embeds N inputs with `model` in eval mode. Returns float32 (N, D) rows, L2-normalized unless normalize
    is False (then the raw f(x), or f(x) + f(mirror(x)) with flip).

    images: a sequence of encoded images (bytes, e.g. from load_bin), a uint8 (N, H, W, 3) array
    (resized to the model's input_size when needed), a float (N, 3, H, W) tensor/array already
    normalized to [-1, 1], (N, in_features) float vectors for ``mlp``, or a sequence whose slices are
    uint8 (B, H, W, 3) arrays at the model's input size (images made on demand). device: defaults to the
    model's device. out: optional preallocated (N, D) float32 array or memmap to fill. progress: a bar
    on stderr when it is a terminal (never in redirected output; observability.progress).
    The model's train/eval mode is restored.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} is invalid: must be >= 1")
    n = len(images)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    size, was_training = model_input_size(model), model.training
    bar = progress_bar(total=n, desc=desc, unit="img", enabled=progress, leave=False)  # drawn on a terminal only
    model.eval()
    try:
        for start in range(0, n, batch_size):
            x = _batch(images, start, min(n, start + batch_size), size).to(device)  # (B, 3, H, W)
            if flip and x.dim() != 4:
                raise ValueError(f"flip=True needs image inputs (B, 3, H, W), got {tuple(x.shape)}: use flip=False")
            emb = model(x)  # (B, D)
            if flip:
                emb = emb + model(torch.flip(x, dims=[3]))
            emb = (torch.nn.functional.normalize(emb.float(), dim=1) if normalize else emb.float()).cpu().numpy()
            if out is None:
                out = np.empty((n, emb.shape[1]), dtype=np.float32)
            if out.shape != (n, emb.shape[1]):
                raise ValueError(f"out has shape {out.shape}, expected {(n, emb.shape[1])}")
            out[start:start + len(emb)] = emb
            bar.update(len(emb))
    finally:
        bar.close()
        model.train(was_training)
    if out is None:
        raise ValueError("extract_embeddings got no inputs: pass at least one image")
    return out


def embed_pairs(model: nn.Module, images: Sequence, **kwargs) -> tuple[np.ndarray, np.ndarray]:
    """Embeds 2N images laid out as pairs (2i, 2i+1) -> (emb1 (N, D), emb2 (N, D))."""
    emb = extract_embeddings(model, images, **kwargs)
    return emb[0::2], emb[1::2]
