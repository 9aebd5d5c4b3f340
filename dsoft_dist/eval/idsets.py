"""Probe, gallery and distractor sets for ``dsoft eval --identify``, and the identification run over them.

A set is given as one of:

- an image folder ``ROOT/<identity>/<image>`` (probes, gallery: the identity is the folder name);
  for distractors, every image at any depth under ROOT (folder names are ignored);
- a shard set ``dsoft data`` wrote (a folder with manifest.json or .tar files, a brace pattern,
  a list file): the identity is the label, or its name in the folder's ``classes.tsv`` (written
  by ``dsoft data from-folder``) so a converted folder still matches by name;
- ``.npz`` (loaded with ``allow_pickle=False``) holding ``embeddings`` (N, D) float and
  ``ids`` (N,) int or str; distractors need only ``embeddings``, and may also be a ``.npy``
  (N, D), memory-mapped so millions of rows are read chunk by chunk.

Probes and gallery are matched by identity *name* (ids as strings), so an .npz probe set whose
ids are the gallery's folder names works. Images are decoded and embedded by
``extract_embeddings`` (batch by batch); scores are computed by ``identification_ranks``
(chunked, never a full probe x candidate matrix).

    res = evaluate_identification(model, "probes/", "gallery/", "distractors/", ks=(1, 5, 10))
    res["rank"]  # {"1": 0.93, "5": 0.97, "10": 0.98}
"""
from __future__ import annotations

import os
import sys
from functools import partial

import numpy as np

from dsoft_dist.eval.arrays import as_numpy_2d, load_npz
from dsoft_dist.eval.extract import extract_embeddings
from dsoft_dist.eval.identification import _faiss, identification_ranks
from dsoft_dist.observability import get_logger

log = get_logger(__name__)
EMBEDDING_SUFFIXES = (".npz", ".npy")
SET_HELP = ("give an image folder ROOT/<identity>/<image>, a shard folder with manifest.json, "
            "or a .npz holding 'embeddings' (N, D) and 'ids' (N,)")


class RefImages:
    """A lazy sequence over (name, read) image references: ``[i]`` / ``[a:b]`` return the encoded bytes."""

    def __init__(self, refs):
        self.refs = list(refs)

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [read() for _, read in self.refs[index]]
        return self.refs[index][1]()


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def check_exists(path: str, role: str) -> None:
    """FileNotFoundError naming the set when ``path`` is neither an existing file/folder nor a shard pattern."""
    pattern = "{" in path or "::" in path or path.startswith("pipe:")
    if not pattern and not os.path.exists(path):
        raise FileNotFoundError(f"{role} {path!r} does not exist: {SET_HELP}")


def _is_shard_set(path: str) -> bool:
    """A shard spec rather than an image folder: a folder with a manifest or .tar files, a pattern, a file."""
    from dsoft_dist.data.manifest import MANIFEST_NAME  # noqa: PLC0415

    if os.path.isdir(path):
        return os.path.exists(os.path.join(path, MANIFEST_NAME)) or any(f.endswith(".tar") for f in os.listdir(path))
    return os.path.isfile(path) or "{" in path or "::" in path or path.startswith("pipe:")


def _class_names(spec: str) -> dict[int, str]:
    """{label: name} from ``classes.tsv`` beside a shard set's manifest ({} when there is none)."""
    path = os.path.join(spec, "classes.tsv") if os.path.isdir(spec) else ""
    if not path or not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        rows = [line.rstrip("\n").split("\t", 1) for line in f if line.strip()]
    return {int(label): name for label, name in rows}


def _shard_refs(spec: str) -> tuple[list, list[str]]:
    """Every image of a shard set with its identity name (collect_shards names images '<label>_<key>.<ext>')."""
    from dsoft_dist.data.verification import collect_shards  # noqa: PLC0415

    groups = collect_shards(spec, max_per_identity=sys.maxsize, max_identities=sys.maxsize)
    names = _class_names(spec)
    refs = [ref for group in groups for ref in group]
    labels = [int(name.split("_", 1)[0]) for name, _ in refs]
    return refs, [names.get(label, str(label)) for label in labels]


def _folder_refs(root: str) -> tuple[list, list[str]]:
    """Every image of ROOT/<identity>/<image> with its identity (the folder name)."""
    from dsoft_dist.data.verification import collect_folder  # noqa: PLC0415

    refs = [ref for group in collect_folder(root) for ref in group]
    return refs, [os.path.basename(os.path.dirname(path)) for path, _ in refs]


def _distractor_refs(root: str) -> list:
    """Every image at any depth under root, in sorted path order."""
    from dsoft_dist.data.convert import IMAGE_SUFFIXES  # noqa: PLC0415

    paths = []
    for folder, dirs, files in os.walk(root):
        dirs.sort()  # walk in sorted order: the same set always gives the same rows
        paths += [os.path.join(folder, f) for f in sorted(files) if f.lower().endswith(IMAGE_SUFFIXES)]
    if not paths:
        raise ValueError(f"distractor folder {root!r} holds no .jpg/.jpeg/.png/.webp images at any depth")
    return [(p, partial(_read, p)) for p in paths]


