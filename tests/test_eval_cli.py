"""`dsoft eval` end to end: a tiny checkpoint, a .bin set and an image pair list -> table, JSON, Markdown, PNG."""
import io
import json
import os

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
    assert set(metrics) == {"tiny/accuracy", "tiny/accuracy_std", "tiny/threshold", "tiny/val", "pairs/tar@1e-01",
                            "pairs/auc", "pairs/eer"}
    assert all(isinstance(v, float) for v in metrics.values())
    assert main(["eval", "--checkpoint", ckpt, "--bin", str(root / "tiny.bin"), "--folds", "1"]) == 2


def test_pair_list_separators_and_comments(tmp_path):
    from dsoft_dist.eval.pairs import read_pair_list

    (tmp_path / "l.txt").write_text("# header\n\na b.png\tc d.png\t1\nx.png,y.png,0\n  p.png   q.png 1\n")
    p1, p2, same = read_pair_list(str(tmp_path / "l.txt"))
    assert [os.path.basename(p) for p in p1] == ["a b.png", "x.png", "p.png"]
    assert [os.path.basename(p) for p in p2] == ["c d.png", "y.png", "q.png"]
    assert same.tolist() == [True, False, True]
