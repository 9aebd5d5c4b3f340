"""Five-point alignment (dsoft_dist.data.align) and `dsoft data align` / `from-folder --landmarks`.

Faces here are a smooth analytic image (a texture of low-frequency sinusoids plus a coloured blob on each of
the five template points), rendered directly at any pose: a photo of it at a known similarity transform
must align back onto the upright 112 x 112 rendering. The bound: over the crop's interior (3 px away from the
border, where the black outside the face enters) the mean absolute error is below 0.5 gray levels and the
largest below 6 (one bilinear interpolation of a 1.6x magnified smooth image, two roundings to uint8;
measured: 0.16 mean, 2 largest at 25 degrees and 1.6x); a wrong alignment (the rotation ignored) is ~38 mean.

    PYTEST_DEBUG_TEMPROOT=/tmp/devtmp .venv/bin/python -m pytest -q -p no:cacheprovider tests/test_data_align.py
"""
from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from dsoft_dist.cli import main
from dsoft_dist.data import load_manifest
from dsoft_dist.data.align import TEMPLATE_112, align_face, landmarks_from_68, read_landmark_file, similarity_transform
from dsoft_dist.data.align_folder import align_folder
from dsoft_dist.data.decode import decode_image
from tests.terminal import DSOFT, on_a_terminal

MEAN_BOUND, MAX_BOUND, MARGIN = 0.5, 6.0, 3
COLORS = np.array([[120, -60, -60], [120, -60, -60], [-50, 110, -40], [-40, -60, 130], [-40, -60, 130]], float)


def face(x: np.ndarray, y: np.ndarray, seed: int = 0) -> np.ndarray:
    """The face at template coordinates (x, y) (any shape) -> (..., 3) float in [0, 255]: smooth everywhere."""
    rng = np.random.default_rng(seed)
    phase = rng.uniform(0, 2 * np.pi, (3, 2))
    out = np.empty(x.shape + (3,))
    for c in range(3):
        out[..., c] = 110 + 30 * np.sin(2 * np.pi * x / 53 + phase[c, 0]) + 25 * np.cos(2 * np.pi * y / 41
                                                                                      + phase[c, 1])
    for (px, py), color in zip(TEMPLATE_112, COLORS):
        out += color * np.exp(-((x - px) ** 2 + (y - py) ** 2) / (2 * 4.0 ** 2))[..., None]
    return np.clip(out, 0, 255)


def upright(seed: int = 0, size: int = 112) -> np.ndarray:
    """The face rendered on the template's grid: its five points sit exactly on TEMPLATE_112 (scaled)."""
    ys, xs = np.mgrid[0:size, 0:size] * (112 / size)
    return np.rint(face(xs, ys, seed)).astype(np.uint8)


def pose(angle_deg: float, scale: float, centre: tuple) -> np.ndarray:
    """(2, 3) similarity: template coordinates -> photo coordinates, the template's centre landing on centre."""
    a = np.deg2rad(angle_deg)
    m = np.zeros((2, 3))
    m[:, :2] = scale * np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    m[:, 2] = np.asarray(centre, float) - m[:, :2] @ [55.5, 55.5]
    return m