def read_embeddings(path: str, role: str) -> tuple[np.ndarray, np.ndarray | None]:
    """A precomputed set: (embeddings (N, D) float, names (N,) str or None for distractors)."""
    if path.endswith(".npy"):
        if role != "distractors":
            raise ValueError(f"{role} {path!r} is a .npy (embeddings only): {role} need ids; save "
                             "np.savez(path, embeddings=..., ids=...) instead")
        emb = load_npz(path, role, mmap_mode="r")  # chunked reads later: no full copy here
        if emb.ndim != 2 or not np.issubdtype(emb.dtype, np.floating):
            raise ValueError(f"{path}: expected a float (N, D) array, got dtype {emb.dtype} shape {emb.shape}")
        return emb, None
    with load_npz(path, role) as data:
        need = ("embeddings",) if role == "distractors" else ("embeddings", "ids")
        if not set(need) <= set(data.files):
            raise ValueError(f"{path}: holds {sorted(data.files)}; {role} need {' + '.join(repr(k) for k in need)}")
        emb = as_numpy_2d(data["embeddings"], f"{path}: embeddings")
        if role == "distractors":
            return emb, None
        ids = np.asarray(data["ids"]).reshape(-1)
    if ids.shape[0] != emb.shape[0] or ids.dtype.kind not in "iuUS":
        raise ValueError(f"{path}: 'ids' must be {emb.shape[0]} integers or strings (one per embedding row), "
                         f"got dtype {ids.dtype} shape {ids.shape}")
    return emb, ids.astype(str)


def image_refs(path: str, role: str) -> tuple[list, list[str] | None]:
    """(image references, identity names or None for distractors) of an image folder or a shard set."""
    check_exists(path, role)
    if _is_shard_set(path):
        refs, names = _shard_refs(path)
    elif role == "distractors":
        refs, names = _distractor_refs(path), None
    else:
        refs, names = _folder_refs(path)
    if not refs:
        raise ValueError(f"{role} {path!r} holds no images: {SET_HELP}")
    return refs, (None if role == "distractors" else names)


def load_set(model, path: str, role: str, **embed_kw) -> tuple[np.ndarray, np.ndarray | None]:
    """(embeddings (N, D), names (N,) str or None): read from .npz/.npy, or images embedded with ``model``.

    role: "probes", "gallery" or "distractors". embed_kw go to extract_embeddings (batch_size, flip, ...).
    """
    if path.endswith(EMBEDDING_SUFFIXES):
        check_exists(path, role)
        return read_embeddings(path, role)
    refs, names = image_refs(path, role)
    if model is None:
        raise ValueError(f"{role} {path!r} holds images: pass --checkpoint so they can be embedded, "
                         "or give a .npz of embeddings + ids")
    emb = extract_embeddings(model, RefImages(refs), desc=role, **embed_kw)  # (N, D) float32, unit rows
    return emb, None if names is None else np.asarray(names, dtype=str)


def match_ids(probe_names: np.ndarray, gallery_names: np.ndarray, probes: str, gallery: str):
    """Identity names -> int ids shared by probes and gallery: (probe_ids (P,), gallery_ids (G,)) int64.

    Raises ValueError naming an example when a probe identity has no gallery image (closed set).
    """
    vocab, inverse = np.unique(np.concatenate([probe_names, gallery_names]), return_inverse=True)
    pid, gid = inverse[:len(probe_names)].astype(np.int64), inverse[len(probe_names):].astype(np.int64)
    missing = ~np.isin(pid, gid)
    if missing.any():
        raise ValueError(f"{int(missing.sum())} of {len(pid)} probes in {probes!r} have an identity with no image "
                         f"in the gallery {gallery!r} (e.g. {str(vocab[pid[missing][0]])!r}): identities are "
                         "matched by name; add their gallery images or drop those probes")
    return pid, gid


def _set_name(path: str) -> str:
    """'data/probes/' -> 'probes', 'emb/gallery.npz' -> 'gallery'."""
    return os.path.splitext(os.path.basename(os.path.normpath(path)))[0]


def evaluate_identification(model, probes: str, gallery: str, distractors: str | None = None,
                            ks=(1, 5, 10), backend: str = "auto", chunk_size: int = 4096, **embed_kw) -> dict:
    """Rank-k identification rates of probes against gallery + distractors (see identification.py).

    Returns {"name", "probes", "gallery", "distractors", "num_probes", "num_gallery", "num_distractors",
    "backend", "rank": {"k": rate in [0, 1]}}. ks: the k values (each >= 1).
    """
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise ValueError(f"--rank-k {ks} is invalid: give one or more k >= 1, e.g. --rank-k 1 5 10")
    p_emb, p_names = load_set(model, probes, "probes", **embed_kw)
    g_emb, g_names = load_set(model, gallery, "gallery", **embed_kw)
    d_emb = load_set(model, distractors, "distractors", **embed_kw)[0] if distractors else None
    pid, gid = match_ids(p_names, g_names, probes, gallery)
    ranks = identification_ranks(p_emb, pid, g_emb, gid, d_emb, max_k=ks[-1], chunk_size=chunk_size,
                                 backend=backend)  # (P,) capped at max k + 1
    n_d = 0 if d_emb is None else int(len(d_emb))
    used = "faiss" if n_d and (backend == "faiss" or (backend == "auto" and _faiss() is not None)) else "torch"
    result = {"name": f"{_set_name(probes)} vs {_set_name(gallery)}", "probes": probes, "gallery": gallery,
              "distractors": distractors, "num_probes": int(len(pid)), "num_gallery": int(len(gid)),
              "num_distractors": n_d, "backend": used, "rank": {str(k): float(np.mean(ranks <= k)) for k in ks}}
    log.info("%s: %s with %d distractors", result["name"],
             ", ".join(f"rank-{k} {v:.4f}" for k, v in result["rank"].items()), n_d)
    return result
