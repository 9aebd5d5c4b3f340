"""arcface_torch weights in and out: the name mapping of every backbone against params.json (their names and
shapes, generated from arcface_torch's code by tests/data/insightface/generate_reference.py), export then import
as the identity on real tensors, DDP/fp16 saves, the one-line refusals, and a run fine-tuned from an import.

No arcface_torch code and no network: their side is params.json and the files our export writes.

    python -m pytest -q tests/test_ckpt_insightface.py
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess

import pytest
import torch
import yaml

from dsoft_dist.cli import main
from dsoft_dist.errors import USER_ERROR_EXIT
from dsoft_dist.models import build_model, load_backbone, model_config_dict, read_backbone_file, save_backbone
from dsoft_dist.models.insightface import (
    ARCFACE_NAMES,
    arcface_state_names,
    export_state_dict,
    import_state_dict,
    read_arcface_file,
)
from tests.terminal import DSOFT

PARAMS = json.loads(open(os.path.join(os.path.dirname(__file__), "data", "insightface", "params.json"),
                         encoding="utf-8").read())


def meta_state(entries) -> dict[str, torch.Tensor]:
    """A state_dict of meta tensors with params.json's (name, shape) entries (no memory)."""
    return {n: torch.empty(s, device="meta", dtype=torch.long if n.endswith("num_batches_tracked") else torch.float)
            for n, s in entries}


def layout(state: dict) -> list[list]:
    return [[k, list(v.shape)] for k, v in state.items()]


def randomized(name: str, seed: int, embedding_size: int = 512) -> torch.nn.Module:
    """Our model ``name`` at 112 px with every state entry random, BatchNorm statistics and counters too (at a
    scale that keeps a deep network's activations finite)."""
    g = torch.Generator().manual_seed(seed)
    model = build_model(name, embedding_size=embedding_size, input_size=112)
    with torch.no_grad():
        for key, t in model.state_dict().items():
            if not t.is_floating_point():
                t.copy_(torch.randint(0, 1000, t.shape, generator=g))
            elif key.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            else:
                t.copy_(torch.randn(t.shape, generator=g) * (0.05 if t.dim() > 1 else 0.2)
                        + (1.0 if key.endswith(".weight") and t.dim() == 1 else 0.0))
    return model


def dsoft(argv, capfd) -> tuple[int, str, str]:
    """``dsoft ARGV`` in this process: (exit code, stdout, stderr)."""
    capfd.readouterr()
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit_:  # argparse's own errors
        code = exit_.code
    out, err = capfd.readouterr()
    return code, out, err


def one_error_line(code: int, err: str, *tokens: str) -> str:
    """The refusal: exit 2, one ``dsoft ckpt ...: error:`` line naming every token, no traceback."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == USER_ERROR_EXIT and "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith("dsoft ckpt "), err
    for token in tokens:
        assert token in lines[0], (token, lines[0])
    return lines[0]


def arcface_file(root, name: str, seed: int) -> tuple[str, torch.nn.Module]:
    """(arcface_torch-layout backbone.pth of our random model ``name``, written by our export; that model)."""
    model = randomized(name, seed=seed)
    path = str(root / "backbone.pth")
    torch.save(export_state_dict(model_config_dict(name), model.state_dict()), path)
    return path, model


@pytest.fixture(scope="module")
def mbf_file(tmp_path_factory):
    return arcface_file(tmp_path_factory.mktemp("mbf"), "mbf", seed=1)


# ----------------------------------------------------------------------------- the mapping, every model

def test_every_arcface_model_has_a_name_of_ours():
    assert sorted(ARCFACE_NAMES) == sorted(PARAMS)


@pytest.mark.parametrize("their", list(PARAMS))
def test_names_and_shapes_map_as_params_json_says(their):
    """Our model (meta device) exports to exactly their entries (names, shapes, order); a file of their entries
    imports to exactly our model's entries; the parameter counts agree."""
    ours = ARCFACE_NAMES[their]
    entries = PARAMS[their]["entries"]
    assert arcface_state_names(their) == arcface_state_names(ours) == [n for n, _ in entries]
    with torch.device("meta"):
        model = build_model(ours, embedding_size=512, input_size=112)
    assert sum(p.numel() for p in model.parameters()) == PARAMS[their]["parameters"]
    cfg = model_config_dict(ours, embedding_size=512, input_size=112)
    assert layout(export_state_dict(cfg, model.state_dict())) == entries
    imported_cfg, state = import_state_dict(meta_state(entries), their)
    assert imported_cfg == cfg
    assert layout(state) == layout(model.state_dict())


