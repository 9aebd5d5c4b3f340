"""General helpers with no domain of their own: atomic writes, file hashes, plain-tensor loads, CPU copies.

    write_text_atomic(path, text)     # readers see the old file or the whole new one
    atomic_save(obj, path)            # torch.save the same way (the folder is created)
    sha256_file(path)                 # hex digest, read in 1 MiB blocks
    load_weights_only(path)           # torch.load(weights_only=True); CheckpointError naming the file
    cpu_copy(state)                   # every tensor copied to the CPU: a snapshot training can't change
    failpoint("ckpt-write", step)     # the chaos soak's fault injection: SIGKILL here when armed

Above ``dsoft_dist.errors`` only; every other layer may import it (docs/design.md, "Layers").
"""
from __future__ import annotations

import hashlib
import os
import signal
import sys

import torch

from dsoft_dist.errors import CheckpointError

__version__ = "0.1.0"


def write_text_atomic(path: str, text: str) -> None:
    """Writes ``text`` to a temporary file beside ``path``, syncs it, renames it over ``path``: a reader sees
    the old file or the whole new one, never part of it."""
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def atomic_save(obj, path: str) -> None:
    """torch.save to a temporary file in the same folder (created if missing), then os.replace."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def sha256_file(path: str, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def load_weights_only(path: str, map_location="cpu"):
    """``torch.load(weights_only=True)`` with an error that names the file when it is refused."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # weights_only refuses anything but tensors and plain containers
        raise CheckpointError(f"{path} could not be loaded as plain tensors and values ({type(err).__name__}: "
                              f"{err}); checkpoints hold no code: this file was not written by dsoft") from err


def flat_dict(d: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}: a nested dict's leaves under dotted keys."""
    out = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(flat_dict(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def cpu_copy(obj):
    """``obj`` with every tensor copied to the CPU (containers rebuilt): a snapshot training can't change."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(cpu_copy(v) for v in obj)
    return obj


def plain_help(text: str | None) -> str | None:
    """Help text without reStructuredText literals: ````x```` -> ```x``` (descriptions come from module docs)."""
    return text.replace("``", "`") if text else text


def int_list(text: str, option: str, low: int) -> list[int]:
    """'0,1,2' or '100000,1e6' -> [ints]; ValueError naming the option unless each is a whole number >= low."""
    try:
        numbers = [float(v) for v in text.split(",")]
    except ValueError:
        numbers = []
    if not numbers or not all(n.is_integer() and n >= low for n in numbers):
        raise ValueError(f"{option} {text!r} is invalid: give comma-separated integers >= {low}, e.g. "
                         f"{low},{low + 1}")
    return [int(n) for n in numbers]


FAILPOINT_ENV = "DSOFT_FAILPOINT"


def failpoint(name: str, step: int) -> None:
    """The fault-injection hook of the chaos soak (``dsoft bench chaos``): this process kills itself with SIGKILL
    at the point ``name`` when it is armed, as a crash there would stop it.

    Armed by a file: ``DSOFT_FAILPOINT`` names it, and it holds ``NAME`` (the next time any process of the run
    passes that point) or ``NAME STEP`` (at that optimizer step only). The process that fires removes the file
    first, so the fault happens once, even when the restarted run passes the point again. Points:
    ``ckpt-write`` (a checkpoint's files and manifest are in ``step-N.tmp``, before its rename) and
    ``ckpt-rename`` (renamed to ``step-N``, before ``latest`` moves). Unset, it costs one environment lookup.
    """
    path = os.environ.get(FAILPOINT_ENV)
    if not path:
        return
    try:
        with open(path, encoding="utf-8") as fh:
            words = fh.read().split()
    except FileNotFoundError:  # not armed (or fired already)
        return
    if len(words) not in (1, 2) or (len(words) == 2 and not words[1].isdigit()):
        raise ValueError(f"{FAILPOINT_ENV} file {path} holds {' '.join(words)!r}: write a point's name, or a name "
                         "and a step (e.g. 'ckpt-write' or 'ckpt-write 7'), or remove the file")
    if words[0] != name or (len(words) == 2 and int(words[1]) != step):
        return
    try:
        os.remove(path)  # one process wins: the fault fires once
    except FileNotFoundError:
        return
    sys.stderr.write(f"failpoint {name} at step {step}: SIGKILL to process {os.getpid()} ({FAILPOINT_ENV})\n")
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)
