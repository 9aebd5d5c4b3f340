"""`dsoft train` on a user's own data: an image folder -> `dsoft data from-folder` shards, a `.bin` of
unseen identities from `dsoft data make-bin`, 2 gloo ranks; the loss falls and verification improves."""
import json

import pytest

from dsoft_dist.cli import main
from dsoft_dist.data import EVAL_IDENTITY_OFFSET, SyntheticIdentities
from dsoft_dist.data.convert import encode_image

pytestmark = [pytest.mark.slow(reason="converts a folder and trains 2 ranks on it through dsoft train"),
              pytest.mark.dist]


def _image_folder(root, identities: int, per_identity: int, offset: int, size: int = 32):
    """ROOT/<identity>/<n>.png of synthetic faces (the identities [offset, offset + identities))."""
    src = SyntheticIdentities(identities, image_size=size, identity_offset=offset)
    for i in range(identities):
        folder = root / f"person_{offset + i:07d}"
        folder.mkdir(parents=True)
        for j in range(per_identity):
            (folder / f"{j:03d}.png").write_bytes(encode_image(src.sample(i, j), "png"))
    return root


def test_dsoft_train_on_from_folder_shards_with_its_own_bin(tmp_path, capfd):
    _image_folder(tmp_path / "train", 60, 12, offset=0)
    _image_folder(tmp_path / "val", 40, 6, offset=EVAL_IDENTITY_OFFSET)  # identities never trained on
    assert main(["data", "from-folder", str(tmp_path / "train"), str(tmp_path / "shards"), "--per-shard", "200",
                 "--no-progress"]) == 0
    assert main(["data", "make-bin", str(tmp_path / "val.bin"), "--folder", str(tmp_path / "val"),
                 "--pairs", "300"]) == 0
    out = tmp_path / "run"
    code = main(["train", "--config", "configs/demo.yaml", "--nproc", "2",
                 "--set", "data.source=webdataset", "--set", f"data.manifest={tmp_path / 'shards'}/manifest.json",
                 "--set", "data.num_classes=60", "--set", "data.batch_size=32", "--set", "eval.synthetic_identities=0",
                 "--set", f"eval.bins=[{tmp_path / 'val.bin'}]", "--set", "schedule.steps=60",
                 "--set", "schedule.warmup_steps=5", "--set", "logging.log_every=20", "--set", f"logging.output_dir={out}"])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["world_size"] == 2
    assert report["log"][-1]["loss"] < report["log"][0]["loss"] - 1.0
    untrained, trained = report["evals"][0], report["evals"][-1]
    assert trained["val/accuracy"] > untrained["val/accuracy"] + 0.05
    assert not (out / "synthetic_unseen.bin").exists()  # the user's set, not synthetic faces
    assert "60 identities from WebDataset shards" in (out / "report.md").read_text()
    assert (out / "curves.png").is_file() and (out / "backbone.pt").is_file()
    assert "val" in capfd.readouterr().out
