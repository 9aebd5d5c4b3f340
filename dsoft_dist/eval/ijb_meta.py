"""The IJB-B / IJB-C release layout: reads and checks every meta file before any image is embedded.

    from dsoft_dist.eval.ijb_meta import load_layout
    layout = load_layout("/data/IJB_release/IJBC", "IJBC")
    layout.names[i], layout.landmarks[i] (5, 2), layout.scores[i], layout.templates[i], layout.medias[i]
    layout.pair_t1, layout.pair_t2, layout.pair_labels           # (M,) int64 each
    layout.gallery, layout.probes                                 # SubjectList, or None without the 1:N lists

The layout (``ROOT`` is ``--ijb ROOT``, ``t`` is ``ijbc`` or ``ijbb``)::

    ROOT/loose_crop/<image>                  the images the meta files name
    ROOT/meta/t_face_tid_mid.txt             image_name template_id media_id      (one line per image)
    ROOT/meta/t_name_5pts_score.txt          image_name x1 y1 ... x5 y5 score     (same images, same order)
    ROOT/meta/t_template_pair_label.txt      template_id_1 template_id_2 label    (1:1 pairs, 1 = same subject)
    ROOT/meta/t_1N_gallery_G1.csv, _G2.csv   TEMPLATE_ID,SUBJECT_ID,...           (IJB-B: _S1.csv, _S2.csv)
    ROOT/meta/t_1N_probe_mixed.csv           TEMPLATE_ID,SUBJECT_ID,...           (the three 1:N lists are optional)

A bad layout raises FileNotFoundError or ValueError naming the file and, for a bad line, ``file:line``:
a missing meta file or image, a malformed line, two lists that name different images, a template
(in the pair list or a 1:N list) without any image, a probe subject without exactly one gallery template.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from dsoft_dist.data.align import data_lines, read_landmark_file
from dsoft_dist.eval.ijb_protocol import mate_counts

TARGETS = ("IJBC", "IJBB")
GALLERY_SETS = {"IJBC": ("G1", "G2"), "IJBB": ("S1", "S2")}  # the two gallery lists of each release


@dataclass(frozen=True)
class SubjectList:
    """A 1:N list (gallery or probes): one row per distinct template, in ascending template id.

    templates (K,) int64 and subjects (K,) int64: the subject of the template's first row (as the
    standard script reads it); where: "file:line" of that first row, for messages.
    """

    templates: np.ndarray
    subjects: np.ndarray
    where: list


@dataclass(frozen=True)
class IJBLayout:
    """Everything the meta files say, checked (see the module doc). N images, M pairs."""

    root: str
    target: str
    image_dir: str
    names: list  # (N,) image names relative to image_dir
    landmarks: np.ndarray  # (N, 5, 2) float64 x/y pixels
    scores: np.ndarray  # (N,) float32 detector scores (the standard script reads them as float32)
    templates: np.ndarray  # (N,) int64 template id of each image
    medias: np.ndarray  # (N,) int64 media id of each image
    pair_t1: np.ndarray  # (M,) int64
    pair_t2: np.ndarray  # (M,) int64
    pair_labels: np.ndarray  # (M,) int64, 1 = same subject, 0 = different
    gallery: SubjectList | None
    probes: SubjectList | None
    landmark_file: str

    def where(self, index: int) -> str:
        """'file:line' of image ``index`` in the landmark file (data lines only: blank/comment lines skipped)."""
        return f"{self.landmark_file}:{_data_line(self.landmark_file, index)}"


def meta_path(root: str, target: str, what: str) -> str:
    """ROOT/meta/<target lowercased>_<what>, e.g. meta_path(root, "IJBC", "face_tid_mid.txt")."""
    return os.path.join(root, "meta", f"{target.lower()}_{what}")


def meta_file(root: str, target: str, what: str) -> str:
    """meta_path, which must exist: FileNotFoundError naming it (and --ijb-target when the other release's is there)."""
    path = meta_path(root, target, what)
    if os.path.isfile(path):
        return path
    other = [t for t in TARGETS if t != target and os.path.isfile(meta_path(root, t, what))]
    hint = (f"; the folder holds {other[0]}'s files: pass --ijb-target {other[0]}" if other else
            f"; --ijb ROOT must be the {target} release folder holding loose_crop/ and meta/")
    raise FileNotFoundError(f"IJB meta file {path} does not exist{hint}")


def _data_line(path: str, index: int) -> int:
    """The 1-based file line of the index-th data line (blank lines and '#' comments skipped)."""
    for seen, (_, _, number) in enumerate(data_lines(path)):
        if seen == index:
            return number
    raise ValueError(f"{path} has no data line {index}")


def _ints(fields: list, where: str, what: str) -> list[int]:
    try:
        return [int(f) for f in fields]
    except ValueError:
        raise ValueError(f"{where}: {' '.join(fields)!r} is not {what} (integers)") from None


def read_tid_mid(path: str) -> tuple[list[str], np.ndarray, np.ndarray, list[int]]:
    """``image_name template_id media_id`` lines -> (names, templates (N,), medias (N,), line numbers).

    Blank lines and '#' comments are skipped (as in the landmark file). ValueError names ``file:line``.
    """
    names, ids, lines = [], [], []
    for fields, where, number in data_lines(path):
        if len(fields) != 3:
            raise ValueError(f"{where}: {len(fields)} fields in {' '.join(fields)[:80]!r}: a line is "
                             "'image_name template_id media_id'")
        names.append(fields[0])
        ids.append(_ints(fields[1:], where, "a template id and a media id"))
        lines.append(number)
    if not names:
        raise ValueError(f"{path} names no image: a line is 'image_name template_id media_id'")
    ids = np.asarray(ids, dtype=np.int64).reshape(-1, 2)
    return names, ids[:, 0].copy(), ids[:, 1].copy(), lines


def _pairs_slow(path: str) -> np.ndarray:
    """The line-by-line reading of a pair list, for its error message naming the bad line."""
    rows = []
    for fields, where, _ in data_lines(path):
        if len(fields) != 3:
            raise ValueError(f"{where}: {len(fields)} fields in {' '.join(fields)[:80]!r}: a line is "
                             "'template_id_1 template_id_2 label'")
        rows.append(_ints(fields, where, "two template ids and a label"))
    return np.asarray(rows, dtype=np.int64).reshape(-1, 3)


def read_pairs(path: str) -> np.ndarray:
    """``template_id_1 template_id_2 label`` lines -> (M, 3) int64, labels checked to be 0 or 1.

    IJB-C has 15.6M lines: numpy's C reader takes them; any line it refuses is found and named
    (``file:line``) by a line-by-line pass.
    """
    try:
        pairs = np.loadtxt(path, dtype=np.int64, ndmin=2, comments="#")
    except ValueError:
        pairs = _pairs_slow(path)  # raises naming the line
    if pairs.size == 0:
        raise ValueError(f"{path} holds no pair: a line is 'template_id_1 template_id_2 label'")
    if pairs.shape[1] != 3:
        _pairs_slow(path)
    bad = np.flatnonzero((pairs[:, 2] != 0) & (pairs[:, 2] != 1))
    if bad.size:
        raise ValueError(f"{path}:{_data_line(path, int(bad[0]))}: label {pairs[bad[0], 2]} is not 0 (different "
                         "subjects) or 1 (same subject)")
    for label, kind in ((1, "same-subject"), (0, "different-subject")):
        if not (pairs[:, 2] == label).any():
            raise ValueError(f"{path} has no {kind} pair (label {label}): a ROC needs both kinds")
    return pairs


def read_subject_list(path: str) -> SubjectList:
    """A 1:N csv (``TEMPLATE_ID,SUBJECT_ID,...`` after a header line) -> its distinct templates, ascending.

    A template listed with two subject ids raises ValueError naming both lines.
    """
    first: dict[int, tuple[int, str]] = {}
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            fields = [f.strip() for f in line.split(",")]
            if not line.strip() or (number == 1 and not fields[0].lstrip("-").isdigit()):
                continue  # the header (TEMPLATE_ID,SUBJECT_ID,FILENAME,...)
            where = f"{path}:{number}"
            if len(fields) < 2:
                raise ValueError(f"{where}: {line.strip()[:80]!r} has no SUBJECT_ID: a line is "
                                 "'TEMPLATE_ID,SUBJECT_ID,...'")
            template, subject = _ints(fields[:2], where, "TEMPLATE_ID,SUBJECT_ID")
            seen = first.setdefault(template, (subject, where))
            if seen[0] != subject:
                raise ValueError(f"{where}: template {template} has subject {subject}, but {seen[1]} gives it "
                                 f"subject {seen[0]}: a template belongs to one subject")
    if not first:
        raise ValueError(f"{path} lists no template: a line is 'TEMPLATE_ID,SUBJECT_ID,...' after the header")
    templates = np.array(sorted(first), dtype=np.int64)
    return SubjectList(templates, np.array([first[t][0] for t in templates], dtype=np.int64),
                       [first[t][1] for t in templates])


def _merge(lists: list[SubjectList]) -> SubjectList:
    """Several lists as one (the gallery = G1 + G2): distinct templates, ascending, first row wins."""
    rows: dict[int, tuple[int, str]] = {}
    for part in lists:
        for t, s, w in zip(part.templates.tolist(), part.subjects.tolist(), part.where):
            if rows.setdefault(t, (s, w))[0] != s:
                raise ValueError(f"{w}: template {t} has subject {s}, but {rows[t][1]} gives it subject "
                                 f"{rows[t][0]}: a template belongs to one subject")
    templates = np.array(sorted(rows), dtype=np.int64)
    return SubjectList(templates, np.array([rows[t][0] for t in templates], dtype=np.int64),
                       [rows[t][1] for t in templates])


def _check_same_images(names: list, tid_lines: list, tid_path: str, rows: list, lmk_path: str) -> None:
    """The two per-image lists must name the same images in the same order (the protocol pairs them by row)."""
    for i, (name, row) in enumerate(zip(names, rows)):
        if name != row.path:
            raise ValueError(f"{tid_path}:{tid_lines[i]} names {name!r} but {row.where} names {row.path!r}: both "
                             "lists hold one line per image, in the same order")
    if len(rows) != len(names):
        raise ValueError(f"{tid_path} names {len(names)} images but {lmk_path} names {len(rows)}: both lists hold "
                         "one line per image, in the same order")


def _check_images_exist(image_dir: str, rows: list) -> None:
    if not os.path.isdir(image_dir):
        raise FileNotFoundError(f"IJB image folder {image_dir} does not exist: --ijb ROOT must hold loose_crop/ "
                                "(the release's face images) beside meta/")
    for row in rows:
        if not os.path.isfile(os.path.join(image_dir, row.path)):
            raise FileNotFoundError(f"{row.where}: image {row.path} is not in {image_dir}: restore it (the "
                                    "release's loose_crop/ holds every image the meta files name)")


def _check_templates_known(templates: np.ndarray, known: np.ndarray, where, what: str) -> None:
    """Every id in ``templates`` must be in ``known`` (sorted); ``where(i)`` names the row of the first missing."""
    missing = np.flatnonzero(~np.isin(templates, known))
    if missing.size:
        i = int(missing[0])
        raise ValueError(f"{where(i)}: template {templates[i]} has no image in the face_tid_mid list "
                         f"({missing.size} {what} lack one): check that the meta files come from one release")


def _check_mates(gallery: SubjectList, probes: SubjectList) -> None:
    """Every probe's subject has exactly one gallery template (the standard 1:N protocol's mate)."""
    _, n = mate_counts(gallery.subjects, probes.subjects)
    bad = np.flatnonzero(n != 1)
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"{probes.where[i]}: probe template {probes.templates[i]} of subject {probes.subjects[i]} "
                         f"has {n[i]} gallery templates of its subject ({bad.size} probes are like it): the 1:N "
                         "protocol needs exactly one per probe subject in the two gallery lists together")


