"""Safe reading of InsightFace ``.bin`` verification sets (LFW, CFP-FP, AgeDB-30, ...).

A ``.bin`` file is a pickle of ``(bins, issame)``: ``bins`` holds 2N encoded images (JPEG/PNG
bytes) or decoded uint8 arrays, ``issame`` N booleans (pair i = images 2i and 2i+1). Pickles
can run code on load, so these files go through a restricted unpickler that only builds
plain containers, bytes, numbers, and numpy arrays/dtypes of non-object type; any other
global (``os.system``, ``builtins.eval``, ...) is refused before it is called.

    bins, issame = load_bin("lfw.bin")          # list of 2N encoded images, (N,) bool
    images = decode_images(bins[:8], size=112)  # (8, 112, 112, 3) uint8 RGB
"""
from __future__ import annotations

import io
import os
import pickle
from functools import partial
from typing import Sequence

import numpy as np
from PIL import Image

from dsoft_dist.observability import get_logger

try:  # numpy >= 2
    from numpy._core.multiarray import _reconstruct as _np_reconstruct
    from numpy._core.multiarray import scalar as _np_scalar
except ImportError:  # numpy 1.x
    from numpy.core.multiarray import _reconstruct as _np_reconstruct
    from numpy.core.multiarray import scalar as _np_scalar

log = get_logger(__name__)


class BinFormatError(ValueError):
    """A .bin file is malformed or holds something other than images and flags."""


def _reconstruct(*args):
    """numpy's array reconstructor (``_reconstruct(ndarray, shape, dtype)``), subtype checked."""
    if not args or args[0] is not np.ndarray:
        raise pickle.UnpicklingError("refusing an ndarray subclass in a .bin file")
    return _np_reconstruct(*args)


def _safe_dtype(*args, **kwargs):
    dtype = np.dtype(*args, **kwargs)
    if dtype.hasobject:
        raise pickle.UnpicklingError("refusing an object-dtype array in a .bin file (it could hold arbitrary objects)")
    return dtype


def _safe_scalar(dtype, data=None):
    if not isinstance(dtype, np.dtype) or dtype.hasobject:
        raise pickle.UnpicklingError("refusing an object-dtype scalar in a .bin file")
    return _np_scalar(dtype, data)


def _frombuffer(buf, dtype, shape, order):
    """numpy's protocol-5 array builder, for non-object dtypes only."""
    if not isinstance(dtype, np.dtype) or dtype.hasobject:
        raise pickle.UnpicklingError("refusing an object-dtype array in a .bin file")
    return np.frombuffer(buf, dtype=dtype).reshape(shape, order=order).copy()


def _encode(text, encoding="latin1"):
    """``_codecs.encode``: how protocol-2 pickles written by Python 3 store bytes."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"refusing _codecs.encode with encoding {encoding!r} in a .bin file")
    return text.encode("latin1")


def _from_data(kind, data=b"", *encoding):
    """bytes()/bytearray() from existing data only (an int argument would allocate that many bytes)."""
    if not isinstance(data, (bytes, bytearray, str)):
        raise pickle.UnpicklingError(f"refusing {kind.__name__}({type(data).__name__}) in a .bin file")
    return kind(data, *encoding) if isinstance(data, str) else kind(data)


_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy.core.multiarray", "scalar"): _safe_scalar,
    ("numpy._core.multiarray", "scalar"): _safe_scalar,
    ("numpy.core.numeric", "_frombuffer"): _frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _frombuffer,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): _safe_dtype,
    ("_codecs", "encode"): _encode,
    # protocol 2 stores empty bytes and bytearrays through these builtins (data only, no code)
    ("builtins", "bytes"): partial(_from_data, bytes), ("__builtin__", "bytes"): partial(_from_data, bytes),
    ("builtins", "bytearray"): partial(_from_data, bytearray),
    ("__builtin__", "bytearray"): partial(_from_data, bytearray),
}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler whose only reachable globals are the array/bytes builders in ``_ALLOWED``."""

    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"global '{module}.{name}' is not allowed in a .bin file (only images, flags and numpy arrays)"
            ) from None

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("persistent ids are not allowed in a .bin file")


