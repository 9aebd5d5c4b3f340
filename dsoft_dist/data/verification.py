"""Verification sets: InsightFace-style .bin files and pair lists for TAR@FAR.

- ``.bin`` (what InsightFace ships for LFW, CFP-FP, AgeDB-30...):
  ``pickle.dump((bins, issame_list), f, protocol=4)`` where ``bins`` holds 2N encoded
  images (bytes; pair i is bins[2i], bins[2i+1]) and ``issame_list`` N bools.
- pair list (text, for large TAR@FAR evaluation): a ``#`` header line, then one
  ``path_a<TAB>path_b<TAB>0|1`` line per pair, paths relative to the list's folder.
  Images from shards or the synthetic source are written beside it under
  ``<list name>_images/``; folder images are referenced where they are.

Sources: an image folder (ROOT/<identity>/<image>), a shard set (manifest folder or
shard spec) or the synthetic *evaluation* identities (global ids from
EVAL_IDENTITY_OFFSET, never seen in training). Half the pairs are positive.

    dsoft data make-bin --synthetic 200 --image-size 112 --pairs 3000 out/synth_eval.bin
    dsoft data make-bin --folder /data/lfw_aligned --pairs 6000 out/lfw.bin
    dsoft data make-bin --shards /data/val-wds --pairs 100000 --pair-list out/val_pairs.txt
"""
from __future__ import annotations

import os
import pickle
from functools import partial
from typing import Callable

import numpy as np

from dsoft_dist.data.convert import encode_image, scan_folder
from dsoft_dist.data.decode import image_format
from dsoft_dist.data.shards import BadData, check_local_shards, expand_shards, iter_tar_samples
from dsoft_dist.data.synthetic import EVAL_IDENTITY_OFFSET, SyntheticIdentities
from dsoft_dist.observability import get_logger

log = get_logger(__name__)
PAIR_LIST_HEADER = "# dsoft pair list v1: path_a<TAB>path_b<TAB>is_same (paths relative to this file)\n"

ImageRef = tuple[str, Callable[[], bytes]]  # (name, function returning the encoded image)


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def collect_folder(root: str) -> list[list[ImageRef]]:
    """Groups of images per identity folder; names are the file paths."""
    classes, items = scan_folder(root)
    groups: list[list[ImageRef]] = [[] for _ in classes]
    for path, label in items:
        groups[label].append((path, partial(_read, path)))
    return groups


def collect_shards(spec: str, max_per_identity: int = 10, max_identities: int = 100_000) -> list[list[ImageRef]]:
    """Groups by label from a shard set (bounded: at most max_per_identity images each)."""
    by_label: dict[int, list[ImageRef]] = {}
    bad = BadData("skip")
    urls = expand_shards(spec)
    check_local_shards(urls, f"shards {spec!r}")
    for url in urls:
        for sample in iter_tar_samples(url, bad):
            ext = next((e for e in ("jpg", "jpeg", "png", "webp") if e in sample), None)
            if ext is None or "cls" not in sample:
                continue
            label = int(sample["cls"])
            group = by_label.setdefault(label, []) if (label in by_label or len(by_label) < max_identities) else None
            if group is not None and len(group) < max_per_identity:
                data = sample[ext]
                group.append((f"{label}_{sample['__key__'].replace('/', '_')}.{ext}", lambda data=data: data))
    return [by_label[k] for k in sorted(by_label)]


def collect_synthetic(num_identities: int, per_identity: int = 10, image_size: int = 112, seed: int = 0,
                      difficulty: str = "medium", fmt: str = "jpg") -> list[list[ImageRef]]:
    """Unseen synthetic identities (global ids from EVAL_IDENTITY_OFFSET), rendered lazily."""
    src = SyntheticIdentities(num_identities, image_size=image_size, seed=seed,
                              identity_offset=EVAL_IDENTITY_OFFSET, difficulty=difficulty)

    def render(i: int, j: int) -> bytes:
        return encode_image(src.sample(i, j), fmt)

    return [[(f"{i:07d}_{j:03d}.{fmt}", partial(render, i, j)) for j in range(per_identity)]
            for i in range(num_identities)]


def sample_pairs(groups: list[list[ImageRef]], num_pairs: int, seed: int = 0) -> list[tuple[ImageRef, ImageRef, bool]]:
    """num_pairs pairs, half positive (two images of one identity), half negative, shuffled."""
    multi = [g for g in groups if len(g) >= 2]
    nonempty = [g for g in groups if g]
    if num_pairs < 2 or not multi or len(nonempty) < 2:
        raise ValueError(f"cannot build {num_pairs} pairs from {len(groups)} identities ({len(multi)} with 2+ "
                         "images): need num_pairs >= 2, one identity with 2+ images and 2 identities with images")
    rng = np.random.default_rng(seed)
    pairs = []
    for k in range(num_pairs):
        if k % 2 == 0:
            g = multi[rng.integers(len(multi))]
            a, b = rng.choice(len(g), size=2, replace=False)
            pairs.append((g[a], g[b], True))
        else:
            ga, gb = rng.choice(len(nonempty), size=2, replace=False)
            ga, gb = nonempty[ga], nonempty[gb]
            pairs.append((ga[rng.integers(len(ga))], gb[rng.integers(len(gb))], False))
    return [pairs[i] for i in rng.permutation(len(pairs))]


def write_bin(path: str, pairs) -> None:
    """Writes the InsightFace .bin: pickle of (2N encoded images, N is-same bools), protocol 4."""
    bins, issame = [], []
    for (_, get_a), (_, get_b), same in pairs:
        bins += [get_a(), get_b()]
        issame.append(bool(same))
    for i, data in enumerate(bins):
        if not image_format(data):
            raise ValueError(f"image {i} of {path!r} is not jpg/png/webp (starts with {data[:8]!r})")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump((bins, issame), f, protocol=4)
    log.info("wrote %s: %d pairs (%d positive)", path, len(issame), sum(issame))


def write_pair_list(path: str, pairs, copy_images: bool) -> None:
    """Writes a pair list; copy_images writes each referenced image once under <stem>_images/."""
    folder = os.path.dirname(os.path.abspath(path))
    image_dir = os.path.splitext(os.path.abspath(path))[0] + "_images"
    written: dict[str, str] = {}

    def place(ref: ImageRef) -> str:
        name, get = ref
        if not copy_images:
            return os.path.relpath(os.path.abspath(name), folder)
        if name not in written:
            os.makedirs(image_dir, exist_ok=True)
            target = os.path.join(image_dir, name)
            with open(target, "wb") as f:
                f.write(get())
            written[name] = os.path.relpath(target, folder)
        return written[name]

    os.makedirs(folder, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(PAIR_LIST_HEADER)
        for a, b, same in pairs:
            f.write(f"{place(a)}\t{place(b)}\t{int(same)}\n")
    log.info("wrote %s: %d pairs, %d images copied", path, len(pairs), len(written))


def read_pair_list(path: str) -> list[tuple[str, str, bool]]:
    """Parses a pair list into [(abs path a, abs path b, is_same)]."""
    folder, out = os.path.dirname(os.path.abspath(path)), []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip() or line.startswith("#"):
                continue
            parts = line.rstrip("\n").split("\t")
            if len(parts) != 3 or parts[2] not in ("0", "1"):
                raise ValueError(f"{path}:{n}: expected 'path_a<TAB>path_b<TAB>0|1', got {line.strip()!r}")
            out.append((os.path.join(folder, parts[0]), os.path.join(folder, parts[1]), parts[2] == "1"))
    return out