def _read_one_to_n(root: str, target: str) -> tuple[SubjectList | None, SubjectList | None]:
    """The gallery (both lists merged) and the probes; (None, None) when none of the three files is there."""
    names = [f"1N_gallery_{g}.csv" for g in GALLERY_SETS[target]] + ["1N_probe_mixed.csv"]
    present = [os.path.isfile(meta_path(root, target, n)) for n in names]
    if not any(present):
        return None, None
    if not all(present):
        missing = [meta_path(root, target, n) for n, p in zip(names, present) if not p]
        raise FileNotFoundError(f"IJB 1:N list {missing[0]} does not exist while "
                                f"{meta_path(root, target, names[present.index(True)])} does: the 1:N protocol "
                                "needs all three lists (remove them all for 1:1 only)")
    lists = [read_subject_list(meta_path(root, target, n)) for n in names]
    return _merge(lists[:2]), lists[2]


def load_layout(root: str, target: str = "IJBC") -> IJBLayout:
    """Reads and checks ROOT's meta files and the presence of every image (see the module doc)."""
    if target not in TARGETS:
        raise ValueError(f"IJB target {target!r} is invalid: use one of {', '.join(TARGETS)}")
    if not os.path.isdir(root):
        raise FileNotFoundError(f"--ijb {root} does not exist: pass the {target} release folder (loose_crop/, meta/)")
    tid_path = meta_file(root, target, "face_tid_mid.txt")
    lmk_path = meta_file(root, target, "name_5pts_score.txt")
    pair_path = meta_file(root, target, "template_pair_label.txt")
    names, templates, medias, tid_lines = read_tid_mid(tid_path)
    rows = read_landmark_file(lmk_path, need_score=True)
    _check_same_images(names, tid_lines, tid_path, rows, lmk_path)
    image_dir = os.path.join(root, "loose_crop")
    _check_images_exist(image_dir, rows)
    pairs = read_pairs(pair_path)
    known = np.unique(templates)
    for col in (0, 1):
        _check_templates_known(pairs[:, col], known, lambda i: f"{pair_path}:{_data_line(pair_path, i)}", "pairs")
    gallery, probes = _read_one_to_n(root, target)
    if gallery is not None:
        for part in (gallery, probes):
            _check_templates_known(part.templates, known, lambda i, p=part: p.where[i], "templates of that list")
        _check_mates(gallery, probes)
    return IJBLayout(root=root, target=target, image_dir=image_dir, names=names,
                     landmarks=np.stack([r.points for r in rows]), scores=np.array([r.score for r in rows], np.float32),
                     templates=templates, medias=medias, pair_t1=pairs[:, 0].copy(), pair_t2=pairs[:, 1].copy(),
                     pair_labels=pairs[:, 2].copy(), gallery=gallery, probes=probes, landmark_file=lmk_path)
