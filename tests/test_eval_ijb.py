"""`dsoft eval --ijb`: a small IJB-C-layout folder, every figure against a plain numpy transcription of the protocol.

The folder (written once per module): 4 subjects x 4 templates (one gallery, three probes), one to three
media per template, some media of two frames; face-like images (data.synthetic) warped by random
similarity transforms onto larger canvases, some then rotated by 90/180/270 degrees and padded to
non-square sizes, with the five landmarks moved the same way; detector scores in (0.5, 1]; PNG and JPEG
files; the meta files in the release format, including the 1:N lists. The transcription below pools,
scores and reads the figures on its own (loops over templates, a threshold sweep for the ROC, a full
similarity matrix for 1:N); it shares only the embeddings of the aligned crops with the code under test.
"""
import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import roc_curve as sk_roc_curve

from dsoft_dist.cli import main
from dsoft_dist.data.align import TEMPLATE_112, align_face, warp_affine
from dsoft_dist.data.decode import decode_image
from dsoft_dist.data.synthetic import SyntheticIdentities
from dsoft_dist.errors import USER_ERROR_EXIT
from dsoft_dist.eval.roc import tar_at_far_nearest
from dsoft_dist.models import build_model, save_backbone

FARS = [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1]
SUBJECTS, TEMPLATES_PER_SUBJECT = 4, 4
MODEL_CFG = {"name": "iresnet_tiny", "embedding_size": 16, "input_size": 112}


def place(face, rng, number):
    """The face warped onto a larger canvas (rotation, scale, shift), maybe rotated by k * 90 degrees and padded;
    returns (image, its five landmarks (5, 2))."""
    angle, scale = np.deg2rad(rng.uniform(-30, 30)), rng.uniform(0.8, 1.25)
    rot = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    shift = np.array([72.0, 72.0]) + rng.uniform(-10, 10, 2) - rot @ np.array([56.0, 56.0])
    matrix = np.c_[rot, shift]
    image, points = warp_affine(face, matrix, 144), TEMPLATE_112 @ rot.T + shift
    for _ in range(number % 4):  # np.rot90: (x, y) -> (y, W - 1 - x)
        points = np.c_[points[:, 1], image.shape[1] - 1 - points[:, 0]]
        image = np.rot90(image)
    pad = ((0, int(rng.integers(0, 20))), (0, int(rng.integers(0, 30))), (0, 0))
    return np.ascontiguousarray(np.pad(image, pad)), points


