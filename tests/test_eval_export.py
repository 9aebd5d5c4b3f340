"""Export: ONNX (dynamo and legacy exporters) and TorchScript with a dynamic batch, parity vs PyTorch < 1e-4."""
import numpy as np
import onnxruntime as ort
import pytest
import torch

from dsoft_dist.cli import main
from dsoft_dist.eval.export import export_model
from dsoft_dist.models import build_model, save_backbone


@pytest.fixture(scope="module")
def tiny_iresnet():
    torch.manual_seed(0)
    model = build_model("iresnet_tiny", embedding_size=32, input_size=32)
    for _ in range(3):
        model(torch.randn(8, 3, 32, 32))  # realistic BN running statistics
    return model.eval()


def ort_embed(path, x):
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


@pytest.mark.parametrize("dynamo", [True, False])
def test_onnx_parity_and_dynamic_batch(tmp_path, tiny_iresnet, dynamo):
    out = str(tmp_path / "m.onnx")
    res = export_model(tiny_iresnet, out, fmt="onnx", dynamo=dynamo)
    assert res["checked_with"] == "onnxruntime" and res["max_abs_diff"] < 1e-4
    for batch in (1, 7):  # independently of export_model's own check
        x = torch.rand(batch, 3, 32, 32) * 2 - 1
        with torch.no_grad():
            expected = tiny_iresnet(x).numpy()
        got = ort_embed(out, x)
        assert got.shape == (batch, 32)
        assert np.abs(got - expected).max() < 1e-4


def test_torchscript_parity(tmp_path, tiny_iresnet):
    out = str(tmp_path / "m.pt")
    res = export_model(tiny_iresnet, out, fmt="torchscript")
    assert res["checked_with"] == "torch.jit" and res["max_abs_diff"] < 1e-4
    x = torch.rand(5, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        np.testing.assert_allclose(torch.jit.load(out)(x).numpy(), tiny_iresnet(x).numpy(), atol=1e-4)


def test_parity_failure_is_reported(tmp_path, tiny_iresnet):
    with pytest.raises(ValueError, match="parity failed"):
        export_model(tiny_iresnet, str(tmp_path / "m.pt"), fmt="torchscript", atol=-1.0)
    with pytest.raises(ValueError, match="format='tflite'"):
        export_model(tiny_iresnet, str(tmp_path / "m.x"), fmt="tflite")


def test_cli_export(tmp_path, tiny_iresnet, capsys):
    ckpt = str(tmp_path / "backbone.pt")
    save_backbone(ckpt, tiny_iresnet, {"name": "iresnet_tiny", "embedding_size": 32, "input_size": 32})
    out = str(tmp_path / "cli.onnx")
    assert main(["export", "--checkpoint", ckpt, "--format", "onnx", "--no-dynamo", out]) == 0
    assert "parity max|diff|" in capsys.readouterr().out
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert np.abs(ort_embed(out, x) - tiny_iresnet(x).numpy()).max() < 1e-4
    assert main(["export", "--checkpoint", str(tmp_path / "missing.pt"), out]) == 2


@pytest.mark.parametrize("name,shape", [("mobilefacenet_tiny", (3, 32, 32)), ("mlp", (20,))])
def test_other_backbones_export(tmp_path, name, shape):
    torch.manual_seed(0)
    model = build_model(name, embedding_size=16, input_size=32, in_features=20 if name == "mlp" else 0)
    with torch.no_grad():
        for _ in range(30):  # settle BN running statistics so eval outputs are O(1) and input-dependent
            model(torch.rand(8, *shape) * 2 - 1)
    model.eval()
    res = export_model(model, str(tmp_path / "m.onnx"), fmt="onnx", dynamo=False)
    x = torch.rand(4, *shape) * 2 - 1
    with torch.no_grad():
        expected = model(x).numpy()
    assert expected.std(axis=0).mean() > 0.01  # a meaningful comparison, not two near-constant outputs
    assert res["max_abs_diff"] < 1e-4
    assert np.abs(ort_embed(str(tmp_path / "m.onnx"), x) - expected).max() < 1e-4
