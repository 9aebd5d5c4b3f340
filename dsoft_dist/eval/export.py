"""Export a backbone to ONNX or TorchScript with a dynamic batch dimension, then check parity.

The parity check runs the exported model (onnxruntime for ONNX when installed, torch.jit
for TorchScript) on a random batch whose size differs from the export example (proving
the batch dimension is dynamic) and compares with PyTorch: max |diff| must be <= atol.

    dsoft export --checkpoint ckpt/backbone.pt --format onnx out/backbone.onnx
    # or: export_model(model, "out/backbone.onnx", fmt="onnx")
"""
from __future__ import annotations

import contextlib
import io
import os

import numpy as np
import torch
from torch import nn

from dsoft_dist.observability import get_logger

log = get_logger(__name__)
FORMATS = ("onnx", "torchscript")


def example_input(model: nn.Module, batch: int, seed: int = 0) -> torch.Tensor:
    """A random model input in [-1, 1]: (batch, 3, S, S) images, or (batch, in_features) for ``mlp``."""
    gen = torch.Generator().manual_seed(seed)
    if getattr(model, "name", "") == "mlp":
        shape = (batch, model.in_features)
    else:
        size = int(getattr(model, "input_size", 112))
        shape = (batch, 3, size, size)
    return torch.rand(shape, generator=gen) * 2.0 - 1.0


def _export_onnx(model: nn.Module, x: torch.Tensor, out: str, opset: int | None, dynamo: bool) -> None:
    kwargs = dict(input_names=["input"], output_names=["embedding"], opset_version=opset)
    quiet = io.StringIO()
    with contextlib.redirect_stdout(quiet):  # the dynamo exporter prints progress lines
        if dynamo:
            torch.onnx.export(model, (x,), out, dynamo=True, external_data=False, verbose=False,
                              dynamic_shapes=({0: torch.export.Dim("batch", min=1)},), **kwargs)
        else:
            torch.onnx.export(model, (x,), out, dynamo=False,
                              dynamic_axes={"input": {0: "batch"}, "embedding": {0: "batch"}}, **kwargs)


def _run_onnx(path: str, x: torch.Tensor) -> np.ndarray | None:
    try:
        import onnxruntime as ort  # noqa: PLC0415 (optional)
    except ImportError:
        log.warning("onnxruntime is not installed: skipping the ONNX parity check (pip install onnxruntime)")
        return None
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


def export_model(model: nn.Module, out: str, fmt: str = "onnx", batch: int = 2, check: bool = True,
                 atol: float = 1e-4, opset: int | None = None, dynamo: bool = True) -> dict:
    """Exports `model` (eval mode, on CPU) to `out`. Returns {"path", "format", "max_abs_diff", "checked_with"}.

    Raises ValueError when the parity check fails (max |exported - torch| > atol).
    """
    if fmt not in FORMATS:
        raise ValueError(f"format={fmt!r} is invalid: use one of {', '.join(FORMATS)}")
    model = model.to("cpu").eval()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    x = example_input(model, batch)
    with torch.no_grad():
        if fmt == "onnx":
            _export_onnx(model, x, out, opset, dynamo)
        else:
            torch.jit.save(torch.jit.trace(model, (x,)), out)
    result = {"path": out, "format": fmt, "max_abs_diff": None, "checked_with": None}
    if not check:
        return result
    probe = example_input(model, batch + 3, seed=1)  # a different batch size: checks the dynamic dim
    with torch.no_grad():
        expected = model(probe).numpy()
        if fmt == "onnx":
            got, result["checked_with"] = _run_onnx(out, probe), "onnxruntime"
        else:
            got, result["checked_with"] = torch.jit.load(out, map_location="cpu")(probe).numpy(), "torch.jit"
    if got is None:
        result["checked_with"] = None
        return result
    diff = float(np.abs(got - expected).max())
    result["max_abs_diff"] = diff
    if not diff <= atol:
        raise ValueError(f"export parity failed for {out}: max |exported - torch| = {diff:.3g} > atol={atol}; "
                         "try --no-dynamo (legacy exporter) or another opset")
    log.info("exported %s (%s): parity max|diff| = %.3g via %s", out, fmt, diff, result["checked_with"])
    return result
