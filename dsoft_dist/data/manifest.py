"""Dataset manifests: the JSON every converter writes next to its shards.

A manifest says how many classes, samples and shards a shard set holds, each shard's
sample count, size and sha256, and what a sample holds: an image (``sample_kind="images"``,
with the image size when all agree) or a fixed-size feature vector (``"vectors"``, with
``vector_dim`` and ``vector_dtype``, see ``dsoft_dist.data.vectors``). The loader uses the per-shard
counts to give every rank the same number of samples (and so the same number of
steps); the trainer reads ``num_classes`` from it and refuses a config that disagrees.

A conversion is identified by its *fingerprint*: the sha256 of its spec (the converter
version, the source and its listing digest, the options that change shard bytes). The
converter records it in ``.parts/conversion.json`` before the first shard, in every shard's
sidecar and in the manifest; a rerun resumes only an identical spec (``dsoft_dist.data.convert``).
``verify_shards`` and ``verify_folder`` (``dsoft data verify``) find damaged shards and mixed
conversions: labels outside ``[0, num_classes)``, a ``classes.tsv`` of another class count,
shards or records of another fingerprint.

    python -c "from dsoft_dist.data.manifest import load_manifest as m; print(m('out/manifest.json').num_samples)"
"""
from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import asdict, dataclass, field

from dsoft_dist.utils import flat_dict, sha256_file, write_text_atomic

MANIFEST_NAME = "manifest.json"
FORMAT = "dsoft-wds"
VERSION = 1
CONVERTER_VERSION = 1  # bump when the same source and options give other shard bytes
PARTS = ".parts"  # sidecars of finished shards + the conversion record
CONVERSION_NAME = "conversion.json"
CLASSES_NAME = "classes.tsv"
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
    fingerprint: str = ""
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


def shard_info(path: str, samples: int, root: str) -> ShardInfo:
    """Describes a finished shard file (size + checksum)."""
    return ShardInfo(name=os.path.relpath(path, root), samples=int(samples),
                     bytes=os.path.getsize(path), sha256=sha256_file(path))


def write_manifest(manifest: Manifest, folder: str) -> str:
    """Writes ``folder/manifest.json`` atomically; returns its path."""
    path = os.path.join(folder, MANIFEST_NAME)
    write_text_atomic(path, json.dumps(manifest.to_dict(), indent=1))
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
                        vector_dtype=d.get("vector_dtype", ""), fingerprint=d.get("fingerprint", ""),
                        root=os.path.dirname(os.path.abspath(path)))
    except ManifestError:
        raise
    except (KeyError, TypeError, AttributeError, ValueError) as exc:  # JSONDecodeError is a ValueError
        raise ManifestError(f"manifest {path!r} is malformed ({exc}): regenerate it with the converter") from exc


def check_num_classes(manifest: Manifest, num_classes: int) -> None:
    """Raises ManifestError when the config's class count disagrees with the manifest."""
    if num_classes != manifest.num_classes:
        raise ManifestError(f"data.num_classes={num_classes} disagrees with the manifest in {manifest.root!r} "
                            f"({manifest.num_classes} classes): set data.num_classes={manifest.num_classes}")


