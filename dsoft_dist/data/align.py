"""Five-point face alignment: a similarity transform from detected landmarks to the 112 x 112 ArcFace
template, and the bilinear warp that applies it. Training data (``dsoft data align``, ``from-folder
--landmarks``) and IJB evaluation go through these same functions.

    from dsoft_dist.data.align import align_face
    crop = align_face(image, landmarks)  # (H, W, 3) uint8 RGB, (5, 2) x/y pixels -> (112, 112, 3) uint8

Landmarks are, in order: left eye, right eye, nose tip, left mouth corner, right mouth corner, as
(x, y) pixel coordinates whose integers are pixel centres (the convention of common detectors).
"""
from __future__ import annotations

import os
from typing import NamedTuple

import numpy as np

ALIGNED_SIZE = 112
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
    whitespace, so image paths hold no spaces.

    Raises FileNotFoundError for a missing file and ValueError naming ``file:line`` for a malformed line
    (a field count other than 11 or 12, a number that does not parse, a non-finite value, a missing score
    when need_score).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"landmark file {path} does not exist")
    rows = []
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            fields = line.split()
            if not fields or fields[0].startswith("#"):
                continue
            where = f"{path}:{number}"
            if len(fields) not in (11, 12) or (need_score and len(fields) != 12):
                wanted = "12 fields (image, ten coordinates, score)" if need_score else \
                    "11 or 12 fields (image, ten coordinates, optional score)"
                raise ValueError(f"{where}: {len(fields)} fields in {line.strip()[:80]!r}: a line is {wanted}")
            try:
                numbers = [float(v) for v in fields[1:]]
            except ValueError:
                raise ValueError(f"{where}: {line.strip()[:80]!r} has a field that is not a number after the "
                                 "image path") from None
            points = check_landmarks(numbers[:10], what=where)
            score = numbers[10] if len(numbers) == 11 else None
            if score is not None and not np.isfinite(score):
                raise ValueError(f"{where}: the score {fields[11]} is not finite")
            rows.append(LandmarkRow(fields[0], points, score, where))
    return rows
