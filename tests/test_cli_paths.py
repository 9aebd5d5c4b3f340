"""Paths the user passes that are not what a command reads directly: a run folder to `dsoft ckpt inspect`
and to `dsoft eval`/`dsoft export --checkpoint`, a step folder, a missing path.

The run folder is made by a real `dsoft train` (in this process, 1 rank, a 24-float MLP on synthetic
vectors, 3 steps, a checkpoint every step: about 2 s), the fastest run that writes every output.
"""
import json

import numpy as np
import pytest
import yaml

from dsoft_dist.cli import main
from dsoft_dist.errors import USER_ERROR_EXIT

TINY_RUN = {
    "name": "tiny", "seed": 0,
    "model": {"name": "mlp", "embedding_size": 16, "in_features": 24},
    "head": {"loss": "d_softmax", "scale": 16.0},
    "data": {"source": "synthetic", "synthetic_mode": "vectors", "vector_dim": 24, "num_classes": 40,
             "samples_per_class": 8, "batch_size": 8, "num_workers": 0},
    "schedule": {"steps": 3, "warmup_steps": 0, "decay": "constant"},
    "parallel": {"nproc": 1, "backend": "gloo"},
    "logging": {"log_every": 1, "progress": False},
    "eval": {"at_start": False, "synthetic_identities": 0},
    "checkpoint": {"every_steps": 1, "keep_last": 2},
}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("paths")
    cfg = dict(TINY_RUN, logging={**TINY_RUN["logging"], "output_dir": str(root / "run")})
    (root / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", "--config", str(root / "tiny.yaml")]) == 0
    run = root / "run"
    assert (run / "backbone.pt").is_file() and sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "latest", "step-00000002", "step-00000003"]
    return run


def dsoft(argv, capfd) -> tuple[int, str, str]:
    capfd.readouterr()
    code = main([str(a) for a in argv])
    out, err = capfd.readouterr()
    return code, out, err


def test_ckpt_inspect_run_folder_lists_its_checkpoints_and_inspects_the_newest(run_dir, capfd):
    code, out, err = dsoft(["ckpt", "inspect", run_dir], capfd)
    assert code == 0, err
    first, second = out.splitlines()[:2]
    assert first.startswith(f"run folder {run_dir}: checkpoints step-00000002, step-00000003")
    assert "newest step-00000003" in first
    assert second == f"checkpoint {run_dir / 'checkpoints' / 'step-00000003'}"
    assert "step 3, written by 1 ranks" in out and "every size and sha256 matches" in out
    assert "manifest.json is missing" not in out + err


def test_ckpt_inspect_path_errors_are_exit_2_in_user_words(run_dir, tmp_path, capfd):
    code, _, err = dsoft(["ckpt", "inspect", tmp_path / "nope"], capfd)
    assert code == USER_ERROR_EXIT and f"{tmp_path / 'nope'} does not exist" in err
    (tmp_path / "empty-run" / "checkpoints").mkdir(parents=True)
    code, _, err = dsoft(["ckpt", "inspect", tmp_path / "empty-run"], capfd)
    assert code == USER_ERROR_EXIT and "is a run folder with no checkpoint" in err
    code, _, err = dsoft(["ckpt", "inspect", tmp_path], capfd)  # a folder, neither a run nor a checkpoint
    assert code == USER_ERROR_EXIT and "is not a finished checkpoint (manifest.json is missing)" in err


def test_eval_checkpoint_takes_a_run_folder(run_dir, tmp_path, capfd):
    rng = np.random.default_rng(0)
    same = rng.random(200) < 0.5
    np.savez(tmp_path / "scores.npz", scores=rng.normal(size=200) + same, issame=same)
    code, out, err = dsoft(["eval", "--checkpoint", run_dir, "--pairs", tmp_path / "scores.npz",
                            "--report", tmp_path / "rep"], capfd)
    assert code == 0, err
    assert out.splitlines()[1].startswith("scores  200 ")  # the pair list's row of the table
    assert json.loads((tmp_path / "rep" / "results.json").read_text())["checkpoint"] == str(run_dir)


def test_eval_checkpoint_errors_say_what_to_pass(run_dir, tmp_path, capfd):
    bin_args = ["--bin", tmp_path / "v.bin"]
    code, _, err = dsoft(["eval", "--checkpoint", tmp_path / "nope", *bin_args], capfd)
    assert code == USER_ERROR_EXIT and "does not exist: pass a run folder" in err
    assert "save_backbone" not in err  # an internal name
    step = run_dir / "checkpoints" / "step-00000003"
    code, _, err = dsoft(["eval", "--checkpoint", step, *bin_args], capfd)
    assert code == USER_ERROR_EXIT and f"dsoft ckpt export {step} OUT" in err
    code, _, err = dsoft(["eval", "--checkpoint", tmp_path, *bin_args], capfd)
    assert code == USER_ERROR_EXIT and "is a folder without backbone.pt" in err


def test_export_checkpoint_takes_a_run_folder(run_dir, tmp_path, capfd):
    out_file = tmp_path / "b.pt"
    code, out, err = dsoft(["export", "--checkpoint", run_dir, "--format", "torchscript", out_file], capfd)
    assert code == 0, err
    assert out_file.is_file() and "parity max|diff|" in out
