"""Five-point face alignment: a similarity transform from detected landmarks to the 112 x 112 ArcFace
template, the bilinear warp that applies it, and the landmark file. Training data (``dsoft data align``:
dsoft_dist.data.align_folder; ``from-folder --landmarks``) and IJB evaluation go through these same functions.

    from dsoft_dist.data.align import align_face
    crop = align_face(image, landmarks)  # (H, W, 3) uint8 RGB, (5, 2) x/y pixels -> (112, 112, 3) uint8

Landmarks are, in order: left eye, right eye, nose tip, left mouth corner, right mouth corner, as
(x, y) pixel coordinates whose integers are pixel centres (the convention of common detectors); "left"
is the image's left (the subject's right eye). A landmark file line is ``IDENTITY/IMAGE x1 y1 ... x5 y5
[SCORE]`` (68-point lines, 136 coordinates, are reduced to five as the IJB scripts do). The identity is the
first path component: the raw folder is ``ROOT/<identity>/<image>``, like from-folder's input.
"""
from __future__ import annotations

import os
from typing import NamedTuple

import numpy as np

from dsoft_dist.data.shards import BadData
from dsoft_dist.observability import get_logger
from dsoft_dist.utils import sha256_file

log = get_logger(__name__)

ALIGNED_SIZE = 112
ALIGN_VERSION = 1  # bump when the same images, landmarks and options give other crops
FORMATS = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp"}  # image suffix -> its encoding
# Where the five landmarks land in a 112 x 112 crop (x, y): the template ArcFace-family models are trained on.
TEMPLATE_112 = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                         [41.5493, 92.3655], [70.7299, 92.2041]], dtype=np.float64)


def check_landmarks(landmarks, what: str = "landmarks") -> np.ndarray:
    """(5, 2) float64 from anything array-like with ten finite numbers; ValueError naming ``what`` otherwise."""
    pts = np.asarray(landmarks, dtype=np.float64)
    if pts.size != 10:
        raise ValueError(f"{what} has {pts.size} numbers: five (x, y) points are ten numbers (left eye, right eye, "
                         "nose, left and right mouth corner)")
    pts = pts.reshape(5, 2)
    if not np.isfinite(pts).all():
        raise ValueError(f"{what} holds a non-finite value ({pts.ravel().tolist()}): fix the landmark file")
    return pts


def similarity_transform(src, dst) -> np.ndarray:
    """The least-squares similarity (rotation, uniform scale, translation; no reflection) taking src to dst.

    src, dst: (N, 2) points, N >= 2. Returns the (2, 3) matrix M with dst ~ M @ [x, y, 1] (Umeyama, 1991:
    R = U diag(1, det) V^T from the SVD of the cross-covariance, scale = trace(S diag(1, det)) / var(src)).
    Raises ValueError when src has no spread (all points equal).
    """
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    src_mean, dst_mean = src.mean(0), dst.mean(0)
    src_c, dst_c = src - src_mean, dst - dst_mean  # (N, 2)
    var = (src_c ** 2).sum() / len(src)
    if var <= 1e-12:
        raise ValueError(f"the landmarks {src.ravel().tolist()} are all one point: no transform fits them")
    u, s, vt = np.linalg.svd(dst_c.T @ src_c / len(src))  # (2, 2) cross-covariance
    d = np.array([1.0, 1.0 if np.linalg.det(u) * np.linalg.det(vt) > 0 else -1.0])
    rot = u @ np.diag(d) @ vt
    scale = float((s * d).sum() / var)
    m = np.empty((2, 3))
    m[:, :2] = scale * rot
    m[:, 2] = dst_mean - scale * rot @ src_mean
    return m