def write_layout(root, seed=0):
    """Writes the IJB-C release layout under root (read back by read_meta)."""
    rng, synth = np.random.default_rng(seed), SyntheticIdentities(SUBJECTS, image_size=112, seed=5, difficulty="easy")
    os.makedirs(root / "loose_crop")
    os.makedirs(root / "meta")
    tid_lines, lmk_lines, csv_rows, templates, number, media = [], [], {"G1": [], "G2": [], "probe": []}, [], 0, 0
    for subject in range(SUBJECTS):
        for k in range(TEMPLATES_PER_SUBJECT):
            tid = 100 + 10 * subject + k
            templates.append((tid, subject))
            role = ("G1" if subject < SUBJECTS // 2 else "G2") if k == 0 else "probe"
            for m in range(1 + int((subject + k) % 3 == 0) + int(subject == k == 1)):  # 1 to 3 media
                media += 1
                for _ in range(2 if (subject + k + m) % 5 == 0 else 1):  # some media have two frames
                    number += 1
                    image, points = place(synth.sample(subject, number), rng, number)
                    name = f"{number}.jpg" if number % 3 == 0 else f"{number}.png"
                    Image.fromarray(image).save(root / "loose_crop" / name, quality=95)
                    score = 1.0 if number % 7 == 0 else float(rng.uniform(0.5, 1.0))
                    tid_lines.append(f"{name} {tid} {5000 + media}")
                    lmk_lines.append(" ".join([name] + [f"{v:.3f}" for v in points.ravel()] + [f"{score:.5f}"]))
                    csv_rows[role].append(f"{tid},{7000 + subject},{name}")
    pairs = [(a, b, int(sa == sb)) for i, (a, sa) in enumerate(templates) for b, sb in templates[i + 1:]]
    meta = root / "meta"
    (meta / "ijbc_face_tid_mid.txt").write_text("\n".join(tid_lines) + "\n")
    (meta / "ijbc_name_5pts_score.txt").write_text("\n".join(lmk_lines) + "\n")
    (meta / "ijbc_template_pair_label.txt").write_text("".join(f"{a} {b} {y}\n" for a, b, y in pairs))
    for role, name in (("G1", "1N_gallery_G1"), ("G2", "1N_gallery_G2"), ("probe", "1N_probe_mixed")):
        (meta / f"ijbc_{name}.csv").write_text("TEMPLATE_ID,SUBJECT_ID,FILENAME\n" + "\n".join(csv_rows[role]) + "\n")


def read_meta(root):
    """The meta files read back plainly: per-image names, landmarks, scores, tid, mid; pairs; the 1:N rows."""
    meta = root / "meta"
    tid = [line.split() for line in (meta / "ijbc_face_tid_mid.txt").read_text().splitlines()]
    lmk = [line.split() for line in (meta / "ijbc_name_5pts_score.txt").read_text().splitlines()]
    assert [t[0] for t in tid] == [m[0] for m in lmk]
    csv = {name: [tuple(int(v) for v in line.split(",")[:2]) for line in
                  (meta / f"ijbc_1N_{name}.csv").read_text().splitlines()[1:]]
           for name in ("gallery_G1", "gallery_G2", "probe_mixed")}
    return {"names": [m[0] for m in lmk], "landmarks": [np.array(m[1:11], float).reshape(5, 2) for m in lmk],
            "scores": np.array([m[11] for m in lmk], dtype=np.float32), "tid": [int(t[1]) for t in tid],
            "mid": [int(t[2]) for t in tid],
            "pairs": [tuple(int(v) for v in line.split()) for line in
                      (meta / "ijbc_template_pair_label.txt").read_text().splitlines()],
            "gallery": csv["gallery_G1"] + csv["gallery_G2"], "probes": csv["probe_mixed"]}


@pytest.fixture(scope="module")
def ijb(tmp_path_factory):
    """(root, checkpoint, meta, the raw embeddings of each aligned crop and of its mirror, made as the reference
    script makes them)."""
    root = tmp_path_factory.mktemp("ijb") / "IJBC"
    write_layout(root)
    torch.manual_seed(0)
    model = build_model(**MODEL_CFG).eval()
    ckpt = str(root.parent / "backbone.pt")
    save_backbone(ckpt, model, MODEL_CFG)
    meta = read_meta(root)
    crops = np.stack([align_face(decode_image((root / "loose_crop" / n).read_bytes()), p)
                      for n, p in zip(meta["names"], meta["landmarks"])])
    x = (torch.from_numpy(crops).permute(0, 3, 1, 2).float() / 255.0 - 0.5) / 0.5  # the reference's input scaling
    with torch.inference_mode():
        plain, mirror = model(x).double().numpy(), model(torch.flip(x, dims=[3])).double().numpy()
    return root, ckpt, meta, plain, mirror


# ----------------------------------------------------------------------------- the transcription

def pool_templates(emb, meta, use_score=True, normalize=False):
    """{template: unit feature}: (norm,) x score per image, mean per media, sum per template, L2-normalized."""
    feats = emb / np.linalg.norm(emb, axis=1, keepdims=True) if normalize else emb
    if use_score:
        feats = feats * meta["scores"][:, None].astype(np.float64)
    out = {}
    for t in sorted(set(meta["tid"])):
        medias = {}
        for i, (ti, mi) in enumerate(zip(meta["tid"], meta["mid"])):
            if ti == t:
                medias.setdefault(mi, []).append(feats[i])
        total = sum(np.mean(rows, axis=0) for rows in medias.values())
        out[t] = total / np.linalg.norm(total)
    return out


def sklearn_style_roc(scores, labels):
    """sklearn's default roc_curve, written out: a vertex per distinct threshold (accept score >= t), collinear
    vertices dropped, (0, 0) prepended."""
    thresholds = sorted(set(scores), reverse=True)
    fp = [sum(1 for s, y in zip(scores, labels) if s >= t and not y) for t in thresholds]
    tp = [sum(1 for s, y in zip(scores, labels) if s >= t and y) for t in thresholds]
    keep = [i for i in range(len(fp)) if i in (0, len(fp) - 1)
            or fp[i - 1] - 2 * fp[i] + fp[i + 1] != 0 or tp[i - 1] - 2 * tp[i] + tp[i + 1] != 0]
    return [0.0] + [fp[i] / fp[-1] for i in keep], [0.0] + [tp[i] / tp[-1] for i in keep]


def nearest_reading(fpr, tpr, target):
    """The vertex with the FAR nearest the target; on a tie the later vertex (arcface_torch's flip-then-min)."""
    best = 0
    for i in range(len(fpr)):
        if abs(fpr[i] - target) <= abs(fpr[best] - target):
            best = i
    return tpr[best], fpr[best]


def one_to_n(tfeat, meta, fpirs=(0.01, 0.1), ranks=(1, 5, 10)):
    """ijb_1n.py's figures: full similarity matrix, argsort ranks, global non-mate threshold."""
    def unique(rows):
        first = {}
        for t, s in rows:
            first.setdefault(t, s)
        return sorted(first), [first[t] for t in sorted(first)]

    g_t, g_s = unique(meta["gallery"])
    p_t, p_s = unique(meta["probes"])
    sim = np.stack([tfeat[t] for t in p_t]) @ np.stack([tfeat[t] for t in g_t]).T
    mate = [g_s.index(s) for s in p_s]
    position = [list(np.argsort(-sim[i])).index(mate[i]) for i in range(len(p_t))]
    negatives = sorted((sim[i, j] for i in range(len(p_t)) for j in range(len(g_t)) if j != mate[i]), reverse=True)
    mates = np.array([sim[i, mate[i]] for i in range(len(p_t))])
    return {"tpir_at_fpir": {str(f): float(np.mean(mates > negatives[math.ceil(len(p_t) * f) - 1])) for f in fpirs},
            "rank": {str(k): float(np.mean(np.array(position) < k)) for k in ranks},
            "probes": len(p_t), "gallery": len(g_t)}


def transcribe(ijb, flip=True, use_score=True, normalize=False):
    _, _, meta, plain, mirror = ijb
    tfeat = pool_templates(plain + mirror if flip else plain, meta, use_score, normalize)
    scores = [float(tfeat[a] @ tfeat[b]) for a, b, _ in meta["pairs"]]
    fpr, tpr = sklearn_style_roc(scores, [y == 1 for _, _, y in meta["pairs"]])
    read = {str(f): nearest_reading(fpr, tpr, f) for f in FARS}
    return {"tar_at_far": {k: v[0] for k, v in read.items()}, "far_read": {k: v[1] for k, v in read.items()},
            "auc": float(np.trapezoid(tpr, fpr)), "templates": len(tfeat), "pairs": len(scores),
            "images": len(meta["names"]), "identification": one_to_n(tfeat, meta)}


def assert_same_figures(got, want):
    for key in ("templates", "pairs", "images"):
        assert got[key] == want[key], key
    assert got["tar_at_far"] == pytest.approx(want["tar_at_far"], abs=1e-12)
    assert got["far_read"] == pytest.approx(want["far_read"], abs=1e-12)
    assert got["auc"] == pytest.approx(want["auc"], abs=1e-9)
    ident, want_ident = got["identification"], want["identification"]
    assert (ident["probes"], ident["gallery"]) == (want_ident["probes"], want_ident["gallery"])
    assert ident["tpir_at_fpir"] == pytest.approx(want_ident["tpir_at_fpir"], abs=1e-12)
    assert ident["rank"] == pytest.approx(want_ident["rank"], abs=1e-12)


def run_cli(argv, capfd):
    capfd.readouterr()
    code = main(argv)
    out, err = capfd.readouterr()
    return code, out, err


# ----------------------------------------------------------------------------- tests

def test_placed_faces_align_back_by_their_moved_landmarks():
    """The fixture's rotated / scaled / padded images carry landmarks that still find the face."""
    rng = np.random.default_rng(1)
    face = SyntheticIdentities(1, image_size=112, seed=5, difficulty="easy").sample(0, 0).astype(float)
    for number in range(4):  # 0, 90, 180 and 270 degrees
        image, points = place(face.astype(np.uint8), rng, number)
        back = np.median(np.abs(align_face(image, points) - face))  # the median ignores a corner cut off
        wrong = np.median(np.abs(align_face(image, points[::-1]) - face))  # the landmarks in the wrong order
        assert back <= 2 and wrong > 20, (number, back, wrong)


def test_cli_figures_match_the_transcription(ijb, tmp_path, capfd):
    root, ckpt, meta, _, _ = ijb
    assert len(set(zip(meta["tid"], meta["mid"]))) > len(set(meta["tid"]))  # several media per template
    assert len(meta["names"]) > len(set(zip(meta["tid"], meta["mid"])))  # some media hold several frames
    code, out, _ = run_cli(["eval", "--checkpoint", ckpt, "--ijb", str(root), "--ijb-target", "IJBC", "--report",
                            str(tmp_path / "report"), "--batch-size", "16"], capfd)
    assert code == 0
    assert "IJB 1:1" in out and "TAR%@0.0001" in out and "IJB 1:N" in out and "rank-1%" in out
    results = json.loads((tmp_path / "report" / "results.json").read_text())
    got = results["ijb"]["IJBC"]
    assert set(got["tar_at_far"]) == {"1e-06", "1e-05", "0.0001", "0.001", "0.01", "0.1"}
    assert_same_figures(got, transcribe(ijb))
    assert got["options"] == {"flip": True, "detector_score": True, "normalize_images": False}
    assert (tmp_path / "report" / "ijb_roc.png").read_bytes()[:4] == b"\x89PNG"
    assert "| IJBC |" in (tmp_path / "report" / "results.md").read_text()


@pytest.mark.parametrize("flags,options", [
    (["--no-flip"], dict(flip=False)),
    (["--ijb-no-score"], dict(use_score=False)),
    (["--ijb-normalize"], dict(normalize=True)),
], ids=["no-flip", "no-score", "normalize"])
def test_switches_change_figures_as_the_transcription_predicts(ijb, tmp_path, capfd, flags, options):
    root, ckpt, _, _, _ = ijb
    want, standard = transcribe(ijb, **options), transcribe(ijb)
    assert want["auc"] != standard["auc"]  # the switch matters on this data, so ignoring it would fail below
    code, _, _ = run_cli(["eval", "--checkpoint", ckpt, "--ijb", str(root), "--report", str(tmp_path)] + flags, capfd)
    assert code == 0
    assert_same_figures(json.loads((tmp_path / "results.json").read_text())["ijb"]["IJBC"], want)


def test_nearest_far_reading_is_sklearn_plus_arcface_torchs_rule():
    """tar_at_far_nearest == sklearn's roc_curve read by eval_ijbc.py's flip + min(zip(|fpr - x|, index))."""
    rng = np.random.default_rng(0)
    for trial in range(60):
        n = int(rng.integers(6, 300))
        y = rng.random(n) < 0.4
        y[:2] = [True, False]
        s = np.round(rng.normal(size=n) + y, int(rng.integers(0, 3)))  # rounding makes ties and collinear runs
        fpr, tpr, _ = sk_roc_curve(y, s)
        fpr, tpr = np.flipud(fpr), np.flipud(tpr)
        want = {x: tpr[min(zip(abs(fpr - x), range(len(fpr))))[1]] for x in FARS + [0.25, 0.5]}
        assert tar_at_far_nearest(s, y, FARS + [0.25, 0.5]) == want, trial


def edit(path, change):
    """Rewrites a text file's lines through change(lines) -> lines."""
    path.write_text("\n".join(change(path.read_text().splitlines())) + "\n")


def set_line(name, index, make):
    """A change for BAD_LAYOUTS: line ``index`` of meta file ijbc_<name> becomes make(old line)."""
    return lambda root: edit(root / "meta" / f"ijbc_{name}", lambda ls: ls[:index] + [make(ls[index])] + ls[index + 1:])


def remove(relative):
    return lambda root: (root / relative).unlink()


META = "meta/ijbc_"
BAD_LAYOUTS = {  # name -> (change the copied folder, the text the one error line must hold)
    "missing meta file": (remove(f"{META}template_pair_label.txt"), f"{META}template_pair_label.txt does not exist"),
    "missing image": (remove("loose_crop/3.jpg"), f"{META}name_5pts_score.txt:3: image 3.jpg is not in"),
    "tid/mid line": (set_line("face_tid_mid.txt", 4, lambda line: line.rsplit(" ", 1)[0]),
                     f"{META}face_tid_mid.txt:5: 2 fields"),
    "pair line": (lambda r: edit(r / f"{META}template_pair_label.txt",
                                 lambda ls: ["# t1 t2 label", ""] + ls[:9] + ["100 x 1"] + ls[10:]),
                  f"{META}template_pair_label.txt:12: '100 x 1' is not"),
    "pair label": (set_line("template_pair_label.txt", 2, lambda line: line[:-1] + "2"),
                   f"{META}template_pair_label.txt:3: label 2"),
    "landmark line": (set_line("name_5pts_score.txt", 3, lambda line: line.rsplit(" ", 2)[0]),
                      f"{META}name_5pts_score.txt:4: 10 fields"),
    "template without image": (lambda r: edit(r / f"{META}template_pair_label.txt", lambda ls: ls + ["100 999 0"]),
                               f"{META}template_pair_label.txt:121: template 999 has no image"),
    "lists disagree": (lambda r: edit(r / f"{META}name_5pts_score.txt", lambda ls: [ls[0], ls[2], ls[1]] + ls[3:]),
                       f"{META}face_tid_mid.txt:2 names '2.png' but"),
    "lists differ in length": (lambda r: edit(r / f"{META}name_5pts_score.txt", lambda ls: ls[:-1]), "images but"),
    "1:N list missing": (remove(f"{META}1N_gallery_G2.csv"), f"{META}1N_gallery_G2.csv does not exist"),
    "1:N template without image": (set_line("1N_probe_mixed.csv", 1, lambda line: "999" + line[line.index(","):]),
                                   f"{META}1N_probe_mixed.csv:2: template 999 has no image"),
    "probe subject without gallery": (set_line("1N_probe_mixed.csv", 1, lambda line: line.replace(",700", ",799", 1)),
                                      f"{META}1N_probe_mixed.csv:2: probe template"),
    "corrupt image": (lambda r: (r / "loose_crop" / "2.png").write_bytes(b"not an image"),
                      f"{META}name_5pts_score.txt:2: image"),
}


@pytest.mark.parametrize("case", sorted(BAD_LAYOUTS))
def test_bad_layout_is_one_line(ijb, tmp_path, capfd, case):
    root, ckpt, _, _, _ = ijb
    copy = tmp_path / "IJBC"
    shutil.copytree(root, copy)
    change, token = BAD_LAYOUTS[case]
    change(copy)
    code, out, err = run_cli(["eval", "--checkpoint", ckpt, "--ijb", str(copy), "--no-progress"], capfd)
    assert code == USER_ERROR_EXIT, out + err
    named = [line for line in err.splitlines() if token in line]
    assert len(named) == 1 and named[0].startswith("dsoft eval: error: "), err
    assert "Traceback" not in err and len([line for line in err.splitlines() if "error" in line]) == 1, err


def test_wrong_target_names_the_right_one(ijb, capfd):
    root, ckpt, _, _, _ = ijb
    code, _, err = run_cli(["eval", "--checkpoint", ckpt, "--ijb", str(root), "--ijb-target", "IJBB"], capfd)
    assert code == USER_ERROR_EXIT
    assert "ijbb_face_tid_mid.txt does not exist; the folder holds IJBC's files: pass --ijb-target IJBC" in err


@pytest.mark.dist
@pytest.mark.slow(reason="starts 2 gloo ranks twice (~10 s of process start-up)")
def test_two_processes_give_the_figures_of_one(ijb, tmp_path, capfd):
    root, ckpt, _, _, _ = ijb
    code, out, _ = run_cli(["eval", "--checkpoint", ckpt, "--ijb", str(root), "--nproc", "2", "--batch-size", "5",
                            "--report", str(tmp_path / "two")], capfd)
    assert code == 0 and "IJB 1:1" in out and "report:" in out  # rank 0 printed the table once
    assert out.count("IJB 1:1") == 1
    assert_same_figures(json.loads((tmp_path / "two" / "results.json").read_text())["ijb"]["IJBC"], transcribe(ijb))
    copy = tmp_path / "IJBC"
    shutil.copytree(root, copy)
    last = (copy / f"{META}name_5pts_score.txt").read_text().splitlines()[-1].split()[0]
    (copy / "loose_crop" / last).write_bytes(b"broken")  # in rank 1's share
    code, _, err = run_cli(["eval", "--checkpoint", ckpt, "--ijb", str(copy), "--nproc", "2"], capfd)
    assert code == USER_ERROR_EXIT
    assert len([line for line in err.splitlines() if line.startswith("dsoft eval: error: ")]) == 1, err
    assert f"image {copy}/loose_crop/{last} cannot be decoded" in err and "Traceback" not in err


def test_one_to_n_ties_follow_the_scripts_rule():
    """A mate score equal to the threshold is no hit (the script's strict >), and a non-mate tied with the mate
    counts against the probe's rank (documented: the script's argsort leaves that order open)."""
    from dsoft_dist.eval.ijb_protocol import identification_figures

    half = np.sqrt(0.5)
    feats = np.array([[1, 0], [0, 1], [-1, 0], [half, half], [0, 1], [-0.995, 0.0995]])  # gallery 1-3, probes 11-13
    feats = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    got = identification_figures(np.array([1, 2, 3, 11, 12, 13]), feats, [1, 2, 3], [7, 8, 9], [11, 12, 13], [7, 8, 9])
    # non-mate scores: probe 11 -> 0.7071 (template 2), -0.7071; probe 12 -> 0, 0; probe 13 -> -0.995, 0.0995.
    # ceil(3 x 0.01) = ceil(3 x 0.1) = 1: the threshold is the highest non-mate, 0.7071 = probe 11's mate score.
    assert got["tpir_at_fpir"] == {"0.01": pytest.approx(2 / 3), "0.1": pytest.approx(2 / 3)}
    assert got["rank"] == {"1": pytest.approx(2 / 3), "5": 1.0, "10": 1.0}
    assert (got["probes"], got["gallery"]) == (3, 3)


@pytest.mark.dist
@pytest.mark.slow(reason="two torchrun launches of 2 ranks each (~15 s of process start-up)")
def test_torchrun_ranks_share_the_images(ijb, tmp_path):
    root, ckpt, _, _, _ = ijb
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
              "dsoft_dist.cli", "eval", "--checkpoint", ckpt, "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DSOFT_TRACEBACK": ""}
    proc = subprocess.run(launch + ["--ijb", str(root), "--report", str(tmp_path)], capture_output=True, text=True,
                          timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("IJB 1:1") == 1  # rank 0 alone prints
    assert_same_figures(json.loads((tmp_path / "results.json").read_text())["ijb"]["IJBC"], transcribe(ijb))
    copy = tmp_path / "IJBC"
    shutil.copytree(root, copy)
    remove(f"{META}template_pair_label.txt")(copy)
    proc = subprocess.run(launch + ["--ijb", str(copy)], capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode != 0
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("dsoft eval: error: ")]
    assert len(lines) == 1 and f"{copy}/{META}template_pair_label.txt does not exist" in lines[0], proc.stderr