def fingerprint(spec: dict) -> str:
    """sha256 hex of a conversion spec (its canonical JSON): equal specs give equal shard bytes."""
    return hashlib.sha256(json.dumps(spec, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def read_conversion(folder: str) -> dict | None:
    """The conversion record of ``folder`` ({"fingerprint", "spec"}), None when there is none.

    An unreadable record reads as {"fingerprint": "", "spec": {}}: it matches no conversion.
    """
    path = os.path.join(folder, PARTS, CONVERSION_NAME)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
        return {"fingerprint": str(record["fingerprint"]), "spec": dict(record["spec"])}
    except (OSError, ValueError, KeyError, TypeError):
        return {"fingerprint": "", "spec": {}}


def write_conversion(folder: str, spec: dict) -> str:
    """Records ``spec`` as the conversion of ``folder`` (atomically); returns its fingerprint."""
    os.makedirs(os.path.join(folder, PARTS), exist_ok=True)
    path = os.path.join(folder, PARTS, CONVERSION_NAME)
    digest = fingerprint(spec)
    write_text_atomic(path, json.dumps({"fingerprint": digest, "spec": spec}, indent=1, sort_keys=True))
    return digest


def spec_differences(old: dict, new: dict, limit: int = 4) -> str:
    """What differs between two conversion specs, e.g. "source.listing, per_shard 1000 -> 500"."""
    a, b = flat_dict(old), flat_dict(new)
    diffs = []
    for key in sorted(set(a) | set(b), key=lambda k: (not k.startswith("source."), k)):  # the source first
        if a.get(key) != b.get(key):
            short = all(len(repr(v)) <= 40 for v in (a.get(key), b.get(key)))  # digests: the name only
            diffs.append(f"{key} {a.get(key)!r} -> {b.get(key)!r}" if short else key)
    more = f" and {len(diffs) - limit} more" if len(diffs) > limit else ""
    return ", ".join(diffs[:limit]) + more if diffs else "an unreadable conversion record"


class _Hashing(io.RawIOBase):
    """A raw reader that hashes every block it reads; wrapped in a large buffer it hashes at file speed."""

    def __init__(self, f):
        self.f, self.sha = f, hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = self.f.readinto(buffer)
        self.sha.update(memoryview(buffer)[:n])
        return n


def _scan(path: str, num_classes: int) -> tuple[str, int | None, str]:
    """One pass over a shard: (sha256 hex, samples (None: not a readable tar), "" or what is wrong)."""
    from dsoft_dist.data.tarstream import iter_members  # a leaf module; imported here to keep start-up light

    keys, outside, first, broken = 0, 0, "", ""
    with open(path, "rb", buffering=0) as f:
        raw, last = _Hashing(f), None
        stream = io.BufferedReader(raw, 1 << 20)
        try:
            for name, data in iter_members(stream):
                dot = name.find(".", name.rfind("/") + 1)  # webdataset: the key ends at the basename's first dot
                key, ext = (name, "") if dot < 0 else (name[:dot], name[dot + 1:])
                keys, last = keys + (key != last), key
                if ext == "cls":
                    label = int(data.strip()) if data.strip().isdigit() else -1
                    if not 0 <= label < num_classes:
                        outside += 1
                        first = first or f"{key!r}: {data[:20].decode('ascii', 'replace').strip()!r}"
        except ValueError as exc:  # TarFormatError: still hash the rest, the checksum says more
            broken = f"not a readable tar ({exc})"
        while stream.read(1 << 20):  # the end-of-archive padding counts in the checksum
            pass
    if outside:
        broken = f"{outside} labels outside [0, num_classes={num_classes}) (first {first}): the shard belongs to " \
                 "another conversion (rerun the converter with --overwrite)"
    return raw.sha.hexdigest(), None if broken.startswith("not a") else keys, broken


def verify_shards(manifest: Manifest, checksums: bool = True) -> list[str]:
    """Returns a list of problems (missing shard, size, checksum, sample count or label mismatch); empty = OK.

    checksums=False checks the sizes only (reads no shard). With checksums every shard is read once:
    its sha256, its sample count and every label (``KEY.cls`` in [0, num_classes)).
    """
    problems = []
    for info, path in zip(manifest.shards, manifest.shard_paths()):
        if not os.path.exists(path):
            problems.append(f"{info.name}: missing")
        elif info.bytes and os.path.getsize(path) != info.bytes:
            problems.append(f"{info.name}: {os.path.getsize(path)} bytes, manifest says {info.bytes}")
        elif checksums:
            sha, samples, broken = _scan(path, manifest.num_classes)
            if info.sha256 and sha != info.sha256:
                problems.append(f"{info.name}: sha256 mismatch (file changed or truncated)")
            if samples is not None and samples != info.samples:
                problems.append(f"{info.name}: {samples} samples, manifest says {info.samples}")
            if broken:
                problems.append(f"{info.name}: {broken}")
    return problems


def verify_folder(manifest: Manifest) -> list[str]:
    """Problems of the files beside the shards: a class table or conversion records of another conversion."""
    problems = []
    classes = os.path.join(manifest.root, CLASSES_NAME)
    if os.path.isfile(classes):
        with open(classes, encoding="utf-8") as f:
            rows = [line.split("\t", 1)[0] for line in f.read().splitlines() if line]
        if rows != [str(i) for i in range(len(rows))] or len(rows) != manifest.num_classes:
            problems.append(f"{CLASSES_NAME}: {len(rows)} rows (labels {', '.join(rows[:3])}...), the manifest says "
                            f"{manifest.num_classes} classes: names and shards come from different conversions "
                            "(rerun the converter with --overwrite)")
    if not manifest.fingerprint:
        return problems  # a manifest of an older converter: nothing recorded to compare
    record = read_conversion(manifest.root)
    if record is not None and record["fingerprint"] != manifest.fingerprint:
        problems.append(f"{PARTS}/{CONVERSION_NAME}: records another conversion than the manifest (an unfinished "
                        "conversion of another source?): rerun the converter with --overwrite")
    for info in manifest.shards:
        side = os.path.join(manifest.root, PARTS, info.name + ".json")
        try:
            with open(side, encoding="utf-8") as f:
                recorded = json.load(f).get("fingerprint", "")
        except (OSError, ValueError, AttributeError):
            continue  # sidecars are a converter's scratch notes: only a readable one can disagree
        if recorded != manifest.fingerprint:
            problems.append(f"{info.name}: written by another conversion than the manifest's "
                            f"({PARTS}/{info.name}.json): rerun the converter with --overwrite")
    return problems
