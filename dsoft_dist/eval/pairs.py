"""Pair lists for 1:1 verification (TAR@FAR): image-path lists and precomputed .npz files.

Text format (``.txt``/``.csv``/anything else): one pair per line, ``path1 path2 label``
separated by tabs (as ``dsoft data make-bin`` writes; paths may then contain spaces), commas,
or whitespace; label 1 = same identity, 0 = different; lines starting with ``#`` are comments;
relative paths are relative to the list file's directory.

``.npz`` format (loaded with allow_pickle=False): either ``scores`` (N,) + ``issame`` (N,),
or ``emb1`` (N, D) + ``emb2`` (N, D) + ``issame`` (N,). No model is needed for these.

    p1, p2, issame = read_pair_list("pairs.txt")
"""
from __future__ import annotations

import os

import numpy as np

from dsoft_dist.eval.arrays import load_npz


class FileImages:
    """A lazy sequence of image files read as bytes (for extract_embeddings; O(batch) memory)."""

    def __init__(self, paths: list[str]):
        self.paths = list(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self._read(p) for p in self.paths[index]]
        return self._read(self.paths[index])

    @staticmethod
    def _read(path: str) -> bytes:
        try:
            with open(path, "rb") as f:
                return f.read()
        except OSError as exc:
            raise ValueError(f"pair list image {path!r} cannot be read ({exc}): fix the path in the pair list") from exc


def _split(line: str) -> list[str]:
    """Tabs first (as `dsoft data make-bin` writes; paths may hold spaces), else commas, else whitespace."""
    for sep in ("\t", ","):
        if sep in line:
            return [part.strip() for part in line.split(sep)]
    return line.split()


def read_pair_list(path: str) -> tuple[list[str], list[str], np.ndarray]:
    """Parses a text pair list -> (paths1, paths2, issame (N,) bool). Raises ValueError naming the bad line."""
    base = os.path.dirname(os.path.abspath(path))
    p1, p2, labels = [], [], []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            parts = _split(line)
            if len(parts) != 3 or parts[2] not in ("0", "1"):
                raise ValueError(f"{path}:{lineno}: expected 'path1 path2 label' with label 0 or 1, got {line!r}")
            p1.append(os.path.join(base, parts[0]))
            p2.append(os.path.join(base, parts[1]))
            labels.append(parts[2] == "1")
    if not labels:
        raise ValueError(f"{path}: no pairs found; write one 'path1 path2 label' per line")
    return p1, p2, np.asarray(labels, dtype=bool)


def read_pair_npz(path: str) -> dict:
    """Loads a precomputed pair file: {"scores", "issame"} or {"emb1", "emb2", "issame"} (no pickles)."""
    with load_npz(path, "pair file") as data:
        keys = set(data.files)
        if "issame" not in keys or not ({"scores"} <= keys or {"emb1", "emb2"} <= keys):
            raise ValueError(f"{path}: holds {sorted(keys)}; expected 'scores'+'issame' or 'emb1'+'emb2'+'issame'")
        return {k: data[k] for k in keys}