def warp_affine(image: np.ndarray, matrix: np.ndarray, size: int = ALIGNED_SIZE) -> np.ndarray:
    """Bilinear warp of (H, W, C) uint8 by the (2, 3) forward matrix (input xy -> output xy) into (size, size, C).

    Each output pixel centre (x, y) samples the input at M^-1 (x, y); neighbours outside the image count as 0
    (black border); values are rounded to the nearest integer.
    """
    h, w = image.shape[:2]
    a = np.vstack([matrix, [0.0, 0.0, 1.0]])
    inv = np.linalg.inv(a)[:2]  # output xy -> input xy
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64)  # (size, size)
    sx = inv[0, 0] * xs + inv[0, 1] * ys + inv[0, 2]
    sy = inv[1, 0] * xs + inv[1, 1] * ys + inv[1, 2]
    x0, y0 = np.floor(sx).astype(np.int64), np.floor(sy).astype(np.int64)
    fx, fy = (sx - x0)[..., None], (sy - y0)[..., None]  # (size, size, 1)
    padded = np.zeros((h + 2, w + 2, image.shape[2]), dtype=np.float64)  # one black pixel around the image
    padded[1:-1, 1:-1] = image
    # clamp into the padded frame: a neighbour further out than the border reads a black pixel too
    xa, xb = np.clip(x0 + 1, 0, w + 1), np.clip(x0 + 2, 0, w + 1)
    ya, yb = np.clip(y0 + 1, 0, h + 1), np.clip(y0 + 2, 0, h + 1)
    out = ((1 - fy) * ((1 - fx) * padded[ya, xa] + fx * padded[ya, xb])
           + fy * ((1 - fx) * padded[yb, xa] + fx * padded[yb, xb]))
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def align_face(image: np.ndarray, landmarks, size: int = ALIGNED_SIZE) -> np.ndarray:
    """(H, W, 3) uint8 RGB face and its five landmarks -> (size, size, 3) uint8 crop on the ArcFace template.

    The template is defined at 112 px and scaled by size / 112 for other sizes.
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"align_face takes an (H, W, 3) uint8 RGB image, got {image.dtype} {image.shape}")
    pts = check_landmarks(landmarks)
    matrix = similarity_transform(pts, TEMPLATE_112 * (size / ALIGNED_SIZE))
    return warp_affine(image, matrix, size)


def landmarks_from_68(points) -> np.ndarray:
    """(68, 2) dlib / iBUG 300-W points (or 136 numbers) -> (5, 2) in the template's order, as the IJB scripts
    reduce them: each eye is the midpoint of its two corners (36, 39 and 42, 45), the nose tip is 30, the
    mouth corners 48 and 54 (0-based indices; the image's left first)."""
    p = np.asarray(points, dtype=np.float64).reshape(68, 2)
    return np.stack([(p[36] + p[39]) / 2, (p[42] + p[45]) / 2, p[30], p[48], p[54]])


def data_lines(path: str):
    """Yields (fields, where, line number) of each data line of a whitespace-separated text file: blank lines
    and ``#`` comments skipped; ``where`` is ``file:line`` for messages. The landmark file and IJB's meta lists."""
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            fields = line.split()
            if fields and not fields[0].startswith("#"):
                yield fields, f"{path}:{number}", number


class LandmarkRow(NamedTuple):
    """One line of a landmark file: the image's path (relative to the file's image root), its (5, 2) points,
    the detector score (None when the line has none) and where the line is, for messages."""
    path: str
    points: np.ndarray
    score: float | None
    where: str


def read_landmark_file(path: str, need_score: bool = False) -> list[LandmarkRow]:
    """Reads ``PATH x1 y1 ... x5 y5 [SCORE]`` lines (blank lines and ``#`` comments skipped): the layout of
    IJB's ``*_name_5pts_score.txt`` and of ``dsoft data align``'s landmark file. Fields are split on
    whitespace, so image paths hold no spaces. A line of 68 points (136 coordinates in dlib / iBUG order,
    optional score) is reduced to five by ``landmarks_from_68``.

    Raises FileNotFoundError for a missing file and ValueError naming ``file:line`` for a malformed line
    (a field count other than 11 or 12, a number that does not parse, a non-finite value, a missing score
    when need_score).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"landmark file {path} does not exist")
    rows = []
    for fields, where, _ in data_lines(path):
        coords = 136 if len(fields) in (137, 138) else 10  # 68 points, or five
        if len(fields) not in (11, 12, 137, 138) or (need_score and len(fields) != coords + 2):
            wanted = "12 fields (image, ten coordinates, score)" if need_score else \
                "11 or 12 fields (image, ten coordinates, optional score)"
            raise ValueError(f"{where}: {len(fields)} fields in {' '.join(fields)[:80]!r}: a line is {wanted} "
                             "(or 137/138 with 68 points)")
        try:
            numbers = [float(v) for v in fields[1:]]
        except ValueError:
            raise ValueError(f"{where}: {' '.join(fields)[:80]!r} has a field that is not a number after the "
                             "image path") from None
        score = numbers[coords] if len(numbers) == coords + 1 else None
        if coords == 136:
            if not np.isfinite(numbers[:coords]).all():
                raise ValueError(f"{where}: a 68-point line holds a non-finite coordinate: fix the file")
            numbers = landmarks_from_68(numbers[:coords]).ravel().tolist()
        points = check_landmarks(numbers[:10], what=where)
        if score is not None and not np.isfinite(score):
            raise ValueError(f"{where}: the score {fields[-1]} is not finite")
        rows.append(LandmarkRow(fields[0], points, score, where))
    return rows


# ---- a raw folder's landmark file ------------------------------------------------------------

def face_path(row: LandmarkRow) -> str:
    """The row's image path as ``IDENTITY/IMAGE``; ValueError naming the line when it has no identity folder,
    a deeper one, is absolute or climbs (``..``), or is not a .jpg/.jpeg/.png/.webp file."""
    parts = [p for p in row.path.split("/") if p not in ("", ".")]
    if row.path.startswith("/") or ".." in parts or len(parts) != 2:
        raise ValueError(f"{row.where}: the image path {row.path!r} is not IDENTITY/IMAGE: the file names each "
                         "image relative to ROOT/<identity>/<image>, its folder being the identity")
    if os.path.splitext(parts[1])[1].lower() not in FORMATS:
        raise ValueError(f"{row.where}: {row.path!r} is not a {'/'.join(FORMATS)} file: convert the image first")
    return "/".join(parts)


class LandmarkTable(NamedTuple):
    """A raw folder's landmark file: ``rows`` maps ``IDENTITY/IMAGE`` to its line (for lines scoring at least
    the threshold), ``low_score`` is the set of images whose line scores below it, ``sha256`` the file's digest."""
    rows: dict
    low_score: set
    sha256: str