def test_the_embedding_size_is_read_from_the_weights():
    with torch.device("meta"):
        model = build_model("iresnet50", embedding_size=128, input_size=112)
    theirs = export_state_dict(model_config_dict("iresnet50", embedding_size=128), model.state_dict())
    assert list(theirs["fc.weight"].shape) == [128, 512 * 7 * 7]
    cfg, _ = import_state_dict(theirs, "iresnet50")  # our name works as well as theirs
    assert cfg["embedding_size"] == 128 and cfg["name"] == "iresnet50"


def test_a_wrong_model_names_the_entry_the_shapes_and_the_right_model():
    """The issue's case: an r50 file imported as r100 (meta tensors: no memory)."""
    with pytest.raises(ValueError) as err:
        import_state_dict(meta_state(PARAMS["r50"]["entries"]), "r100", source="r50.pth")
    message = str(err.value)
    assert "\n" not in message
    assert ("r50.pth is not arcface_torch's r100 (iresnet100, 512-d embedding): entry 150 'layer3.0.conv1.weight': "
            "expected 'layer2.4.conv1.weight' of shape [128, 128, 3, 3], found shape [256, 128, 3, 3] "
            "(475 entries found, 925 expected); it looks like r50: pass --model r50") == message


def test_a_file_that_fits_no_model_says_so():
    entries = PARAMS["r18"]["entries"][:-7]  # the features BatchNorm1d cut off
    with pytest.raises(ValueError, match=r"the first 180 entries fit, but 180 entries were found and 187 expected; "
                                         r"it fits none of arcface_torch's backbones"):
        import_state_dict(meta_state(entries), "r18")


# ----------------------------------------------------------------------------- real tensors

@pytest.mark.parametrize("name", ["iresnet18", "mbf"])
def test_export_then_import_is_the_identity(name, tmp_path, capfd):
    model = randomized(name, seed=3)
    ours = str(tmp_path / "ours.pt")
    save_backbone(ours, model, model_config_dict(name))
    code, out, err = dsoft(["ckpt", "export", "--to", "insightface", ours, tmp_path / "theirs.pth"], capfd)
    assert code == 0, err
    theirs = torch.load(tmp_path / "theirs.pth", weights_only=True)
    their_name = {o: t for t, o in ARCFACE_NAMES.items()}[name]
    assert layout(theirs) == PARAMS[their_name]["entries"]
    assert f"arcface_torch's {their_name}, 512-d embedding, {len(theirs)} entries" in out
    code, out, err = dsoft(["ckpt", "import", "--from", "insightface", tmp_path / "theirs.pth", "--model",
                            their_name, tmp_path / "back.pt"], capfd)
    assert code == 0, err
    params = PARAMS[their_name]["parameters"] / 1e6
    assert out == (f"imported {tmp_path / 'theirs.pth'} (arcface_torch {their_name}) to {tmp_path / 'back.pt'}: "
                   f"{name}, 512-d embedding, {params:.2f}M parameters\n")
    payload = read_backbone_file(str(tmp_path / "back.pt"))
    assert payload["model"] == model_config_dict(name)
    assert payload["extra"]["imported_from"] == "insightface" and payload["extra"]["source_model"] == their_name
    assert payload["extra"]["source_sha256"] == hashlib.sha256((tmp_path / "theirs.pth").read_bytes()).hexdigest()
    back = payload["state_dict"]
    assert list(back) == list(model.state_dict())
    for key, value in model.state_dict().items():
        assert back[key].dtype == value.dtype and torch.equal(back[key], value), key


def test_a_ddp_fp16_save_and_a_training_checkpoint_import(tmp_path):
    """A "module."-prefixed half-precision state_dict, and the state_dict_backbone of checkpoint_gpu_0.pt."""
    model = randomized("mbf", seed=5)
    theirs = export_state_dict(model_config_dict("mbf"), model.state_dict())
    half = {f"module.{k}": v.half() if v.is_floating_point() else v for k, v in theirs.items()}
    torch.save(half, tmp_path / "ddp.pth")
    cfg, state = import_state_dict(read_arcface_file(str(tmp_path / "ddp.pth")), "mbf")
    assert cfg == model_config_dict("mbf")
    for (key, value), (their_key, h) in zip(state.items(), half.items()):
        want = h.float() if h.is_floating_point() else h
        assert value.dtype == want.dtype and torch.equal(value, want), (key, their_key)
    torch.save({"epoch": 3, "global_step": 900, "state_dict_backbone": theirs, "state_dict_softmax_fc": {}},
               tmp_path / "checkpoint_gpu_0.pt")
    _, state = import_state_dict(read_arcface_file(str(tmp_path / "checkpoint_gpu_0.pt")), "mbf")
    assert all(torch.equal(a, b) for a, b in zip(state.values(), model.state_dict().values()))


