"""`dsoft eval` end to end: a tiny checkpoint, a .bin set and an image pair list -> table, JSON, Markdown, PNG."""
import fcntl
import io
import json
import os
import pty
import struct
import sys
import termios

import numpy as np
import pytest
import torch
from PIL import Image

from dsoft_dist.cli import main
from dsoft_dist.eval import write_bin
from dsoft_dist.eval.runner import evaluate_bin, evaluate_pairs
from dsoft_dist.models import build_model, load_backbone, save_backbone


def face_like(rng, identity_seed, size=32, noise=20.0):
    """An 'identity' = a fixed random smooth pattern; each image adds pixel noise."""
    base = np.random.default_rng(identity_seed).integers(0, 256, size=(4, 4, 3)).astype(np.float64)
    img = np.kron(base, np.ones((size // 4, size // 4, 1))) + noise * rng.normal(size=(size, size, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def png(img):
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalcli")
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    model = build_model("iresnet_tiny", embedding_size=16, input_size=32).eval()
    ckpt = str(root / "backbone.pt")
    save_backbone(ckpt, model, {"name": "iresnet_tiny", "embedding_size": 16, "input_size": 32})
    images, issame = [], []
    for i in range(60):
        same = i % 2 == 0
        a, b = 1000 + i, (1000 + i if same else 5000 + i)
        images += [png(face_like(rng, a)), png(face_like(rng, b))]
        issame.append(same)
    write_bin(str(root / "tiny.bin"), images, issame)
    os.makedirs(root / "imgs")
    lines = []
    for i in range(30):
        for j, ident in enumerate((i, i, i + 100)):
            Image.fromarray(face_like(rng, ident)).save(root / "imgs" / f"{i}_{j}.png")
        lines += [f"imgs/{i}_0.png imgs/{i}_1.png 1", f"imgs/{i}_0.png,imgs/{i}_2.png,0"]
    (root / "pairs.txt").write_text("# path1 path2 label\n" + "\n".join(lines) + "\n")
    return root, ckpt


def test_eval_cli_matches_the_library_and_writes_reports(workspace, capsys):
    root, ckpt = workspace
    out = root / "report"
    rc = main(["eval", "--checkpoint", ckpt, "--bin", str(root / "tiny.bin"), "--pairs", str(root / "pairs.txt"),
               "--report", str(out), "--folds", "5", "--batch-size", "16", "--fars", "0.01", "0.1"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "tiny" in printed and "pairs" in printed and "TAR@1e-01" in printed
    with open(out / "results.json", encoding="utf-8") as f:
        results = json.load(f)
    model, _ = load_backbone(ckpt)
    direct = evaluate_bin(model, str(root / "tiny.bin"), batch_size=7, flip=True, folds=5)
    assert results["bins"][0]["accuracy"] == pytest.approx(direct["accuracy"], abs=1e-12)
    assert results["bins"][0]["accuracy"] > 0.9  # same-identity pairs are far more similar even untrained
    pairs = evaluate_pairs(model, str(root / "pairs.txt"), fars=(0.01, 0.1), batch_size=5)
    assert results["pairs"][0]["auc"] == pytest.approx(pairs["auc"], abs=1e-6)
    assert results["pairs"][0]["num_pairs"] == 60
    with open(out / "roc.png", "rb") as f:
        assert f.read(4) == b"\x89PNG"
    assert "| tiny |" in (out / "results.md").read_text()


def test_eval_cli_npz_scores_without_model(tmp_path, capsys):
    rng = np.random.default_rng(0)
    y = rng.random(500) < 0.5
    np.savez(tmp_path / "s.npz", scores=rng.normal(size=500) + y, issame=y)
    assert main(["eval", "--pairs", str(tmp_path / "s.npz"), "--interpolation", "none"]) == 0
    assert "interpolation: none" in capsys.readouterr().out


def test_eval_cli_errors(tmp_path, workspace):
    root, ckpt = workspace
    assert main(["eval", "--checkpoint", ckpt]) == 2  # nothing to evaluate
    assert main(["eval", "--bin", str(root / "tiny.bin")]) == 2  # no checkpoint
    (tmp_path / "bad.txt").write_text("a.png b.png maybe\n")
    assert main(["eval", "--checkpoint", ckpt, "--pairs", str(tmp_path / "bad.txt")]) == 2
    assert main(["eval", "--checkpoint", ckpt, "--bin", str(tmp_path / "missing.bin")]) == 2


def test_evaluate_all_from_config_and_flat_metrics(workspace):
    from dsoft_dist.config.schema import EvalConfig
    from dsoft_dist.eval.runner import evaluate_all, flat_metrics

    root, ckpt = workspace
    model, _ = load_backbone(ckpt)
    cfg = EvalConfig(bins=[str(root / "tiny.bin")], pairs=[str(root / "pairs.txt")], folds=3, fars=[0.1],
                     batch_size=32, flip=False)
    metrics = flat_metrics(evaluate_all(model, cfg))
    assert set(metrics) == {"tiny/accuracy", "tiny/accuracy_std", "tiny/threshold", "tiny/val_at_far",
                            "pairs/tar@1e-01", "pairs/auc", "pairs/eer"}
    assert all(isinstance(v, float) for v in metrics.values())
    assert main(["eval", "--checkpoint", ckpt, "--bin", str(root / "tiny.bin"), "--folds", "1"]) == 2


def test_pair_list_separators_and_comments(tmp_path):
    from dsoft_dist.eval.pairs import read_pair_list

    (tmp_path / "l.txt").write_text("# header\n\na b.png\tc d.png\t1\nx.png,y.png,0\n  p.png   q.png 1\n")
    p1, p2, same = read_pair_list(str(tmp_path / "l.txt"))
    assert [os.path.basename(p) for p in p1] == ["a b.png", "x.png", "p.png"]
    assert [os.path.basename(p) for p in p2] == ["c d.png", "y.png", "q.png"]
    assert same.tolist() == [True, False, True]


def brute_force_rates(probe, pid, gallery, gid, distractors, ks):
    """Full (P, G + N) cosine matrix; rank = 1 + #impostors (other-id gallery, every distractor) >= genuine."""
    def unit(x):
        x = np.asarray(x, dtype=np.float64)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    cands = unit(np.concatenate([gallery, distractors]))
    same = np.concatenate([pid[:, None] == gid[None, :], np.zeros((len(pid), len(distractors)), bool)], axis=1)
    sims = unit(probe) @ cands.T  # (P, G + N)
    genuine = np.where(same, sims, -np.inf).max(axis=1)  # best same-identity gallery score
    ranks = 1 + (np.where(same, -np.inf, sims) >= genuine[:, None]).sum(axis=1)
    return {str(k): float(np.mean(ranks <= k)) for k in ks}


@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_eval_identify_npz_equals_brute_force(tmp_path, capsys, backend):
    if backend == "faiss":
        pytest.importorskip("faiss")
    rng = np.random.default_rng(3)
    names = np.array([f"person{i:03d}" for i in range(60)])
    centers = rng.normal(size=(60, 24))
    g_idx = rng.permutation(np.repeat(np.arange(60), 2))  # 2 gallery images per identity, shuffled
    p_idx = rng.choice(60, size=45, replace=False)  # 45 probes, 15 identities only in the gallery
    gallery = (centers[g_idx] + 0.7 * rng.normal(size=(120, 24))).astype(np.float32)
    probe = (centers[p_idx] + 0.7 * rng.normal(size=(45, 24))).astype(np.float32)
    distractors = rng.normal(size=(1500, 24)).astype(np.float32)
    np.savez(tmp_path / "g.npz", embeddings=gallery, ids=names[g_idx])  # string ids: matched by name
    np.savez(tmp_path / "p.npz", embeddings=probe, ids=names[p_idx])
    np.save(tmp_path / "d.npy", distractors)
    rc = main(["eval", "--identify", str(tmp_path / "p.npz"), str(tmp_path / "g.npz"), "--distractors",
               str(tmp_path / "d.npy"), "--rank-k", "5", "1", "--backend", backend, "--report", str(tmp_path / "r")])
    assert rc == 0
    assert "rank-1" in capsys.readouterr().out
    with open(tmp_path / "r" / "results.json", encoding="utf-8") as f:
        got = json.load(f)["identification"][0]
    expected = brute_force_rates(probe, p_idx, gallery, g_idx, distractors, (1, 5))
    assert got["rank"] == pytest.approx(expected, abs=1e-12)
    assert (got["num_probes"], got["num_gallery"], got["num_distractors"]) == (45, 120, 1500)
    assert 0.0 < expected["1"] < expected["5"] < 1.0  # neither trivial nor hopeless: the comparison can fail
    assert expected["1"] < brute_force_rates(probe, p_idx, gallery, g_idx, distractors[:0], (1,))["1"]
    assert "| p vs g | 45 | 120 | 1500 |" in (tmp_path / "r" / "results.md").read_text()


def _image_folder(root, identities, per_identity, rng, nested=False):
    for ident in identities:
        folder = root / (f"batch{ident % 3}" if nested else "") / f"id{ident}"
        folder.mkdir(parents=True, exist_ok=True)
        for j in range(per_identity):
            Image.fromarray(face_like(rng, ident)).save(folder / f"{j}.png")


def test_eval_identify_image_folders_through_a_checkpoint(workspace, tmp_path, capsys):
    from dsoft_dist.eval import extract_embeddings, identify
    from dsoft_dist.eval.pairs import FileImages

    _, ckpt = workspace
    rng = np.random.default_rng(5)
    _image_folder(tmp_path / "gallery", range(12), 2, rng)
    _image_folder(tmp_path / "probes", range(0, 12, 2), 1, rng)
    _image_folder(tmp_path / "distractors", range(900, 920), 1, rng, nested=True)  # any depth
    rc = main(["eval", "--checkpoint", ckpt, "--identify", str(tmp_path / "probes"), str(tmp_path / "gallery"),
               "--distractors", str(tmp_path / "distractors"), "--rank-k", "1", "5", "--batch-size", "8",
               "--report", str(tmp_path / "r")])
    assert rc == 0
    out = capsys.readouterr().out
    assert "probes vs gallery" in out and "rank-5" in out
    got = json.loads((tmp_path / "r" / "results.json").read_text())["identification"][0]
    assert (got["num_probes"], got["num_gallery"], got["num_distractors"]) == (6, 24, 20)
    assert got["rank"]["1"] >= 0.5 and got["rank"]["5"] >= got["rank"]["1"]  # same-identity images are close
    model, _ = load_backbone(ckpt)

    def embed(folder):
        paths = sorted(str(p) for p in folder.rglob("*.png"))
        return extract_embeddings(model, FileImages(paths), flip=True), [os.path.basename(os.path.dirname(p))
                                                                         for p in paths]
    (pe, pn), (ge, gn) = embed(tmp_path / "probes"), embed(tmp_path / "gallery")
    de = embed(tmp_path / "distractors")[0]
    ids = {name: i for i, name in enumerate(sorted(set(gn)))}
    for k in (1, 5):
        direct = identify(pe, [ids[n] for n in pn], ge, [ids[n] for n in gn], distractors=de, k=k, backend="torch")
        assert got["rank"][str(k)] == pytest.approx(direct, abs=1e-12)
    # the gallery as shards (dsoft data from-folder): identities matched through its classes.tsv names
    assert main(["data", "from-folder", str(tmp_path / "gallery"), str(tmp_path / "gshards"), "--no-progress"]) == 0
    assert main(["eval", "--checkpoint", ckpt, "--identify", str(tmp_path / "probes"), str(tmp_path / "gshards"),
                 "--distractors", str(tmp_path / "distractors"), "--rank-k", "1", "5", "--report",
                 str(tmp_path / "r2")]) == 0
    from_shards = json.loads((tmp_path / "r2" / "results.json").read_text())["identification"][0]
    assert from_shards["rank"] == pytest.approx(got["rank"], abs=1e-6) and from_shards["num_gallery"] == 24


def test_eval_identify_errors(tmp_path, workspace, capsys):
    _, ckpt = workspace
    rng = np.random.default_rng(0)
    _image_folder(tmp_path / "gallery", range(3), 1, rng)
    _image_folder(tmp_path / "probes", [0, 7], 1, rng)
    assert main(["eval", "--checkpoint", ckpt, "--identify", str(tmp_path / "probes"), str(tmp_path / "gallery")]) == 2
    assert "'id7'" in capsys.readouterr().err  # the probe identity with no gallery image, by name
    assert main(["eval", "--identify", str(tmp_path / "probes"), str(tmp_path / "gallery")]) == 2  # no checkpoint
    assert "--checkpoint" in capsys.readouterr().err
    np.savez(tmp_path / "no_ids.npz", embeddings=np.ones((3, 4), np.float32))
    assert main(["eval", "--identify", str(tmp_path / "no_ids.npz"), str(tmp_path / "no_ids.npz")]) == 2
    assert "'ids'" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", ckpt, "--identify", str(tmp_path / "probes"), str(tmp_path / "gallery"),
                 "--rank-k", "0"]) == 2


def _eval_stderr_on_a_terminal(argv, monkeypatch) -> str:
    """What ``dsoft eval ARGV`` draws on stderr when stderr is a real (pseudo-)terminal, 100 columns wide."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a width, as a terminal has
    chunks = []
    with os.fdopen(slave, "w") as tty, monkeypatch.context() as patch:
        patch.setattr(sys, "stderr", tty)
        assert main(argv) == 0
        tty.flush()
        os.set_blocking(master, False)
        try:
            while chunk := os.read(master, 1 << 16):
                chunks.append(chunk)
        except BlockingIOError:  # drained
            pass
    os.close(master)
    return b"".join(chunks).decode(errors="replace")


def test_eval_progress_bar_on_a_terminal_only(workspace, monkeypatch, capfd):
    root, ckpt = workspace
    argv = ["eval", "--checkpoint", ckpt, "--bin", str(root / "tiny.bin"), "--folds", "2", "--batch-size", "40"]
    assert "/120 [" in _eval_stderr_on_a_terminal(argv, monkeypatch)  # the default: a bar over the 120 images
    assert "/120 [" not in _eval_stderr_on_a_terminal(argv + ["--no-progress"], monkeypatch)
    capfd.readouterr()
    assert main(argv + ["--progress"]) == 0  # still accepted; stderr is redirected here, so no bar
    assert "/120 [" not in capfd.readouterr().err
