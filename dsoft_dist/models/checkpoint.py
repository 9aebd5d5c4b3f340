"""Backbone checkpoints: a dict with the model config and the state_dict, loaded safely.

File contents (a ``torch.save`` dict, readable with ``torch.load(weights_only=True)``):
``{"format": "dsoft_backbone", "version": 1, "model": {name, embedding_size, input_size,
in_features, dropout, activation_checkpointing}, "state_dict": {...}, "extra": {...}}``; a file
written before ``activation_checkpointing`` existed loads with it false. Checkpoints are treated as
untrusted: loading never unpickles arbitrary objects.

    save_backbone("ckpt/backbone.pt", model, {"name": "iresnet_tiny", "embedding_size": 64, "input_size": 32})
    model, cfg = load_backbone("ckpt/backbone.pt")
"""
from __future__ import annotations

import dataclasses
import os
import tempfile

import torch
from torch import nn

from dsoft_dist.models.registry import build_model, model_config_dict
from dsoft_dist.observability import get_logger

FORMAT = "dsoft_backbone"
VERSION = 1
log = get_logger(__name__)


def _cfg_dict(model_cfg) -> dict:
    if dataclasses.is_dataclass(model_cfg):
        model_cfg = dataclasses.asdict(model_cfg)
    if not isinstance(model_cfg, dict) or "name" not in model_cfg:
        raise ValueError(f"model config {model_cfg!r} is invalid: pass a dict (or ModelConfig) with at least 'name'")
    known = {"name", "embedding_size", "input_size", "in_features", "dropout", "activation_checkpointing"}
    unknown = sorted(set(model_cfg) - known)
    if unknown:
        raise ValueError(f"model config has unknown keys {unknown}: use only {sorted(known)}")
    return model_config_dict(**model_cfg)


def _plain_state_dict(model: nn.Module) -> dict:
    """CPU copy of the state_dict without DDP/compile wrapper prefixes ("module.", "_orig_mod.")."""
    inner = getattr(model, "module", model)
    inner = getattr(inner, "_orig_mod", inner)
    return {k: v.detach().to("cpu").clone() for k, v in inner.state_dict().items()}


def save_backbone(path: str, model: nn.Module, model_cfg_dict, extra: dict | None = None) -> None:
    """Writes the checkpoint atomically (temp file in the same directory, then os.replace).

    extra: plain data only (numbers, strings, lists, dicts, tensors) so the file loads with weights_only.
    """
    payload = {"format": FORMAT, "version": VERSION, "model": _cfg_dict(model_cfg_dict),
               "state_dict": _plain_state_dict(model), "extra": dict(extra or {})}
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=directory)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes it 0600; the file is shared like every other output
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    log.debug("saved backbone %s to %s", payload["model"]["name"], path)


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it: put it straight back
    os.umask(mask)
    return mask


def read_backbone_file(path: str, map_location="cpu") -> dict:
    """Loads and validates the checkpoint dict with ``torch.load(weights_only=True)``."""
    if not os.path.isfile(path):
        what = "is a folder, not a backbone file" if os.path.isdir(path) else "does not exist"
        raise FileNotFoundError(f"backbone file {path!r} {what}: pass the backbone.pt that dsoft train writes "
                                "into its logging.output_dir")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # weights_only refuses pickled code/objects
        raise ValueError(f"checkpoint {path!r} could not be loaded safely ({type(exc).__name__}: {exc}); "
                         "only backbone files of plain tensors and config are accepted: write it with dsoft train "
                         "or dsoft ckpt export") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"checkpoint {path!r} is not a dsoft backbone checkpoint (format != {FORMAT!r}): "
                         "write it with dsoft train or dsoft ckpt export")
    if payload.get("version") != VERSION:
        raise ValueError(f"checkpoint {path!r} has version {payload.get('version')!r}; this code reads {VERSION}")
    return payload


def load_backbone(path: str, map_location="cpu") -> tuple[nn.Module, dict]:
    """Rebuilds the model through the registry and loads its weights (strict). Returns (model in eval mode, cfg)."""
    payload = read_backbone_file(path, map_location)
    cfg = _cfg_dict(payload["model"])
    model = build_model(**cfg)
    try:
        model.load_state_dict(payload["state_dict"], strict=True)
    except RuntimeError as exc:
        raise ValueError(f"checkpoint {path!r} weights do not match model {cfg}: {exc}") from exc
    model.to(map_location if isinstance(map_location, (str, torch.device)) else "cpu")
    return model.eval(), cfg
