"""Dataset manifests: the JSON every converter writes next to its shards.

A manifest says how many classes, samples and shards a shard set holds, each shard's
sample count, size and sha256, and what a sample holds: an image (``sample_kind="images"``,
with the image size when all agree) or a fixed-size feature vector (``"vectors"``, with
``vector_dim`` and ``vector_dtype``, see ``dsoft_dist.data.vectors``). The loader uses the per-shard
counts to give every rank the same number of samples (and so the same number of
steps); the trainer reads ``num_classes`` from it and refuses a config that disagrees.

    python -c "from dsoft_dist.data.manifest import load_manifest; print(load_manifest('out/manifest.json').num_samples)"
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field

MANIFEST_NAME = "manifest.json"
FORMAT = "dsoft-wds"
VERSION = 1
SAMPLE_KINDS = ("images", "vectors")


class ManifestError(ValueError):
    """A manifest is missing, malformed or disagrees with the config or the shards."""


@dataclass
class ShardInfo:
    """One shard: path relative to the manifest's folder, samples, bytes, sha256 hex."""

    name: str
    samples: int
    bytes: int = 0
    sha256: str = ""


@dataclass
class Manifest:
    """A shard set. ``image_size`` is [H, W] (0s when mixed/unknown, or vectors); ``root`` is not saved.

    sample_kind: "images" (KEY.jpg|png|webp + KEY.cls) or "vectors" (KEY.f16|f32|npy + KEY.cls,
    each vector ``vector_dim`` values stored as ``vector_dtype``).
    """

    num_classes: int
    shards: list[ShardInfo]
    image_size: list[int] = field(default_factory=lambda: [0, 0])
    source: dict = field(default_factory=dict)
    bad_samples: int = 0
    sample_kind: str = "images"
    vector_dim: int = 0
    vector_dtype: str = ""
    root: str = ""

    def __post_init__(self):
        if self.sample_kind not in SAMPLE_KINDS:
            raise ManifestError(f"manifest sample_kind={self.sample_kind!r} is unknown: expected one of "
                                f"{', '.join(SAMPLE_KINDS)}")
        if self.sample_kind == "vectors" and not (self.vector_dim > 0 and self.vector_dtype):
            raise ManifestError(f"a vector manifest needs vector_dim > 0 and vector_dtype (got {self.vector_dim}, "
                                f"{self.vector_dtype!r}): regenerate it with the converter")

    @property
    def num_samples(self) -> int:
        return sum(s.samples for s in self.shards)

    def shard_paths(self) -> list[str]:
        """Absolute (or root-relative) shard paths in manifest order."""
        return [os.path.join(self.root, s.name) for s in self.shards]

    def shard_counts(self) -> list[int]:
        return [s.samples for s in self.shards]

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("root")
        d.update(format=FORMAT, version=VERSION, num_samples=self.num_samples, num_shards=len(self.shards))
        return d


def sha256_file(path: str, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def shard_info(path: str, samples: int, root: str) -> ShardInfo:
    """Describes a finished shard file (size + checksum)."""
    return ShardInfo(name=os.path.relpath(path, root), samples=int(samples),
                     bytes=os.path.getsize(path), sha256=sha256_file(path))


def write_manifest(manifest: Manifest, folder: str) -> str:
    """Writes ``folder/manifest.json`` atomically; returns its path."""
    path = os.path.join(folder, MANIFEST_NAME)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(manifest.to_dict(), f, indent=1)
    os.replace(tmp, path)
    return path


def load_manifest(path: str) -> Manifest:
    """Reads a manifest from a JSON path or a folder holding ``manifest.json``."""
    if os.path.isdir(path):
        path = os.path.join(path, MANIFEST_NAME)
    if not os.path.exists(path):
        raise ManifestError(f"manifest {path!r} does not exist: run a `dsoft data` converter first "
                            "or point data.manifest at its manifest.json")
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
        if d.get("format") != FORMAT:
            raise ManifestError(f"manifest {path!r} has format={d.get('format')!r}, expected {FORMAT!r}")
        shards = [ShardInfo(**s) for s in d["shards"]]
        return Manifest(num_classes=int(d["num_classes"]), shards=shards, image_size=list(d.get("image_size", [0, 0])),
                        source=d.get("source", {}), bad_samples=int(d.get("bad_samples", 0)),
                        sample_kind=d.get("sample_kind", "images"), vector_dim=int(d.get("vector_dim", 0)),
                        vector_dtype=d.get("vector_dtype", ""), root=os.path.dirname(os.path.abspath(path)))
    except ManifestError:
        raise
    except (KeyError, TypeError, AttributeError, ValueError) as exc:  # JSONDecodeError is a ValueError
        raise ManifestError(f"manifest {path!r} is malformed ({exc}): regenerate it with the converter") from exc


def check_num_classes(manifest: Manifest, num_classes: int) -> None:
    """Raises ManifestError when the config's class count disagrees with the manifest."""
    if num_classes != manifest.num_classes:
        raise ManifestError(f"data.num_classes={num_classes} disagrees with the manifest in {manifest.root!r} "
                            f"({manifest.num_classes} classes): set data.num_classes={manifest.num_classes}")


def verify_shards(manifest: Manifest, checksums: bool = True) -> list[str]:
    """Returns a list of problems (missing shard, size or checksum mismatch); empty = OK."""
    problems = []
    for info, path in zip(manifest.shards, manifest.shard_paths()):
        if not os.path.exists(path):
            problems.append(f"{info.name}: missing")
        elif info.bytes and os.path.getsize(path) != info.bytes:
            problems.append(f"{info.name}: {os.path.getsize(path)} bytes, manifest says {info.bytes}")
        elif checksums and info.sha256 and sha256_file(path) != info.sha256:
            problems.append(f"{info.name}: sha256 mismatch (file changed or truncated)")
    return problems
