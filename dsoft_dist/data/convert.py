"""Converters to WebDataset shards + manifest: InsightFace RecordIO, image folders, synthetic.

Every converter cuts its items into shards of ``per_shard`` samples, writes the shards
with a pool of ``workers`` processes (a bar counts samples, on a terminal only) and finishes
with ``manifest.json``. Each shard is written to a temporary name, renamed when complete and
described by a sidecar ``.parts/<shard>.json``, so an interrupted conversion restarts
where it stopped. Before the first shard the conversion's fingerprint (its spec: converter
version, source and its listing digest, the options that change shard bytes; see
``dsoft_dist.data.manifest``) is recorded in ``.parts/conversion.json``. A rerun resumes only
the recorded conversion; an output folder holding another conversion (another source,
listing or option, or shards of an older dsoft that recorded none) is refused with one line
naming what differs. ``overwrite=True`` removes the earlier conversion's files (manifest,
shards, sidecars, ``classes.tsv``) and redoes everything, so a folder never mixes two.

Samples are ``{key}.jpg|png|webp`` (the source bytes, unchanged) + ``{key}.cls``; from a folder with a
landmark file (``--landmarks``), the bytes are each image's aligned crop instead (``dsoft_dist.data.align``).

    dsoft data from-rec /data/ms1m/train.rec /data/ms1m-wds --workers 8
    dsoft data from-folder /data/faces /data/faces-wds
    dsoft data from-folder /data/raw /data/faces-wds --landmarks /data/raw/landmarks.txt --align-size 112
    dsoft data synth /tmp/synth --identities 1000 --samples-per-identity 20 --image-size 112
"""
from __future__ import annotations

import hashlib
import io
import json
import multiprocessing as mp
import os
import re
from functools import partial
from typing import Iterator

import numpy as np
import webdataset as wds
from PIL import Image

from dsoft_dist.data.align import (
    ALIGN_VERSION,
    FORMATS,
    align_face,
    check_crop_size,
    left_out,
    output_name,
    read_landmark_table,
    select_faces,
)
from dsoft_dist.data.decode import decode_image, image_format
from dsoft_dist.data.manifest import (
    CLASSES_NAME,
    CONVERTER_VERSION,
    MANIFEST_NAME,
    PARTS,
    Manifest,
    ShardInfo,
    fingerprint,
    read_conversion,
    spec_differences,
    write_conversion,
    write_manifest,
)
from dsoft_dist.data.recordio import RecordIOError, RecordReader, scalar_label, unpack
from dsoft_dist.data.rng import FeistelPermutation
from dsoft_dist.data.shards import BadData
from dsoft_dist.data.synthetic import SyntheticIdentities
from dsoft_dist.observability import get_logger
from dsoft_dist.observability.progress import progress_bar
from dsoft_dist.utils import sha256_file, write_text_atomic

log = get_logger(__name__)


