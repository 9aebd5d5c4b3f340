"""``dsoft data align``: a folder of raw images ``ROOT/<identity>/<image>`` plus a landmark file -> aligned crops
in the ``OUT/<identity>/<image>`` layout ``dsoft data from-folder`` reads (``dsoft_dist.data.align.align_face``).

    dsoft data align /data/raw /data/aligned --landmarks /data/raw/landmarks.txt --workers 4

A rerun of ``align_folder`` into the same OUT resumes the alignment recorded in ``OUT/alignment.json``
(same images, landmark file, size, format, score threshold): crops already there are kept, the rest are
written (each to a temporary name, then renamed). An OUT holding another alignment, or anything but an
alignment, is refused unless ``overwrite`` removes the earlier crops.
"""
from __future__ import annotations

import json
import os
import re
from functools import partial

from dsoft_dist.data.align import (
    ALIGN_VERSION,
    ALIGNED_SIZE,
    FORMATS,
    check_crop_size,
    left_out,
    output_name,
    read_landmark_table,
    select_faces,
)
from dsoft_dist.data.convert import aligned_image, folder_listing, scan_folder, worker_pool
from dsoft_dist.data.manifest import fingerprint, spec_differences
from dsoft_dist.data.shards import BadData
from dsoft_dist.observability import get_logger
from dsoft_dist.observability.progress import progress_bar
from dsoft_dist.utils import write_text_atomic

log = get_logger(__name__)

ALIGNMENT_NAME = "alignment.json"  # OUT's record of its alignment (a file: from-folder reads folders only)
_TEMPORARY = re.compile(r".*\.(jpg|jpeg|png|webp)\.tmp\.\d+", re.IGNORECASE)  # a crop being written


def align_folder(root: str, out_dir: str, landmarks: str, size: int = ALIGNED_SIZE, fmt: str | None = None,
                 min_score: float | None = None, policy: str = "skip", overwrite: bool = False, workers: int = 1,
                 progress: bool = True) -> dict:
    """ROOT/<identity>/<image> + landmark file -> OUT/<identity>/<image> crops of size x size (``align_face``).

    fmt: None keeps each image's format and name, "jpg" / "png" re-encode (JPEG quality 95); min_score skips
    lines scoring below it; policy "skip" counts images that are missing or do not decode, "fail" stops at the
    first. Rerun safety: see the module doc. Returns the counts {aligned, already (crops kept from an earlier
    run), low_score, missing_image, corrupt_image, unlisted (images without a landmark line)}, also logged.
    """
    check_crop_size(size)
    if fmt not in (None, "jpg", "png") or workers < 1:
        raise ValueError(f"format {fmt!r}, workers {workers}: the format is jpg, png or None (keep), workers >= 1")
    _, scanned = scan_folder(root)
    r, o = os.path.realpath(root), os.path.realpath(out_dir)
    if os.path.commonpath([r, o]) in (r, o):
        raise ValueError(f"OUT {out_dir!r} and ROOT {root!r} are one folder or one holds the other: write the "
                         "crops outside ROOT (its images would be read as identities, or removed by --overwrite)")
    table = read_landmark_table(landmarks, min_score)
    faces = select_faces(root, scanned, table, policy)
    jobs, dests = [], {}
    for path, identity, points in faces.items:
        name, encoding = output_name(os.path.basename(path), fmt)
        dest = os.path.join(out_dir, identity, name)
        if dest in dests:
            raise ValueError(f"{path} and {dests[dest]} would both be written to {dest}: drop --format or rename one")
        dests[dest] = path
        jobs.append((path, dest, encoding, tuple(points.ravel())))
    chosen = set(dests.values())
    spec = {"align_version": ALIGN_VERSION, "size": size, "format": fmt or "keep", "min_score": min_score,
            "source": {"path": os.path.abspath(root),
                       "listing": folder_listing(root, [(p, label) for p, label in scanned if p in chosen])},
            "landmarks": {"path": os.path.abspath(landmarks), "sha256": table.sha256}}
    _claim(out_dir, spec, overwrite)
    for identity in faces.identities:  # an identity whose images all fail to decode stays a (then empty) class
        os.makedirs(os.path.join(out_dir, identity), exist_ok=True)
    todo = [job for job in jobs if not os.path.exists(job[1])]
    counts = {"aligned": 0, "already": len(jobs) - len(todo), **faces.counts}
    if counts["already"]:
        log.info("%s: %d of %d crops of this alignment are already in %s", "resuming" if todo else "nothing to write",
                 counts["already"], len(jobs), out_dir)
    bad = BadData(policy, where="[align] ")
    _run(partial(_align_job, aligned_image, size), todo, workers, progress, bad, counts)
    counts["corrupt_image"] = bad.counts["corrupt_image"]
    log.info("aligned %d faces of %d identities into %s (%d already there); %s", counts["aligned"],
             len(faces.identities), out_dir, counts["already"], left_out(counts))
    return counts


