"""Helpers for the data tests: tiny real WebDataset shards written with webdataset.TarWriter.

No tests live here; the test_data_* modules import these functions.
"""
from __future__ import annotations

import io
import os

import numpy as np
import webdataset as wds
from PIL import Image

from dsoft_dist.data.manifest import Manifest, shard_info, write_manifest


def jpeg_bytes(value: int, size: int = 8) -> bytes:
    """A small real JPEG whose pixels depend on value."""
    rng = np.random.default_rng(value)
    img = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_shards(folder: str, counts: list[int], size: int = 8, num_classes: int | None = None,
                 manifest: bool = True, overrides: dict | None = None) -> list[str]:
    """Writes len(counts) shards; sample n (global, in shard order) has label n and a unique JPEG.

    overrides maps a global sample number to a dict of entries replacing/adding/removing
    (value None) the sample's entries, to plant bad data. Returns the shard paths.
    """
    os.makedirs(folder, exist_ok=True)
    overrides = overrides or {}
    paths, n = [], 0
    for s, count in enumerate(counts):
        path = os.path.join(folder, f"shard-{s:04d}.tar")
        with wds.TarWriter(path) as sink:
            for _ in range(count):
                sample = {"__key__": f"s{n:06d}", "jpg": jpeg_bytes(n, size), "cls": n}
                for key, value in overrides.get(n, {}).items():
                    if value is None:
                        sample.pop(key, None)
                    else:
                        sample[key] = value
                sink.write(sample)
                n += 1
        paths.append(path)
    if manifest:
        infos = [shard_info(p, c, folder) for p, c in zip(paths, counts)]
        write_manifest(Manifest(num_classes=num_classes or n, shards=infos, image_size=[size, size]), folder)
    return paths