# ----------------------------------------------------------------------------- refusals, one line each

def test_a_wrong_model_is_refused_on_one_line(mbf_file, tmp_path, capfd):
    path, _ = mbf_file
    code, _, err = dsoft(["ckpt", "import", "--from", "insightface", path, "--model", "iresnet18",
                          tmp_path / "x.pt"], capfd)
    one_error_line(code, err, f"{path} is not arcface_torch's r18 (iresnet18, 512-d embedding)",
                   "entry 0 'layers.0.layers.0.weight'", "expected 'conv1.weight' of shape [64, 3, 3, 3]",
                   "found shape [128, 3, 3, 3]", "(333 entries found, 187 expected)",
                   "it looks like mbf: pass --model mbf")
    assert not (tmp_path / "x.pt").exists()


class Pickled:  # an object: torch.load(weights_only=True) refuses to rebuild it
    pass


@pytest.mark.parametrize("content, token", [
    ({"conv.weight": torch.zeros(3), "lr": 0.1}, "its entry 'lr' is a float, not a tensor"),
    ([torch.zeros(3)], "holds a list, not a state_dict"),
    ({}, "holds an empty dict, not a state_dict"),
    ({"a.weight": torch.zeros(2, 2)}, "holds no 1-D tensor"),
    ({"a.weight": torch.zeros(2), "b.bias": torch.zeros(2)}, "it fits none of arcface_torch's backbones"),
    (Pickled(), "holds pickled objects (tests.test_ckpt_insightface.Pickled), not only tensors: it is refused"),
    ({"format": "dsoft_backbone", "state_dict": {}}, "is a dsoft backbone file already"),
])
def test_what_is_not_a_backbone_state_dict_is_refused(content, token, tmp_path, capfd):
    src = tmp_path / "src.pth"
    torch.save(content, src)
    code, _, err = dsoft(["ckpt", "import", "--from", "insightface", src, "--model", "r18", tmp_path / "x.pt"], capfd)
    one_error_line(code, err, str(src), token)


def test_a_file_torch_did_not_write_is_refused(tmp_path, capfd):
    src = tmp_path / "src.pth"
    src.write_bytes(b"not a torch file")
    code, _, err = dsoft(["ckpt", "import", "--from", "insightface", src, "--model", "r18", tmp_path / "x.pt"], capfd)
    one_error_line(code, err, f"{src} is not a file of tensors torch.save wrote")


def test_import_names_a_missing_file_and_an_unknown_model(mbf_file, tmp_path, capfd):
    code, _, err = dsoft(["ckpt", "import", "--from", "insightface", tmp_path / "nope.pth", "--model", "r18",
                          tmp_path / "x.pt"], capfd)
    one_error_line(code, err, f"{tmp_path / 'nope.pth'} does not exist")
    code, _, err = dsoft(["ckpt", "import", "--from", "insightface", mbf_file[0], "--model", "resnet18",
                          tmp_path / "x.pt"], capfd)
    one_error_line(code, err, "model 'resnet18' has no arcface_torch counterpart", "r18 = iresnet18", "vit_l")
    code, _, err = dsoft(["ckpt", "import", mbf_file[0], "--model", "r18", tmp_path / "x.pt"], capfd)
    assert code == USER_ERROR_EXIT and "the following arguments are required: --from" in err


@pytest.mark.parametrize("name, cfg, token", [
    ("iresnet_tiny", {"embedding_size": 16, "input_size": 32}, "model 'iresnet_tiny' has no arcface_torch counterpart"),
    ("mobilefacenet_tiny", {"embedding_size": 16, "input_size": 32}, "model 'mobilefacenet_tiny' has no arcface"),
    ("mlp", {"embedding_size": 8, "in_features": 4}, "model 'mlp' has no arcface_torch counterpart"),
    ("mbf", {"embedding_size": 64, "input_size": 96}, "arcface_torch's mbf takes 112 x 112 faces only"),
])
def test_export_refuses_what_arcface_torch_cannot_build(name, cfg, token, tmp_path, capfd):
    cfg = model_config_dict(name, **cfg)
    save_backbone(str(tmp_path / "b.pt"), build_model(**cfg), cfg)
    code, _, err = dsoft(["ckpt", "export", "--to", "insightface", tmp_path / "b.pt", tmp_path / "o.pth"], capfd)
    line = one_error_line(code, err, token)
    if "counterpart" in token:
        assert "export takes (arcface_torch's name = ours) r18 = iresnet18" in line and "at input_size=112" in line
    assert not (tmp_path / "o.pth").exists()