def photo(matrix: np.ndarray, shape=(260, 300), seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The upright face's square placed in a black canvas by ``matrix``: (H, W, 3) uint8 and its (5, 2) points."""
    inv = np.linalg.inv(np.vstack([matrix, [0, 0, 1]]))[:2]
    v, u = np.mgrid[0:shape[0], 0:shape[1]].astype(float)
    x, y = inv[0, 0] * u + inv[0, 1] * v + inv[0, 2], inv[1, 0] * u + inv[1, 1] * v + inv[1, 2]
    inside = ((x >= -0.5) & (x <= 111.5) & (y >= -0.5) & (y <= 111.5))[..., None]
    img = np.rint(face(x, y, seed) * inside).astype(np.uint8)
    return img, TEMPLATE_112 @ matrix[:, :2].T + matrix[:, 2]


def interior_error(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    d = np.abs(a.astype(float) - b.astype(float))[MARGIN:-MARGIN, MARGIN:-MARGIN]
    return float(d.mean()), float(d.max())


# ---- the math --------------------------------------------------------------------------------

def test_a_rotated_scaled_face_aligns_back_to_the_upright_crop():
    img, pts = photo(pose(25, 1.6, (170, 120)))
    mean, worst = interior_error(align_face(img, pts), upright())
    assert mean < MEAN_BOUND and worst < MAX_BOUND, (mean, worst)
    # the bound has teeth: the same photo aligned on points that ignore the rotation is far off
    unrotated = TEMPLATE_112 @ pose(0, 1.6, (170, 120))[:, :2].T + pose(0, 1.6, (170, 120))[:, 2]
    assert interior_error(align_face(img, unrotated), upright())[0] > 10 * MEAN_BOUND
    # the template scales with the crop size
    small_mean, _ = interior_error(align_face(img, pts, size=96), upright(size=96))
    assert small_mean < MEAN_BOUND


@pytest.mark.parametrize("seed", range(5))
def test_similarity_transform_recovers_known_parameters_exactly(seed):
    rng = np.random.default_rng(seed)
    src = rng.uniform(0, 200, (5, 2))
    m = pose(rng.uniform(-180, 180), rng.uniform(0.2, 5), rng.uniform(-100, 300, 2))
    np.testing.assert_allclose(similarity_transform(src, src @ m[:, :2].T + m[:, 2]), m, rtol=0, atol=1e-9)


def _least_squares_similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The closed form: x' = a x - b y + tx, y' = b x + a y + ty is linear in (a, b, tx, ty), and every such
    map is a rotation times a scale (det = a^2 + b^2 >= 0): ordinary least squares over the four numbers."""
    rows = [[x, -y, 1, 0] for x, y in src] + [[y, x, 0, 1] for x, y in src]
    (a, b, tx, ty), *_ = np.linalg.lstsq(np.array(rows, float), np.concatenate([dst[:, 0], dst[:, 1]]), rcond=None)
    return np.array([[a, -b, tx], [b, a, ty]])


@pytest.mark.parametrize("seed", range(5))
def test_similarity_transform_is_least_squares_with_noise(seed):
    rng = np.random.default_rng(seed)
    src = rng.uniform(0, 150, (5, 2))
    m = pose(rng.uniform(-60, 60), rng.uniform(0.5, 2), (60, 60))
    dst = src @ m[:, :2].T + m[:, 2] + rng.normal(0, 3, (5, 2))
    got = similarity_transform(src, dst)
    np.testing.assert_allclose(got, _least_squares_similarity(src, dst), rtol=0, atol=1e-9)
    assert abs(got - m).max() > 1e-3  # the noise moved it: the comparison is not the noiseless case again


def test_no_reflection_even_for_mirrored_points():
    src = TEMPLATE_112.copy()
    mirrored = src * [-1, 1] + [200, 0]  # a mirror image: the best fit with a reflection would be exact
    got = similarity_transform(src, mirrored)
    assert np.linalg.det(got[:, :2]) > 0
    np.testing.assert_allclose(got, _least_squares_similarity(src, mirrored), rtol=0, atol=1e-9)
    residual = np.abs(src @ got[:, :2].T + got[:, 2] - mirrored).max()
    assert residual > 1.0  # a rotation cannot undo a mirror: the fit is not exact


def test_68_points_reduce_to_five_as_the_ijb_scripts_do(tmp_path):
    p68 = np.random.default_rng(0).uniform(0, 100, (68, 2))
    five = landmarks_from_68(p68)
    np.testing.assert_allclose(five, [(p68[36] + p68[39]) / 2, (p68[42] + p68[45]) / 2, p68[30], p68[48], p68[54]])
    path = tmp_path / "lm.txt"
    path.write_text("a/0.jpg " + " ".join(f"{v:.6f}" for v in p68.ravel()) + " 0.75\n")
    (row,) = read_landmark_file(str(path), need_score=True)
    np.testing.assert_allclose(row.points, five, atol=1e-5)
    assert row.score == 0.75


# ---- dsoft data align ------------------------------------------------------------------------

def _save(img: np.ndarray, path, fmt: str) -> None:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format={"png": "PNG", "jpg": "JPEG"}[fmt], **({"quality": 92} if fmt == "jpg"
                                                                                 else {}))
    path.write_bytes(buf.getvalue())


def _line(rel: str, pts: np.ndarray, score: float | None = 0.99) -> str:
    return f"{rel} {' '.join(f'{v:.4f}' for v in pts.ravel())}" + ("" if score is None else f" {score}") + "\n"


def raw_folder(root, fmt="png", identities=("alice", "bob"), per=3, scores=None) -> str:
    """ROOT/<identity>/<j>.<fmt>: faces photographed at a pose of their own; returns the landmark file's path."""
    lines = []
    for i, name in enumerate(identities):
        (root / name).mkdir(parents=True, exist_ok=True)
        for j in range(per):
            k = i * per + j
            img, pts = photo(pose(-20 + 8 * k, 1.0 + 0.1 * j, (100 + 2 * k, 95)), shape=(190, 200), seed=k)
            _save(img, root / name / f"{j}.{fmt}", fmt)
            lines.append(_line(f"{name}/{j}.{fmt}", pts, None if scores is None else scores.get(f"{name}/{j}", .99)))
    path = root.parent / f"{root.name}_landmarks.txt"
    path.write_text("# image x1 y1 ... x5 y5 score\n" + "".join(lines))
    return str(path)


def _align(root, out, lm, *extra) -> int:
    return main(["data", "align", str(root), str(out), "--landmarks", str(lm), "--no-progress", *extra])


def _files(folder) -> dict[str, bytes]:
    return {os.path.relpath(os.path.join(d, n), folder): open(os.path.join(d, n), "rb").read()
            for d, _, names in os.walk(folder) for n in names}


def _error_line(capfd) -> str:
    lines = [ln for ln in capfd.readouterr().err.splitlines() if "error:" in ln]
    assert len(lines) == 1, lines
    return lines[0]


def test_align_cli_writes_the_folder_layout_that_from_folder_reads(tmp_path):
    lm = raw_folder(tmp_path / "raw")
    assert _align(tmp_path / "raw", tmp_path / "out", lm) == 0
    crops = {k: v for k, v in _files(tmp_path / "out").items() if k != "alignment.json"}
    assert sorted(crops) == [f"{n}/{j}.png" for n in ("alice", "bob") for j in range(3)]
    rows = {r.path: r.points for r in read_landmark_file(lm)}
    for rel, data in crops.items():
        crop = decode_image(data)
        raw = decode_image((tmp_path / "raw" / rel).read_bytes())
        np.testing.assert_array_equal(crop, align_face(raw, rows[rel]))  # PNG kept: lossless, the same code
        assert interior_error(crop, upright(seed=int(rel[-5]) + 3 * rel.startswith("bob")))[0] < MEAN_BOUND
    # the same alignment with 2 processes writes the same bytes
    assert _align(tmp_path / "raw", tmp_path / "out2", lm, "--workers", "2") == 0
    assert _files(tmp_path / "out2") == _files(tmp_path / "out")
    assert main(["data", "from-folder", str(tmp_path / "out"), str(tmp_path / "shards"), "--no-progress"]) == 0
    m = load_manifest(str(tmp_path / "shards"))
    assert (m.num_classes, m.num_samples, m.image_size) == (2, 6, [112, 112])
    assert (tmp_path / "shards" / "classes.tsv").read_text() == "0\talice\n1\tbob\n"


def test_format_and_size_options(tmp_path):
    lm = raw_folder(tmp_path / "raw", identities=("alice",), per=2)
    assert _align(tmp_path / "raw", tmp_path / "out", lm, "--format", "jpg", "--size", "96") == 0
    for j in range(2):
        data = (tmp_path / "out" / "alice" / f"{j}.jpg").read_bytes()
        assert data[:3] == b"\xff\xd8\xff" and decode_image(data).shape == (96, 96, 3)
        assert interior_error(decode_image(data), upright(seed=j, size=96))[0] < 3  # JPEG quality 95 adds a little


def test_from_folder_landmarks_equals_align_then_from_folder(tmp_path, caplog):
    lm = raw_folder(tmp_path / "raw", fmt="jpg")
    (tmp_path / "raw" / "alice" / "extra.jpg").write_bytes((tmp_path / "raw" / "bob" / "0.jpg").read_bytes())
    assert _align(tmp_path / "raw", tmp_path / "aligned", lm) == 0
    convert = ["--per-shard", "4", "--seed", "3", "--no-progress"]
    assert main(["data", "from-folder", str(tmp_path / "aligned"), str(tmp_path / "a"), *convert]) == 0
    assert main(["data", "from-folder", str(tmp_path / "raw"), str(tmp_path / "b"), "--landmarks", lm, *convert]) == 0
    ma, mb = load_manifest(str(tmp_path / "a")), load_manifest(str(tmp_path / "b"))
    assert [s.sha256 for s in ma.shards] == [s.sha256 for s in mb.shards] and len(ma.shards) == 2
    pixels = [[(s["__key__"], int(s["cls"]), decode_image(s["jpg"]).tobytes())
               for s in wds.WebDataset(p, shardshuffle=False)] for p in (ma.shard_paths() + mb.shard_paths())]
    assert pixels[:2] == pixels[2:] and sum(map(len, pixels[:2])) == 6
    assert (tmp_path / "a" / "classes.tsv").read_text() == (tmp_path / "b" / "classes.tsv").read_text()
    assert "align" not in ma.source and mb.source["align"]["size"] == 112 and mb.image_size == [112, 112]
    assert "images without a landmark line: 1" in caplog.text  # alice/extra.jpg: counted, not sharded


def test_from_folder_landmark_options_are_part_of_the_fingerprint(tmp_path, capfd):
    lm = raw_folder(tmp_path / "raw", identities=("alice",), per=2)
    out = str(tmp_path / "wds")
    base = ["data", "from-folder", str(tmp_path / "raw"), out, "--no-progress"]
    assert main(base + ["--landmarks", lm]) == 0
    other = tmp_path / "other.txt"
    other.write_text(open(lm).read() + "# the same faces, another file\n")
    assert main(base + ["--landmarks", str(other)]) == 2
    assert "source.align.landmarks_sha256" in _error_line(capfd)
    assert main(base + ["--landmarks", lm, "--align-size", "96"]) == 2
    assert "source.align.size 112 -> 96" in _error_line(capfd)
    assert main(base + ["--min-score", "0.5"]) == 2
    assert "--min-score apply to --landmarks only" in _error_line(capfd)
    assert main(base + ["--landmarks", lm, "--align-size", "96", "--overwrite"]) == 0
    assert load_manifest(out).image_size == [96, 96]


def _bad_folder(tmp_path) -> str:
    """alice: 0 ok, 1 ok, 2 low score; bob: 0 ok, 1 corrupt, 2 without a line; bob/9 named but absent."""
    lm = raw_folder(tmp_path / "raw", scores={"alice/2": 0.2})
    (tmp_path / "raw" / "bob" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n but then nothing of an image")
    lines = [ln for ln in open(lm) if not ln.startswith("bob/2.png")]
    lines.append(lines[-1].replace("bob/1.png", "bob/9.png"))
    open(lm, "w").writelines(lines)
    return lm


def test_skipped_images_are_counted_by_reason(tmp_path, caplog):
    lm = _bad_folder(tmp_path)
    counts = align_folder(str(tmp_path / "raw"), str(tmp_path / "out"), lm, min_score=0.5, progress=False)
    assert counts == {"aligned": 3, "already": 0, "low_score": 1, "missing_image": 1, "corrupt_image": 1,
                      "unlisted": 1}
    err = caplog.text
    assert "images without a landmark line: 1" in err and "bob/2.png" in err  # named, not silently ignored
    assert f"{lm}:7: bob/9.png is not an image file" in err
    assert "aligned 3 faces of 2 identities" in err
    assert "skipped 3 (low_score 1, missing_image 1, corrupt_image 1)" in err
    assert sorted(_files(tmp_path / "out")) == ["alice/0.png", "alice/1.png", "alignment.json", "bob/0.png"]


def test_bad_data_fail_stops_at_the_first_bad_image(tmp_path, capfd):
    lm = _bad_folder(tmp_path)
    assert _align(tmp_path / "raw", tmp_path / "out", lm, "--bad-data", "fail") == 2
    assert "bob/9.png is not an image file" in _error_line(capfd)
    assert not (tmp_path / "out").exists(), "a missing image is found before OUT is touched"
    lines = [ln for ln in open(lm) if "bob/9.png" not in ln]
    open(lm, "w").writelines(lines)
    assert _align(tmp_path / "raw", tmp_path / "out", lm, "--bad-data", "fail") == 2
    assert "1.png" in _error_line(capfd)


GOOD = " ".join(f"{v:.2f}" for v in TEMPLATE_112.ravel())
BAD_LINES = [
    (f"alice.png {GOOD}\n", "IDENTITY/IMAGE"),  # no identity folder
    (f"alice/x/0.png {GOOD}\n", "IDENTITY/IMAGE"),  # deeper than ROOT/<identity>/<image>
    (f"../raw/alice/0.png {GOOD}\n", "IDENTITY/IMAGE"),
    (f"/abs/alice/0.png {GOOD}\n", "IDENTITY/IMAGE"),
    (f"alice/0.bmp {GOOD}\n", "is not a .jpg/.jpeg/.png/.webp file"),
    ("alice/0.png 1 2 3 4\n", "5 fields"),
    (f"alice/0.png {GOOD} 0.9 7\n", "13 fields"),
    (f"alice/0.png {GOOD.replace('38.29', 'x')}\n", "not a number"),
    ("alice/0.png " + "5 5 " * 5 + "\n", "all one point"),
    (f"alice/0.png {GOOD}\nalice/./0.png {GOOD}\n", "already has landmarks at"),
]


@pytest.mark.parametrize("text,why", BAD_LINES, ids=["no-identity", "deeper", "climbs", "absolute", "bmp",
                                                     "few-fields", "many-fields", "not-a-number", "one-point",
                                                     "twice"])
def test_malformed_landmark_lines_are_refused_naming_the_line(tmp_path, capfd, text, why):
    raw_folder(tmp_path / "raw", identities=("alice",), per=1)
    lm = tmp_path / "lm.txt"
    lm.write_text("# header\n" + text)
    assert _align(tmp_path / "raw", tmp_path / "out", lm) == 2
    line = _error_line(capfd)
    assert why in line and f"{lm}:{text.count(chr(10)) + 1}" in line, line
    assert not (tmp_path / "out").exists()


def test_min_score_needs_scores_and_a_finite_threshold(tmp_path, capfd):
    raw_folder(tmp_path / "raw", identities=("alice",), per=1)
    lm = tmp_path / "lm.txt"
    lm.write_text(f"alice/0.png {GOOD}\n")
    assert _align(tmp_path / "raw", tmp_path / "out", lm, "--min-score", "0.5") == 2
    assert f"{lm}:1" in _error_line(capfd)
    assert _align(tmp_path / "raw", tmp_path / "out", lm, "--min-score", "nan") == 2
    assert "not a finite number" in _error_line(capfd)


# ---- reruns ----------------------------------------------------------------------------------

def test_rerun_resumes_the_same_alignment_and_refuses_another(tmp_path, capfd, caplog):
    raw, out = tmp_path / "raw", tmp_path / "out"
    lm = raw_folder(raw)
    assert _align(raw, out, lm) == 0
    before = _files(out)
    assert _align(raw, out, lm) == 0 and _files(out) == before  # a finished alignment: nothing to write
    assert "nothing to write: 6 of 6 crops" in caplog.text
    # an interrupted run: a crop missing, another half-written under its temporary name
    (out / "bob" / "2.png").unlink()
    (out / "alice" / "1.png.tmp.4242").write_bytes(b"half a crop")
    assert _align(raw, out, lm) == 0 and _files(out) == before
    # other landmarks, another size, or images changed: refused, OUT as it was
    shifted = tmp_path / "shifted.txt"
    shifted.write_text("".join(ln for ln in open(lm) if not ln.startswith("bob/2")))
    assert _align(raw, out, shifted) == 2
    line = _error_line(capfd)
    assert "holds another alignment" in line and "landmarks.sha256" in line and "--overwrite" in line
    assert _align(raw, out, lm, "--size", "96") == 2
    assert "size 112 -> 96" in _error_line(capfd)
    (raw / "alice" / "0.png").write_bytes((raw / "alice" / "0.png").read_bytes() + b"\0")
    assert _align(raw, out, lm) == 2
    assert "source.listing" in _error_line(capfd)
    assert _files(out) == before
    # --overwrite replaces it: the crop of the image no longer listed is gone, not left stale
    assert _align(raw, out, shifted, "--overwrite") == 0
    assert sorted(_files(out)) == sorted(set(before) - {"bob/2.png"})
    assert json.loads((out / "alignment.json").read_text())["spec"]["landmarks"]["path"] == str(shifted)


def test_out_that_is_not_an_alignment_or_overlaps_root_is_refused(tmp_path, capfd):
    raw = tmp_path / "raw"
    lm = raw_folder(raw, identities=("alice",), per=1)
    (tmp_path / "busy" / "things").mkdir(parents=True)
    assert _align(raw, tmp_path / "busy", lm) == 2
    assert "no alignment.json" in _error_line(capfd)
    for out in (raw, raw / "aligned", tmp_path):
        assert _align(raw, out, lm) == 2
        assert "one holds the other" in _error_line(capfd)
    assert _files(raw).keys() == {"alice/0.png"}


def test_align_draws_a_bar_on_a_terminal_only(tmp_path, capfd):
    lm = raw_folder(tmp_path / "raw")
    assert main(["data", "align", str(tmp_path / "raw"), str(tmp_path / "quiet"), "--landmarks", lm]) == 0
    err = capfd.readouterr().err
    assert "\r" not in err and "img/s" not in err, err  # redirected: log lines only
    rc, drawn = on_a_terminal([DSOFT, "data", "align", str(tmp_path / "raw"), str(tmp_path / "out"), "--landmarks",
                               lm], timeout=60)
    assert rc == 0, drawn
    assert "aligning" in drawn and "6/6" in drawn and "aligned 6 faces" in drawn, drawn