def _as_issame(raw, path: str) -> np.ndarray:
    flags = np.asarray(raw)
    if flags.ndim != 1 or not (flags.dtype == np.bool_ or np.isin(flags, (0, 1)).all()):
        raise BinFormatError(f"{path}: issame must be a flat list of booleans, got dtype {flags.dtype} "
                             f"shape {flags.shape}")
    return flags.astype(bool)


def _as_images(raw, path: str) -> list:
    if isinstance(raw, np.ndarray) and raw.dtype == np.uint8 and raw.ndim in (3, 4):
        return list(raw)  # decoded images (2N, H, W[, C])
    if not isinstance(raw, (list, tuple)):
        raise BinFormatError(f"{path}: images must be a list of encoded bytes or a uint8 array, "
                             f"got {type(raw).__name__}")
    images = []
    for i, item in enumerate(raw):
        if isinstance(item, (bytes, bytearray)):
            images.append(bytes(item))
        elif isinstance(item, np.ndarray) and item.dtype == np.uint8:
            images.append(item)
        else:
            raise BinFormatError(f"{path}: image {i} is {type(item).__name__}, expected encoded bytes or a uint8 array")
    return images


def load_bin(path: str) -> tuple[list, np.ndarray]:
    """Reads a .bin verification set safely. Returns (2N encoded images (bytes) or uint8 arrays, (N,) bool issame).

    Raises BinFormatError (a ValueError) for anything that is not images + flags, including pickles that
    reference functions or classes; nothing from the file is ever called except numpy array builders.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f".bin file {path!r} does not exist: check the path (e.g. faces_emore/lfw.bin)")
    with open(path, "rb") as f:
        try:
            data = RestrictedUnpickler(f, encoding="bytes").load()
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError,
                IndexError, KeyError) as exc:
            raise BinFormatError(f"{path}: not a valid .bin verification set ({exc}); "
                                 "expected a pickle of (list of encoded images, list of bools)") from exc
    if not isinstance(data, (tuple, list)) or len(data) != 2:
        raise BinFormatError(f"{path}: expected a pair (images, issame), got {type(data).__name__}")
    images, issame = _as_images(data[0], path), _as_issame(data[1], path)
    if len(images) != 2 * len(issame) or len(issame) == 0:
        raise BinFormatError(f"{path}: {len(images)} images for {len(issame)} pairs; need exactly 2 images per pair")
    log.debug("loaded %s: %d pairs (%d same)", path, len(issame), int(issame.sum()))
    return images, issame


def write_bin(path: str, images: Sequence[bytes], issame: Sequence[bool]) -> None:
    """Writes a .bin file in the InsightFace layout (pickle protocol 4 of (list of bytes, list of bool))."""
    if len(images) != 2 * len(issame):
        raise ValueError(f"write_bin: {len(images)} images for {len(issame)} pairs; need 2 per pair")
    with open(path, "wb") as f:
        pickle.dump(([bytes(b) for b in images], [bool(s) for s in issame]), f, protocol=4)


def decode_image(item, size: int) -> np.ndarray:
    """One encoded image (bytes) or uint8 array -> (size, size, 3) uint8 RGB (resized when needed)."""
    if isinstance(item, np.ndarray):
        if item.ndim == 3 and item.shape[0] in (1, 3) and item.shape[-1] not in (1, 3, 4):
            item = item.transpose(1, 2, 0)  # (C, H, W) -> (H, W, C)
        img = Image.fromarray(item[..., 0] if item.ndim == 3 and item.shape[-1] == 1 else item)
    else:
        try:
            img = Image.open(io.BytesIO(item))
            img.load()
        except Exception as exc:  # PIL raises many types for corrupt data
            raise BinFormatError(f"could not decode an image ({type(exc).__name__}: {exc})") from exc
    img = img.convert("RGB")
    if img.size != (size, size):
        img = img.resize((size, size), Image.BILINEAR)
    return np.asarray(img, dtype=np.uint8)


def decode_images(items: Sequence, size: int) -> np.ndarray:
    """Encoded images -> (N, size, size, 3) uint8 RGB."""
    out = np.empty((len(items), size, size, 3), dtype=np.uint8)
    for i, item in enumerate(items):
        out[i] = decode_image(item, size)
    return out