def _image_size(data: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as img:  # reads the header only
        return img.height, img.width


def image_samples(make_sample, check_decode: bool, items, bad: BadData) -> Iterator[dict]:
    """Sample dicts of images: make_sample(item) -> (key, encoded bytes, label); bad items are reported.

    Each dict also carries ``__size__`` ((H, W), read from the header) for the manifest.
    """
    for item in items:
        try:
            key, data, label = make_sample(item)
            ext = image_format(data)
            if not ext:
                raise ValueError(f"payload is not jpg/png/webp (starts with {data[:8]!r})")
            if check_decode:
                decode_image(data)
            size = _image_size(data)
        except RecordIOError as exc:
            bad.report("corrupt_image", str(exc))
            continue
        except (OSError, ValueError, EOFError, SyntaxError) as exc:  # unreadable image (PIL/simplejpeg errors)
            bad.report("corrupt_image", f"item {item!r}: {exc}")
            continue
        yield {"__key__": key, ext: data, "cls": int(label), "__size__": size}


def _write_shard(out_dir: str, shard_id: int, items, policy: str, prefix: str, make_samples, digest: str) -> dict:
    """Writes one shard from the sample dicts make_samples(items, bad) yields; returns its sidecar."""
    name = f"{prefix}-{shard_id:06d}.tar"
    path, tmp = os.path.join(out_dir, name), os.path.join(out_dir, name + ".tmp")
    bad = BadData(policy, where=f"[{name}] ")
    count, sizes = 0, set()
    # a fixed *int* mtime: a rewritten shard is byte-identical, and no float field forces a PAX
    # header before every member (one 512-byte header per member halves tar parsing when loading)
    with wds.TarWriter(tmp, mtime=0) as sink:
        for sample in make_samples(items, bad):
            size = sample.pop("__size__", None)
            if size is not None:
                sizes.add(size)
            sink.write(sample)
            count += 1
    os.replace(tmp, path)
    part = {"name": name, "samples": count, "bytes": os.path.getsize(path), "sha256": sha256_file(path),
            "bad": bad.total(), "sizes": sorted(sizes), "fingerprint": digest}
    write_text_atomic(os.path.join(out_dir, PARTS, name + ".json"), json.dumps(part))
    return part


def _done(out_dir: str, shard_id: int, prefix: str, digest: str) -> dict | None:
    """The sidecar of a finished shard of this conversion (fingerprint ``digest``), else None (rewrite it)."""
    name = f"{prefix}-{shard_id:06d}.tar"
    side = os.path.join(out_dir, PARTS, name + ".json")
    if not os.path.exists(os.path.join(out_dir, name)):
        return None
    try:
        with open(side, encoding="utf-8") as f:
            part = json.load(f)
    except (OSError, ValueError):  # no sidecar, or one cut by a crash: the shard is rewritten
        return None
    return part if isinstance(part, dict) and part.get("fingerprint") == digest else None


def _outputs(out_dir: str, prefix: str) -> list[str]:
    """Names (relative to out_dir) of a conversion's files there: manifest, class table, shards, sidecars."""
    if not os.path.isdir(out_dir):
        return []
    names = {n for n in os.listdir(out_dir)
             if n in (MANIFEST_NAME, CLASSES_NAME) or re.fullmatch(rf"{re.escape(prefix)}-\d{{6}}\.tar(\.tmp)?", n)}
    parts = os.path.join(out_dir, PARTS)
    sides = sorted(n for n in (os.listdir(parts) if os.path.isdir(parts) else [])
                   if os.path.isfile(os.path.join(parts, n)))
    names |= {os.path.join(PARTS, n) for n in sides}
    shards = [n[:-len(".json")] for n in sides if n.endswith(".tar.json")]
    try:  # shards the earlier manifest names (plain file names only: nothing outside out_dir is touched)
        with open(os.path.join(out_dir, MANIFEST_NAME), encoding="utf-8") as f:
            shards += [s["name"] for s in json.load(f)["shards"]]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    names |= {n for n in shards if isinstance(n, str) and n == os.path.basename(n)
              and os.path.isfile(os.path.join(out_dir, n))}
    # the manifest goes first: an interrupted clean-up never leaves a manifest naming removed shards
    return sorted(names, key=lambda n: (n != MANIFEST_NAME, n.startswith(PARTS), n))


def _claim(out_dir: str, spec: dict, overwrite: bool, prefix: str) -> str:
    """Makes out_dir hold this conversion (spec); returns its fingerprint (see module doc).

    Resumes the recorded conversion when its spec is this one; refuses (ValueError) another one,
    or shards without a record; overwrite=True removes the earlier conversion's files first.
    """
    record, digest = read_conversion(out_dir), fingerprint(spec)
    if record is not None and record["fingerprint"] == digest and not overwrite:
        return digest  # the same conversion: resume it
    earlier = _outputs(out_dir, prefix)
    if not overwrite and record is not None:
        raise ValueError(f"{out_dir!r} holds another conversion (differs in {spec_differences(record['spec'], spec)})"
                         ": rerun with --overwrite to replace it, or write to another folder")
    # a lone class table or temporary files are no conversion: a fresh start replaces them
    if not overwrite and (found := [n for n in earlier if n != CLASSES_NAME and not n.endswith(".tmp")]):
        raise ValueError(f"{out_dir!r} holds a conversion that recorded no fingerprint ({len(found)} files such as "
                         f"{found[0]!r}: an older dsoft wrote it, or it was copied without {PARTS}/): rerun with "
                         "--overwrite to redo it, or write to another folder")
    for name in earlier:
        os.remove(os.path.join(out_dir, name))
    if earlier and overwrite:
        log.info("--overwrite: removed %d files of the earlier conversion in %s", len(earlier), out_dir)
    return write_conversion(out_dir, spec)


def run_shards(out_dir: str, items, make_samples, num_classes: int, source: dict, per_shard: int = 1000,
               workers: int = 1, policy: str = "skip", overwrite: bool = False, prefix: str = "train",
               progress: bool = True, kind: dict | None = None, side_files: dict | None = None) -> Manifest:
    """Writes items to shards in parallel (restartable) and then the manifest (see module doc).

    items: a sequence (a ``range`` keeps a million positions O(1)); each shard gets ``per_shard`` of them.
    make_samples(items, bad) -> iterator of sample dicts for the tar (``image_samples`` for images) must
    be picklable (a module-level function or functools.partial of one).
    source: what is converted, with everything else that decides the shard bytes (a listing digest, the
    shuffle seed, decode checks); it is part of the fingerprint and saved in the manifest.
    kind: the manifest's sample fields for non-image shards (``sample_kind``, ``vector_dim``, ``vector_dtype``).
    side_files: {name: text} written into out_dir once the conversion is claimed (``classes.tsv``).
    """
    if per_shard < 1 or workers < 1:
        raise ValueError(f"per_shard={per_shard}, workers={workers}: both must be >= 1")
    if not len(items):
        raise ValueError(f"nothing to write to {out_dir!r}: the source holds no samples")
    spec = {"converter_version": CONVERTER_VERSION, "source": source, "num_classes": int(num_classes),
            "samples": len(items), "per_shard": per_shard, "bad_data": policy, "prefix": prefix, "kind": kind or {}}
    digest = _claim(out_dir, spec, overwrite, prefix)
    for name, text in (side_files or {}).items():
        write_text_atomic(os.path.join(out_dir, name), text)
    jobs = [(i, items[s:s + per_shard]) for i, s in enumerate(range(0, len(items), per_shard))]
    parts = {i: p for i, _ in jobs if (p := _done(out_dir, i, prefix, digest))}
    todo = [(i, chunk) for i, chunk in jobs if i not in parts]
    if not todo:
        log.info("nothing to write: %s already holds all %d shards of this conversion", out_dir, len(jobs))
    elif parts:
        log.info("resuming: %d of %d shards of this conversion already written in %s", len(parts), len(jobs),
                 out_dir)
    else:
        log.info("writing %d samples in %d shards to %s", len(items), len(jobs), out_dir)
    _write_all(out_dir, jobs, todo, parts, partial(_job, out_dir, policy, prefix, make_samples, digest),
               workers, progress and bool(todo), "vec" if kind else "img")
    ordered = [parts[i] for i, _ in jobs]
    sizes = {tuple(s) for p in ordered for s in p["sizes"]}
    manifest = Manifest(num_classes=num_classes, source=source, bad_samples=sum(p["bad"] for p in ordered),
                        shards=[ShardInfo(p["name"], p["samples"], p["bytes"], p["sha256"]) for p in ordered],
                        image_size=list(sizes.pop()) if len(sizes) == 1 else [0, 0], fingerprint=digest,
                        root=out_dir, **(kind or {}))
    write_manifest(manifest, out_dir)
    log.info("wrote %d samples of %d classes in %d shards to %s (%d bad items skipped)", manifest.num_samples,
             num_classes, len(ordered), out_dir, manifest.bad_samples)
    return manifest


def _write_all(out_dir: str, jobs, todo, parts: dict, write, workers: int, progress: bool, unit: str) -> None:
    """Runs the shard jobs ``todo`` (in a pool of ``workers``), filling ``parts``; a bar on a terminal only.

    Redirected (no bar) a line is logged each tenth of 20 or more shards, so a long conversion's log shows
    progress (a short one has its start and end lines).
    """
    step, done = (len(todo) // 10 if len(todo) >= 20 else 0), 0
    with progress_bar(total=sum(len(c) for _, c in todo), desc="writing shards", unit=unit,
                      enabled=bool(progress)) as bar:
        with worker_pool(workers, len(todo)) as pool:
            for shard_id, part in pool.imap_unordered(write, todo):
                parts[shard_id], done = part, done + 1
                bar.update(len(jobs[shard_id][1]))
                if bar.disable and progress and step and done % step == 0:
                    log.info("written %d of %d shards to %s", done, len(todo), out_dir)


def _job(out_dir, policy, prefix, make_samples, digest, job):
    shard_id, chunk = job
    return shard_id, _write_shard(out_dir, shard_id, chunk, policy, prefix, make_samples, digest)


def worker_pool(workers: int, jobs: int):
    """A fork Pool of ``workers`` processes, or, when one process is enough (1 worker or 1 job), a stand-in
    whose ``imap_unordered`` is ``map``. Use it as a context manager."""
    return mp.get_context("fork").Pool(workers) if workers > 1 and jobs > 1 else _Serial()


class _Serial:
    """Stands in for a Pool when one process is enough (tests, tiny inputs)."""

    def imap_unordered(self, fn, jobs, chunksize: int = 1):
        return map(fn, jobs)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# ---- InsightFace RecordIO -------------------------------------------------------------

_READERS: dict[str, RecordReader] = {}


def _rec_sample(rec_path: str, key: int):
    reader = _READERS.get(rec_path)
    if reader is None:  # one open reader per worker process
        reader = _READERS[rec_path] = RecordReader(rec_path)
    header, payload = unpack(reader.read(key))
    return f"{key:09d}", payload, scalar_label(header)


def from_rec(rec_path: str, out_dir: str, shuffle: bool = True, seed: int = 0, check_decode: bool = False,
             **kw) -> Manifest:
    """train.rec(+.idx) -> shards. Classes from the header record (else max label + 1)."""
    with RecordReader(rec_path) as reader:
        keys, num_classes = reader.image_keys(), reader.num_classes()
        if num_classes is None:
            labels = []
            for k in keys:
                try:
                    labels.append(scalar_label(unpack(reader.read(k))[0]))
                except RecordIOError as exc:
                    log.warning("scanning labels: %s", exc)
            num_classes = max(labels) + 1 if labels else 0
        # the listing: the .idx (every record's offset) and the .rec's size stand for the records' bytes
        listing = hashlib.sha256(f"{sha256_file(reader.idx_path)} {os.path.getsize(rec_path)}".encode()).hexdigest()
    if shuffle:  # records are grouped by identity; mix them so every shard holds many
        keys = [keys[i] for i in np.random.default_rng(seed).permutation(len(keys))]
    source = {"kind": "recordio", "path": os.path.abspath(rec_path), "records": len(keys), "listing": listing,
              "shuffle_seed": seed if shuffle else None, "check_decode": check_decode}
    samples = partial(image_samples, partial(_rec_sample, os.path.abspath(rec_path)), check_decode)
    return run_shards(out_dir, keys, samples, num_classes, source, **kw)


# ---- image folders --------------------------------------------------------------------

IMAGE_SUFFIXES = tuple(FORMATS)  # .jpg .jpeg .png .webp


def scan_folder(root: str) -> tuple[list[str], list[tuple[str, int]]]:
    """ROOT/<identity>/<image> -> (sorted class names, [(path, label), ...])."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"{root!r} is not a folder: expected ROOT/<identity>/<image files>")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
    items = []
    for label, name in enumerate(classes):
        folder = os.path.join(root, name)
        items += [(os.path.join(folder, f), label) for f in sorted(os.listdir(folder))
                  if f.lower().endswith(IMAGE_SUFFIXES)]
    if not items:
        raise ValueError(f"{root!r} holds no images in sub-folders (expected ROOT/<identity>/*.jpg|png|webp)")
    return classes, items


def folder_listing(root: str, items: list[tuple[str, int]]) -> str:
    """sha256 hex over the sorted scan: each image's path under root, size in bytes and label.

    An added, removed, renamed or resized image or identity folder changes it (file names and sizes,
    not contents, so a listing of a million files costs only their stat calls).
    """
    h = hashlib.sha256()
    for path, label in items:
        line = f"{os.path.relpath(path, root)}\t{os.path.getsize(path)}\t{label}\n"
        h.update(line.encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def _file_sample(item):
    number, path, label = item
    with open(path, "rb") as f:
        data = f.read()
    return f"{number:09d}", data, label


def aligned_image(path: str, points, size: int, fmt: str) -> bytes:
    """An image file aligned on its five landmarks (``align_face``: (5, 2) or ten numbers) into a size x size
    crop, encoded as fmt (``encode_image``): what ``dsoft data align`` writes and ``from-folder --landmarks``
    shards. Raises OSError/ValueError for an unreadable image."""
    with open(path, "rb") as f:
        data = f.read()
    return encode_image(align_face(decode_image(data), points, size), fmt)


def _aligned_sample(size: int, item):
    number, path, label, points, fmt = item
    return f"{number:09d}", aligned_image(path, points, size, fmt), label


def _landmark_items(root: str, scanned: list, landmarks: str, size: int, min_score: float | None, policy: str):
    """The scanned images that have a landmark line (``select_faces``), labelled over their identities:
    (class names, [(path, label, ten numbers, encoding)], the alignment's part of the source spec)."""
    table = read_landmark_table(landmarks, min_score)
    faces = select_faces(root, scanned, table, policy)
    label = {name: i for i, name in enumerate(faces.identities)}
    items = [(path, label[identity], tuple(points.ravel()), output_name(os.path.basename(path), None)[1])
             for path, identity, points in faces.items]
    log.info("aligning %d faces of %d identities on the fly; %s", len(items), len(label), left_out(faces.counts))
    align = {"align_version": ALIGN_VERSION, "landmarks": os.path.abspath(landmarks), "landmarks_sha256": table.sha256,
             "size": size, "min_score": min_score}
    return faces.identities, items, align


def from_folder(root: str, out_dir: str, shuffle: bool = True, seed: int = 0, check_decode: bool = False,
                landmarks: str | None = None, align_size: int = 112, min_score: float | None = None,
                **kw) -> Manifest:
    """ROOT/<identity>/<image> -> shards; writes classes.tsv (label TAB folder name).

    With ``landmarks`` (a landmark file, see ``dsoft_dist.data.align``) each image is aligned to an
    align_size crop on the fly, in its own format, exactly as ``dsoft data align`` would write it; images
    without a line, or scoring below min_score, are left out (counted), and the classes are the identities
    that have a face. The landmark file's digest and these options are part of the conversion's fingerprint.
    """
    classes, items = scan_folder(root)
    source = {"kind": "folder", "path": os.path.abspath(root), "images": len(items),
              "listing": folder_listing(root, items), "shuffle_seed": seed if shuffle else None,
              "check_decode": check_decode}
    make = _file_sample
    if landmarks is not None:
        classes, items, source["align"] = _landmark_items(root, items, landmarks, check_crop_size(align_size),
                                                          min_score, kw.get("policy", "skip"))
        make = partial(_aligned_sample, align_size)
    order = np.random.default_rng(seed).permutation(len(items)) if shuffle else range(len(items))
    items = [(int(i), *items[i]) for i in order]  # (number in the sorted scan, path, label[, points, format])
    table = "".join(f"{i}\t{name}\n" for i, name in enumerate(classes))
    return run_shards(out_dir, items, partial(image_samples, make, check_decode), len(classes), source,
                      side_files={CLASSES_NAME: table}, **kw)


# ---- synthetic identities -------------------------------------------------------------

def encode_image(img: np.ndarray, fmt: str = "jpg", quality: int = 95) -> bytes:
    """(H, W, 3) uint8 -> encoded bytes (jpg | png | webp) with Pillow."""
    buf = io.BytesIO()
    kind = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}[fmt]
    Image.fromarray(img).save(buf, format=kind, **({"quality": quality} if fmt != "png" else {}))
    return buf.getvalue()


_SOURCES: dict[str, tuple] = {}


def _synth_sample(params: dict, position: int):
    cache_key = json.dumps(params, sort_keys=True)
    if cache_key not in _SOURCES:  # one generator per worker process
        _SOURCES[cache_key] = (
            SyntheticIdentities(params["num_identities"], image_size=params["image_size"], seed=params["seed"],
                                identity_offset=params["identity_offset"], difficulty=params["difficulty"]),
            FeistelPermutation(params["total"], params["seed"]))
    src, perm = _SOURCES[cache_key]
    t = int(perm(position))
    identity, index = divmod(t, params["samples_per_identity"])
    return f"{identity:09d}_{index:05d}", encode_image(src.sample(identity, index), params["format"]), identity


def synth_to_shards(out_dir: str, num_identities: int, samples_per_identity: int, image_size: int = 112,
                    seed: int = 0, identity_offset: int = 0, difficulty: str = "medium", fmt: str = "jpg",
                    **kw) -> Manifest:
    """Synthetic identities -> shards (samples in a seeded shuffled order); labels are local ids."""
    if num_identities < 1 or samples_per_identity < 1:
        raise ValueError(f"identities={num_identities}, samples_per_identity={samples_per_identity}: both must be "
                         ">= 1")
    total = num_identities * samples_per_identity
    params = dict(num_identities=num_identities, samples_per_identity=samples_per_identity, image_size=image_size,
                  seed=seed, identity_offset=identity_offset, difficulty=difficulty, format=fmt, total=total)
    source = {"kind": "synthetic", **params}
    samples = partial(image_samples, partial(_synth_sample, params), False)
    return run_shards(out_dir, range(total), samples, num_identities, source, **kw)
