"""Export a backbone to ONNX or TorchScript with a dynamic batch dimension, then check parity.

ONNX goes through PyTorch's current exporter (``torch.onnx.export(..., dynamo=True)``: the model
is captured with ``torch.export`` and translated with onnxscript), with the batch dimension
declared symbolic via ``torch.export.Dim``. The legacy TorchScript-based ONNX exporter
(``dynamo=False``) is not offered: torch 2.13 deprecates it (DeprecationWarning, "will be
removed") and the current one exports every backbone in ``dsoft_dist.models`` with the same parity.

The parity check runs the exported model (onnxruntime for ONNX when installed, torch.jit
for TorchScript) on a random batch whose size differs from the export example (proving
the batch dimension is dynamic) and compares with PyTorch: max |diff| must be <= atol.

    dsoft export --checkpoint ckpt/backbone.pt --format onnx out/backbone.onnx
    # or: export_model(model, "out/backbone.onnx", fmt="onnx")
"""
from __future__ import annotations

import contextlib
import logging
import os
import warnings

import numpy as np
import torch
from torch import nn

from dsoft_dist.observability import get_logger
from dsoft_dist.registry import MODELS

log = get_logger(__name__)
FORMATS = ("onnx", "torchscript")
BATCH_DIM = "batch"  # the name of the symbolic batch dimension in the ONNX graph (its dim_param)


def example_input(model: nn.Module, batch: int, seed: int = 0) -> torch.Tensor:
    """A random model input in [-1, 1]: (batch, 3, S, S) images, or (batch, in_features) for a vector model."""
    gen = torch.Generator().manual_seed(seed)
    name = getattr(model, "name", "")
    if name in MODELS and MODELS.get(name).inputs == "vectors":
        shape = (batch, model.in_features)
    else:
        size = int(getattr(model, "input_size", 112))
        shape = (batch, 3, size, size)
    return torch.rand(shape, generator=gen) * 2.0 - 1.0


class _DropTorchvisionNotice(logging.Filter):
    """Drops torch.onnx's "torchvision is not installed. Skipping torchvision::nms" log lines.

    torch.onnx logs four of them on every export without torchvision (its operator registry
    knows torchvision's ops); no backbone here uses torchvision, so they are not actionable.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("torchvision is not installed")


@contextlib.contextmanager
def _quiet_onnx_exporter():
    """Silences the two non-actionable notices of torch 2.13's ONNX exporter; everything else passes.

    - torch.export's ``ExportedProgram.run_decompositions`` deep-copies the module call graph,
      whose pytree leaves are ``torch.utils._pytree.LeafSpec``, a class torch itself marks
      deprecated: copying one emits ``FutureWarning: `isinstance(treespec, LeafSpec)` is
      deprecated`` from inside torch (copyreg.py) on every export. Our code never touches
      LeafSpec, so nothing on our side can avoid it; only that message is ignored.
    - the torchvision notices above (a logging filter on the one torch.onnx logger that emits them).
    Errors, and any other warning or log line, still reach the user.
    """
    registration_log = logging.getLogger("torch.onnx._internal.exporter._registration")
    notice_filter = _DropTorchvisionNotice()
    registration_log.addFilter(notice_filter)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                                    category=FutureWarning)
            yield
    finally:
        registration_log.removeFilter(notice_filter)


def _export_onnx(model: nn.Module, x: torch.Tensor, out: str, opset: int | None) -> None:
    """torch.export-based ONNX export of `model` at example `x` (B, ...), with dim 0 symbolic.

    verbose=False keeps the exporter's "[torch.onnx] ..." progress lines off stdout;
    external_data=False writes the weights into the one .onnx file (fine below 2 GB).
    """
    try:
        import onnxscript  # noqa: F401, PLC0415 (the exporter needs it; fail with the fix, not deep inside torch)
    except ImportError as exc:
        raise ValueError(f"ONNX export needs onnx and onnxscript ({exc}): pip install 'dsoft_dist[export]'") from exc
    batch = torch.export.Dim(BATCH_DIM, min=1)
    with _quiet_onnx_exporter():
        torch.onnx.export(model, (x,), out, dynamo=True, verbose=False, external_data=False,
                          input_names=["input"], output_names=["embedding"], opset_version=opset,
                          dynamic_shapes=({0: batch},))
    if opset is not None:  # below its own opset (18) torch converts down, and keeps 18 when that fails
        import onnx  # noqa: PLC0415 (installed with the exporter's onnxscript)

        got = next(o.version for o in onnx.load(out, load_external_data=False).opset_import if o.domain == "")
        if got != opset:
            os.remove(out)
            raise ValueError(f"opset={opset} is not reachable for this model: the exporter produced opset {got} "
                             f"(the file was removed); use --opset {got} or higher, or leave --opset unset")


def _run_onnx(path: str, x: torch.Tensor) -> np.ndarray | None:
    try:
        import onnxruntime as ort  # noqa: PLC0415 (optional)
    except ImportError:
        log.warning("onnxruntime is not installed: skipping the ONNX parity check (pip install onnxruntime)")
        return None
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


def export_model(model: nn.Module, out: str, fmt: str = "onnx", batch: int = 2, check: bool = True,
                 atol: float = 1e-4, opset: int | None = None) -> dict:
    """Exports `model` (eval mode, on CPU) to `out`. Returns {"path", "format", "max_abs_diff", "checked_with"}.

    The input's batch dimension is dynamic: (N, 3, S, S) or (N, in_features) for any N >= 1;
    the output is (N, embedding_size). ``opset`` is the ONNX opset (None: torch's default).
    Raises ValueError when the parity check fails (max |exported - torch| > atol).
    """
    if fmt not in FORMATS:
        raise ValueError(f"format={fmt!r} is invalid: use one of {', '.join(FORMATS)}")
    model = model.to("cpu").eval()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    x = example_input(model, batch)
    with torch.no_grad():
        if fmt == "onnx":
            _export_onnx(model, x, out, opset)
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
        raise ValueError(f"export parity failed for {out}: max |exported - torch| = {diff:.3g} > atol={atol} "
                         f"(max |torch| = {float(np.abs(expected).max()):.3g}); try another --opset, "
                         "or a larger --atol if the embeddings are that large")
    log.info("exported %s (%s): parity max|diff| = %.3g via %s", out, fmt, diff, result["checked_with"])
    return result