def read_landmark_table(path: str, min_score: float | None = None) -> LandmarkTable:
    """Reads a landmark file for ``dsoft data align`` / ``from-folder --landmarks`` (``read_landmark_file``:
    with min_score every line needs a score, and lines scoring below it are counted, not kept).

    ValueError naming ``file:line`` for a path that is not IDENTITY/IMAGE (``face_path``), an image named
    twice, five points that are one point; ValueError for a file without lines or a non-finite min_score.
    """
    if min_score is not None and not np.isfinite(min_score):
        raise ValueError(f"the minimum score {min_score} is not a finite number")
    rows, seen, low = {}, {}, set()
    for row in read_landmark_file(path, need_score=min_score is not None):
        key = face_path(row)
        if key in seen:
            raise ValueError(f"{row.where}: {key} already has landmarks at {seen[key]}: keep one line per image")
        seen[key] = row.where
        if ((row.points - row.points.mean(0)) ** 2).sum() / 5 <= 1e-12:  # similarity_transform's test
            raise ValueError(f"{row.where}: the five points of {key} are all one point: no alignment fits them")
        if min_score is not None and row.score < min_score:
            low.add(key)
        else:
            rows[key] = row
    if not seen:
        raise ValueError(f"landmark file {path} holds no landmark lines (IDENTITY/IMAGE x1 y1 ... x5 y5 [SCORE])")
    return LandmarkTable(rows, low, sha256_file(path))


class Faces(NamedTuple):
    """What a raw folder gives to align: ``items`` [(image path, identity, points (5, 2))] in the folder scan's
    order, ``identities`` sorted, and ``counts`` of the images left out: low_score, missing_image, unlisted."""
    items: list
    identities: list
    counts: dict


def select_faces(root: str, scanned: list, table: LandmarkTable, policy: str = "skip") -> Faces:
    """Matches a landmark table to the images of ``scan_folder(root)`` (``scanned``: [(path, label)]).

    A line naming no image of the folder is bad data (``missing_image``: counted, BadDataError under
    policy "fail"); images without a line are counted and logged by name (a few), never dropped silently.
    """
    bad = BadData(policy, where="[landmarks] ")
    items, unlisted, found = [], [], set()
    for path, _ in scanned:
        key = os.path.relpath(path, root).replace(os.sep, "/")
        if key in table.rows:
            items.append((path, key.split("/")[0], table.rows[key].points))
            found.add(key)
        elif key not in table.low_score:
            unlisted.append(key)
    for key, row in table.rows.items():  # in the file's order
        if key not in found:
            bad.report("missing_image", f"{row.where}: {key} is not an image file in {root}")
    if unlisted:
        log.warning("%d images in %s have no landmark line and are left out, e.g. %s", len(unlisted), root,
                    ", ".join(unlisted[:3]))
    counts = {"low_score": len(table.low_score), "missing_image": bad.counts["missing_image"],
              "unlisted": len(unlisted)}
    if not items:
        raise ValueError(f"no image of {root} is left to align ({left_out(counts)}): the landmark file names images "
                         "as IDENTITY/IMAGE relative to ROOT")
    return Faces(items, sorted({identity for _, identity, _ in items}), counts)


def left_out(counts: dict) -> str:
    """One phrase for what an alignment left out: 'skipped 2 (low_score 1, corrupt_image 1), images without a
    landmark line: 3'."""
    kinds = [(k, counts.get(k, 0)) for k in ("low_score", "missing_image", "corrupt_image") if counts.get(k, 0)]
    text = f"skipped {sum(n for _, n in kinds)}" + (f" ({', '.join(f'{k} {n}' for k, n in kinds)})" if kinds else "")
    return text + f", images without a landmark line: {counts.get('unlisted', 0)}"


def output_name(name: str, fmt: str | None) -> tuple[str, str]:
    """(file name, encoding) of an image's crop: its own name and format (fmt None), else stem + '.' + fmt."""
    stem, suffix = os.path.splitext(name)
    own = FORMATS[suffix.lower()]
    return (name, own) if fmt in (None, own) else (f"{stem}.{fmt}", fmt)


def check_crop_size(size: int) -> int:
    """The crop side in pixels; ValueError below 16 (the template's points would merge)."""
    if not isinstance(size, int) or size < 16:
        raise ValueError(f"crop size {size!r}: give at least 16 pixels (the template is defined at 112, the "
                         "default; it scales with the size)")
    return size
