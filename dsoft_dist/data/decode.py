"""Image and feature-vector decoding, label parsing, face augmentations and normalization.

Decoding uses simplejpeg (libjpeg-turbo, ``pip install simplejpeg``) for JPEG when it
is installed and Pillow otherwise (and always for PNG/WebP). ``decode_sample`` turns a
raw sample dict into ``(image uint8 (H, W, 3), label int)`` or raises ``BadSample``
naming the kind of problem; the caller applies the bad-data policy. ``decode_vector`` does
the same for feature-vector samples (``KEY.f16|f32|npy`` + ``KEY.cls``) -> (float32 (D,), label).

Augmentations (all from an explicit numpy Generator, so they are reproducible):
horizontal flip (p=0.5), color jitter (brightness/contrast/saturation factors in
[1-j, 1+j]) and a random crop (pad by size/8 with edge pixels, crop back).
Normalization maps uint8 x to (x / 255 - 0.5) / 0.5 in [-1, 1], the usual face range.

    python -c "from dsoft_dist.data.decode import FAST_JPEG; print('simplejpeg' if FAST_JPEG else 'pillow')"
"""
from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

try:  # optional fast JPEG decoder; Pillow is the fallback
    import simplejpeg as _simplejpeg
except ImportError:  # pragma: no cover - depends on the environment
    _simplejpeg = None

FAST_JPEG = _simplejpeg is not None
_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
VECTOR_EXTS = ("f16", "f32", "npy")  # feature-vector members (dsoft_dist.data.vectors)
RAW_VECTOR_DTYPES = {"f16": np.dtype("<f2"), "f32": np.dtype("<f4")}


class BadSample(ValueError):
    """A sample that cannot be used; ``kind`` is one of shards.BAD_KINDS."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def image_format(data: bytes) -> str:
    """Sniffs jpg | png | webp | "" from the first bytes."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return ""


def decode_image(data: bytes, use_fast: bool = True) -> np.ndarray:
    """Encoded bytes -> (H, W, 3) uint8 RGB. Raises ValueError/OSError on corrupt data."""
    if use_fast and FAST_JPEG and data[:3] == b"\xff\xd8\xff":
        return _simplejpeg.decode_jpeg(data, colorspace="RGB", strict=True)
    with Image.open(io.BytesIO(data)) as img:
        img.load()  # Pillow decodes lazily: force it so corrupt data raises here
        return np.asarray(img.convert("RGB"))


def resize(img: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of (H, W, 3) uint8 to (size, size, 3) (no-op when already there)."""
    if img.shape[0] == size and img.shape[1] == size:
        return img
    return np.asarray(Image.fromarray(img).resize((size, size), Image.BILINEAR))


def parse_label(sample: dict, num_classes: int) -> int:
    """The int class from ``cls`` (or ``label``/``id``) text bytes; checks [0, num_classes)."""
    raw = next((sample[k] for k in ("cls", "label", "id", "class") if k in sample), None)
    if raw is None:
        raise BadSample("missing_label", f"sample {sample.get('__key__')!r} has no cls/label entry")
    try:
        label = int(raw.decode("ascii").strip() if isinstance(raw, bytes) else raw)
    except (ValueError, UnicodeDecodeError):
        raise BadSample("bad_label", f"sample {sample.get('__key__')!r} has a non-integer label {raw[:20]!r}")
    if not 0 <= label < num_classes:
        raise BadSample("bad_label", f"sample {sample.get('__key__')!r} has label {label} outside "
                                     f"[0, num_classes={num_classes})")
    return label


def decode_sample(sample: dict, num_classes: int, image_size: int, use_fast: bool = True):
    """Raw sample dict -> (image (S, S, 3) uint8, label int); raises BadSample."""
    label = parse_label(sample, num_classes)
    ext = next((e for e in _IMAGE_EXTS if e in sample), None)
    if ext is None:
        hint = (": it holds a vector: vector shards are read through their manifest (set data.manifest)"
                if any(e in sample for e in VECTOR_EXTS) else "")
        raise BadSample("missing_image", f"sample {sample.get('__key__')!r} has no jpg/png/webp entry "
                                         f"(entries: {sorted(k for k in sample if not k.startswith('__'))}){hint}")
    try:
        img = decode_image(sample[ext], use_fast)
    except Exception as exc:  # every decoder failure is a corrupt image, whatever the library raises
        raise BadSample("corrupt_image", f"sample {sample.get('__key__')!r} ({ext}) does not decode: {exc}")
    return resize(img, image_size), label


def decode_vector(sample: dict, num_classes: int, dim: int) -> tuple[np.ndarray, int]:
    """Raw sample dict -> (vector (dim,) float32, label int); raises BadSample (missing/corrupt_vector)."""
    label = parse_label(sample, num_classes)
    ext = next((e for e in VECTOR_EXTS if e in sample), None)
    if ext is None:
        raise BadSample("missing_vector", f"sample {sample.get('__key__')!r} has no f16/f32/npy entry "
                                          f"(entries: {sorted(k for k in sample if not k.startswith('__'))})")
    data = sample[ext]
    try:
        vec = np.load(io.BytesIO(data), allow_pickle=False) if ext == "npy" else np.frombuffer(data, RAW_VECTOR_DTYPES[ext])
    except ValueError as exc:  # a malformed .npy, or a raw buffer whose size is no multiple of the item size
        raise BadSample("corrupt_vector", f"sample {sample.get('__key__')!r} ({ext}) does not decode: {exc}")
    if vec.size != dim:
        raise BadSample("corrupt_vector", f"sample {sample.get('__key__')!r} ({ext}) has {vec.size} values, the "
                                          f"manifest says vector_dim={dim}")
    return vec.reshape(dim).astype(np.float32), label


@dataclass(frozen=True)
class Augment:
    """Face augmentations: flip (p=0.5), color_jitter strength j in [0, 1], random_crop."""

    flip: bool = True
    color_jitter: float = 0.0
    random_crop: bool = False

    def __call__(self, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """(H, W, 3) uint8 -> (H, W, 3) uint8."""
        if self.random_crop:
            h, w = img.shape[:2]
            pad = max(1, h // 8)
            padded = np.pad(img, ((pad, pad), (pad, pad), (0, 0)), mode="edge")
            top, left = rng.integers(0, 2 * pad + 1, size=2)
            img = padded[top:top + h, left:left + w]
        if self.color_jitter > 0:
            img = _color_jitter(img, self.color_jitter, rng)
        if self.flip and rng.random() < 0.5:
            img = img[:, ::-1]
        return img  # possibly a strided view: the batching np.stack makes the one copy


def _color_jitter(img: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    b, c, s = 1.0 + strength * (2 * rng.random(3) - 1)
    x = img.astype(np.float32) * np.float32(b)
    mean = x.mean()
    x = (x - mean) * np.float32(c) + mean
    gray = x.mean(axis=2, keepdims=True)
    x = (x - gray) * np.float32(s) + gray
    return np.clip(x + 0.5, 0, 255).astype(np.uint8)


def normalize_images(batch_u8: torch.Tensor) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float32 in [-1, 1]: (x / 255 - 0.5) / 0.5."""
    return batch_u8.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0).contiguous()