@pytest.mark.slow(reason="a fresh interpreter for the console script (torch's import) and a round trip: 4-8 s on "
                         "2 CPU cores; the default tier runs every command through dsoft_dist.cli.main in-process")
def test_the_console_script_imports_and_the_import_exports_back(mbf_file, tmp_path, capfd):
    """The installed ``dsoft`` imports; the import exports back into a folder (OUT/backbone.pth) bit for bit, and
    embeds as the model the file came from."""
    path, model = mbf_file
    proc = subprocess.run([DSOFT, "ckpt", "import", "--from", "insightface", path, "--model", "mbf",
                           str(tmp_path / "mbf.pt")], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "DSOFT_TRACEBACK": ""})
    assert proc.returncode == 0 and proc.stdout.startswith(f"imported {path} (arcface_torch mbf)"), proc.stderr
    (tmp_path / "out").mkdir()
    code, out, err = dsoft(["ckpt", "export", "--to", "insightface", tmp_path / "mbf.pt", tmp_path / "out"], capfd)
    assert code == 0 and out.startswith(f"exported mbf from {tmp_path / 'mbf.pt'} to {tmp_path / 'out'}/backbone.pth")
    original = torch.load(path, weights_only=True)
    again = torch.load(tmp_path / "out" / "backbone.pth", weights_only=True)
    assert list(again) == list(original) and all(torch.equal(again[k], original[k]) for k in original)
    imported, _ = load_backbone(str(tmp_path / "mbf.pt"))
    x = torch.rand(2, 3, 112, 112) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(imported(x), model.eval()(x), rtol=0, atol=0)


# ----------------------------------------------------------------------------- fine-tuning from an import

@pytest.mark.slow(reason="an IResNet-18 at 112 px: import, one training step and an export take ~5 s on 2 CPU "
                         "cores")
def test_training_starts_from_an_imported_model(tmp_path, capfd, caplog):
    """dsoft train --init-from the imported file: the run's backbone is the import moved by one step of a tiny
    learning rate (its BatchNorm statistics updated), the log says where it started; its run folder exports back
    to arcface_torch's layout."""
    path, model = arcface_file(tmp_path, "iresnet18", seed=2)
    code, _, err = dsoft(["ckpt", "import", "--from", "insightface", path, "--model", "r18", tmp_path / "r18.pt"],
                         capfd)
    assert code == 0, err
    run = tmp_path / "run"
    cfg = {"name": "finetune", "seed": 0, "model": {"name": "iresnet18", "embedding_size": 512, "input_size": 112},
           "head": {"loss": "d_softmax", "scale": 16.0},
           "data": {"source": "synthetic", "synthetic_mode": "images", "image_size": 112, "num_classes": 4,
                    "samples_per_class": 2, "batch_size": 2, "num_workers": 0},
           "optimizer": {"name": "sgd", "lr": 1e-9, "momentum": 0.0, "weight_decay": 0.0},
           "schedule": {"steps": 1, "warmup_steps": 0, "decay": "constant"},
           "parallel": {"nproc": 1, "backend": "gloo"}, "logging": {"log_every": 1, "progress": False,
                                                                    "output_dir": str(run)},
           "eval": {"at_start": False, "synthetic_identities": 0}, "checkpoint": {"every_steps": 1}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    code, _, err = dsoft(["train", "--config", tmp_path / "c.yaml", "--init-from", tmp_path / "r18.pt"], capfd)
    assert code == 0, err
    assert f"initialized from {tmp_path / 'r18.pt'}: backbone weights; the head is new" in caplog.text
    trained, start = read_backbone_file(str(run / "backbone.pt"))["state_dict"], model.state_dict()
    for key in trained:
        if key.endswith("weight") and trained[key].dim() > 1:  # convs and the FC: one step of lr 1e-9
            torch.testing.assert_close(trained[key], start[key], rtol=0, atol=1e-6, msg=key)
    assert not torch.equal(trained["features.running_mean"], start["features.running_mean"])  # a step was trained
    code, _, err = dsoft(["ckpt", "export", "--to", "insightface", run, tmp_path / "ft.pth"], capfd)
    assert code == 0, err
    exported = torch.load(tmp_path / "ft.pth", weights_only=True)
    assert layout(exported) == PARAMS["r18"]["entries"]
    assert torch.equal(exported["layer4.1.conv2.weight"], trained["stages.3.1.conv2.weight"])
