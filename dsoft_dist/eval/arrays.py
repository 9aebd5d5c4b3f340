"""Small array helpers for the evaluation modules: .npz loading, tensors to numpy, scores, cosine, L2 norm."""
from __future__ import annotations

import zipfile

import numpy as np
import torch


def load_npz(path: str, what: str, mmap_mode: str | None = None):
    """``np.load(path, allow_pickle=False)``: an NpzFile for .npz, an array for .npy (memory-mapped with mmap_mode).

    A file that is no .npz/.npy (or a truncated one) raises ValueError naming ``what`` and the path;
    a missing file keeps numpy's FileNotFoundError (which names it).
    """
    try:
        data = np.load(path, mmap_mode=mmap_mode, allow_pickle=False)
    except (ValueError, EOFError, zipfile.BadZipFile) as err:
        raise ValueError(f"{what} {path!r} is not a readable numpy file ({type(err).__name__}: {err}); "
                         "write it with np.savez / np.save") from err
    is_npz = isinstance(data, np.lib.npyio.NpzFile)
    if is_npz != path.endswith(".npz"):
        if is_npz:
            data.close()
        raise ValueError(f"{what} {path!r} holds {'an .npz archive' if is_npz else 'one .npy array'}, which its "
                         "name does not say: name .npz files (np.savez) *.npz and .npy files (np.save) *.npy")
    return data


def as_numpy_2d(x, name: str) -> np.ndarray:
    """(N, D) float array or tensor -> float32 numpy (N, D); raises ValueError naming `name` otherwise."""
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float32).numpy()
    x = np.asarray(x)
    if x.ndim != 2 or not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"{name} must be a float (N, D) array or tensor, got dtype {x.dtype} shape {x.shape}")
    return x.astype(np.float32, copy=False)


def l2_normalize(x: np.ndarray, name: str = "embeddings") -> np.ndarray:
    """Row-wise x / |x|; raises ValueError on zero or non-finite rows (they have no direction)."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    bad = ~np.isfinite(norms[:, 0]) | (norms[:, 0] == 0)
    if bad.any():
        raise ValueError(f"{name}: {int(bad.sum())} rows are zero or non-finite (first at {int(np.argmax(bad))}); "
                         "check the model output")
    return x / norms


def cosine_scores(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of (N, D) and (N, D) -> (N,) float64."""
    a = l2_normalize(a.astype(np.float64), "emb1")
    b = l2_normalize(b.astype(np.float64), "emb2")
    return np.einsum("nd,nd->n", a, b)


def scores_and_labels(scores, labels, labels_name: str = "is_same") -> tuple[np.ndarray, np.ndarray]:
    """Flattens scores (N,) to float64 and labels (N,) to bool; raises ValueError on a length mismatch or NaN/inf."""
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    y = np.asarray(labels).reshape(-1)
    if s.shape != y.shape:
        raise ValueError(f"scores ({s.size}) and {labels_name} ({y.size}) must have the same length")
    if not np.isfinite(s).all():
        raise ValueError("scores contain NaN/inf: check the embeddings that produced them (a zero or NaN embedding?)")
    return s, y.astype(bool)