def _run(job, todo: list, workers: int, progress: bool, bad: BadData, counts: dict) -> None:
    """Runs ``job`` over ``todo`` in a pool of ``workers`` (a bar on a terminal; redirected, a log line each
    tenth of 1000 or more images) and counts its results into counts / bad."""
    step = len(todo) // 10 if len(todo) >= 1000 else 0
    with progress_bar(total=len(todo), desc="aligning", unit="img", enabled=progress) as bar, \
            worker_pool(workers, len(todo)) as pool:
        for done, (kind, message) in enumerate(pool.imap_unordered(job, todo, chunksize=8), 1):
            if kind:
                bad.report(kind, message)
            else:
                counts["aligned"] += 1
            bar.update(1)
            if bar.disable and progress and step and done % step == 0:
                log.info("aligned %d of %d images", done, len(todo))


def _align_job(aligned_image, size: int, job) -> tuple[str, str]:
    """Writes one crop (temporary name, then rename: a crop is whole or absent); ('', '') or (bad kind, why)."""
    src, dest, encoding, points = job
    try:
        data = aligned_image(src, points, size, encoding)
    except (OSError, ValueError, EOFError, SyntaxError) as exc:  # unreadable image (PIL/simplejpeg errors)
        return "corrupt_image", f"{src}: {exc}"
    tmp = f"{dest}.tmp.{os.getpid()}"
    with open(tmp, "wb") as fh:
        fh.write(data)
    os.replace(tmp, dest)
    return "", ""


def _crops(out_dir: str, temporary: bool = False) -> list[str]:
    """Paths of the crops (or only the unfinished temporary files) in OUT/<identity>/."""
    if not os.path.isdir(out_dir):
        return []
    found = []
    for entry in sorted(os.scandir(out_dir), key=lambda e: e.name):
        if entry.is_dir():
            found += [os.path.join(entry.path, n) for n in sorted(os.listdir(entry.path)) if _TEMPORARY.fullmatch(n)
                      or not temporary and os.path.splitext(n)[1].lower() in FORMATS]
    return found


def _claim(out_dir: str, spec: dict, overwrite: bool) -> None:
    """Makes out_dir hold the alignment ``spec``: resumes the recorded one when it is this one, refuses another
    (or a non-empty folder without a record) unless overwrite removes the earlier crops and record first."""
    path = os.path.join(out_dir, ALIGNMENT_NAME)
    record = None
    if os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as fh:
                record = dict(json.load(fh))
        except (OSError, ValueError, TypeError):
            record = {}  # unreadable: it matches no alignment
    if record is not None and record.get("fingerprint") == fingerprint(spec) and not overwrite:
        for tmp in _crops(out_dir, temporary=True):  # left by an interrupted run
            os.remove(tmp)
        return
    if record is not None and not overwrite:
        what = spec_differences(record["spec"], spec) if record.get("spec") else f"an unreadable {ALIGNMENT_NAME}"
        raise ValueError(f"{out_dir!r} holds another alignment (differs in {what}): rerun with --overwrite to "
                         "replace it, or write to another folder")
    entries = sorted(os.listdir(out_dir)) if os.path.isdir(out_dir) else []
    if record is None and entries and not overwrite:
        raise ValueError(f"{out_dir!r} holds {len(entries)} entries (such as {entries[0]!r}) and no {ALIGNMENT_NAME}:"
                         " from-folder would read every folder in it as an identity; give a new or empty folder, "
                         "or rerun with --overwrite to remove the images in its sub-folders")
    earlier = _crops(out_dir)
    for name in earlier:
        os.remove(name)
    for entry in entries:  # the identity folders emptied above
        if os.path.isdir(os.path.join(out_dir, entry)) and not os.listdir(os.path.join(out_dir, entry)):
            os.rmdir(os.path.join(out_dir, entry))
    if earlier:
        log.info("--overwrite: removed %d images of the earlier alignment in %s", len(earlier), out_dir)
    os.makedirs(out_dir, exist_ok=True)
    write_text_atomic(path, json.dumps({"fingerprint": fingerprint(spec), "spec": spec}, indent=1, sort_keys=True))
