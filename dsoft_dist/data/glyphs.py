"""Glyph identities: an open-set image identity task with real shapes, rendered from bundled fonts.

An identity is one Unicode character; its samples are that character drawn in the font styles
that cover it (real intra-class variation: regular, bold, oblique, serif, mono, STIX) through a
random nuisance, so face-recognition losses can be compared on images with real structure on a
CPU, with nothing to download. Inter-class similarity is real too (e/é/è/ê, Greek and Cyrillic
letters, arrows, box drawing, math symbols).

Fonts: the 16 styles bundled with matplotlib (``FONT_STYLES``: DejaVu Sans, Sans Mono, Serif and
STIX General, each regular, bold, italic/oblique and bold italic), drawn with Pillow; coverage
from each font's cmap (fontTools). The character set (``glyph_set()``, computed once per process
and cached) holds the characters of Unicode categories L, N, S and P covered by at least
``MIN_STYLES`` (8) styles, less look-alikes: each candidate is drawn once in its first covering
style (DejaVu Sans for all of them today) on a 32 px canvas, centered on its ink, binarized, and a
character whose bitmap differs from an already kept one (in code point order) by at most
``LOOKALIKE_PIXELS`` pixels is dropped, so Latin A, Greek Alpha and Cyrillic A are one identity (and,
as samples are centered on their ink too, so are ² and ₂); glyphs with under ``MIN_INK_PIXELS`` ink
pixels are dropped too. With matplotlib 3.11 (Pillow 13): 3,206 candidates, 2,884 characters
kept. The set depends only on the fonts and FreeType (``glyph_set_digest`` tells two sets apart).

Identities: a seeded permutation (``FeistelPermutation``, key from the data seed) of the set.
Training global id g (``identity_offset + identity``) takes permutation position g; evaluation ids
g >= ``EVAL_IDENTITY_OFFSET`` take position ``len - 1 - (g - EVAL_IDENTITY_OFFSET)``, counted from
the end. The last ``EVAL_GLYPHS`` (500) positions are the evaluation side's and the rest the
training side's (``glyph_capacity()``: 2,384 + 500 today), each checked by the constructor, so the
training and evaluation characters of one seed never overlap.

Sample ``index`` of an identity depends only on (seed, global id, index, image_size, difficulty):
a style among the covering ones, then at twice the output size an affine pose (``rotation_deg``,
``scale``, ``shift``), a stroke-width change (thicker or thinner, with probability ``yaw``: the
shape's own deformation standing in for the face's pose), a 2x box downsample, Gaussian ``blur``,
foreground and background colors (gray contrast >= 0.35, either polarity, so identity lives in the shape
only) under an ``illumination`` gain and gradient, pixel ``noise`` and an occluding rectangle
(``occlusion``). Faces' ``flip`` and ``identity_spread`` do not apply: a mirrored glyph is another
character (b/d), and a character is its own identity. Rendered glyphs are cached per (character,
style, size) in an LRU of at most 192 MiB per process (all 34,880 pairs at 32 px: ~50 MiB resident); a
first render costs ~0.13 ms. Measured on one core of a shared 2-core machine: a 32 px sample ~0.35 ms
(easy to hard), a 112 px one 1.5-4 ms; the set ~0.9 s once per process.

    python -c "from dsoft_dist.data.glyphs import GlyphIdentities as G; print(G(10, image_size=32).sample(3, 0).shape)"
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import unicodedata
from collections import OrderedDict
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from dsoft_dist.data.rng import FeistelPermutation, hash_keys, hash_uniform
from dsoft_dist.data.synthetic import EVAL_IDENTITY_OFFSET, RenderedIdentities

FONT_STYLES = tuple(f"DejaVuSans{s}" for s in ("", "-Bold", "-Oblique", "-BoldOblique")) + tuple(
    f"DejaVuSansMono{s}" for s in ("", "-Bold", "-Oblique", "-BoldOblique")) + tuple(
    f"DejaVuSerif{s}" for s in ("", "-Bold", "-Italic", "-BoldItalic")) + tuple(
    f"STIXGeneral{s}" for s in ("", "Bol", "Italic", "BolIta"))
MIN_STYLES = 8  # a character needs this many styles: its intra-class variation
EVAL_GLYPHS = 500  # the last permutation positions, kept for evaluation (unseen) identities
LOOKALIKE_PIXELS = 1  # at 32 px: 0-1 catches A/Alpha, o/omicron, ,/U+201A; accents (A-grave/A-acute) differ by 2+
MIN_INK_PIXELS = 4  # at 32 px: fewer is an empty glyph (braille blank, U+FFFC)
_CATEGORIES = "LNSP"  # letters, numbers, symbols, punctuation: no marks, spaces or controls
_DEDUP_CANVAS = 32
_FONT_FRACTION = 0.6  # font size / canvas side: cap height ~0.45 of the canvas leaves room for the pose
_FIT = 0.9  # a glyph whose ink is wider or taller than this share of the canvas is shrunk to it
_CACHE_BYTES = 192 << 20  # per process
_ENTRY_BYTES = 600  # a cached glyph's memory beyond its pixels (PIL image, key, LRU links), measured
_TAG_PERM, _TAG_SAMPLE, _TAG_NOISE = 41, 42, 43


def font_dir() -> str:
    """The folder of matplotlib's bundled TrueType fonts (found without importing matplotlib)."""
    spec = importlib.util.find_spec("matplotlib")
    if spec is None or not spec.origin:
        raise ValueError("synthetic_mode=glyphs draws matplotlib's bundled fonts, and matplotlib is not installed: "
                         "pip install matplotlib")
    return os.path.join(os.path.dirname(spec.origin), "mpl-data", "fonts", "ttf")


@functools.cache
def _font(style: int, px: int) -> ImageFont.FreeTypeFont:
    path = os.path.join(font_dir(), FONT_STYLES[style] + ".ttf")
    if not os.path.isfile(path):
        raise ValueError(f"the glyph font {path} is missing: reinstall matplotlib (it bundles the "
                         f"{len(FONT_STYLES)} styles synthetic_mode=glyphs draws)")
    return ImageFont.truetype(path, size=px)


def render_glyph(char: str, style: int, px: int) -> Image.Image | None:
    """``char`` drawn in ``FONT_STYLES[style]`` at font size ``px``, cropped to its ink: an "L" image
    (255 = ink, anti-aliased), or None when the glyph has no ink."""
    font = _font(style, px)
    left, top, right, bottom = font.getbbox(char)
    canvas = Image.new("L", (right - left + 4, bottom - top + 4), 0)
    ImageDraw.Draw(canvas).text((2 - left, 2 - top), char, font=font, fill=255)
    box = canvas.getbbox()
    return None if box is None else canvas.crop(box)


class GlyphSet(NamedTuple):
    """The identities' characters: ``chars[k]`` and the indices into FONT_STYLES covering it,
    ``styles[k]`` (ascending; the first one is the style the look-alike test drew)."""

    chars: tuple[str, ...]
    styles: tuple[tuple[int, ...], ...]


def _coverage() -> dict[int, list[int]]:
    """code point -> the styles whose cmap maps it, for the candidate categories."""
    from fontTools.ttLib import TTFont  # noqa: PLC0415 (a matplotlib dependency, needed only here)

    covered: dict[int, list[int]] = {}
    for style, name in enumerate(FONT_STYLES):
        _font(style, 12)  # the missing-file error above, before fontTools' own
        cmap = TTFont(os.path.join(font_dir(), name + ".ttf"), lazy=True).getBestCmap()
        for cp in cmap:
            if unicodedata.category(chr(cp))[0] in _CATEGORIES:
                covered.setdefault(cp, []).append(style)
    return covered


def _bitmap(char: str, style: int) -> np.ndarray:
    """(32 * 32,) bool: the glyph centered on its ink on a 32 px canvas, binarized at half ink."""
    canvas = Image.new("L", (_DEDUP_CANVAS, _DEDUP_CANVAS), 0)
    ink = render_glyph(char, style, round(_FONT_FRACTION * _DEDUP_CANVAS))
    if ink is not None:  # a negative offset clips an oversized glyph, the same for every candidate
        canvas.paste(ink, ((_DEDUP_CANVAS - ink.width) // 2, (_DEDUP_CANVAS - ink.height) // 2))
    return np.asarray(canvas).reshape(-1) >= 128


@functools.cache
def glyph_set() -> GlyphSet:
    """The character set (module doc): covered by >= MIN_STYLES styles, no look-alikes, no empty glyphs,
    in code point order. Computed once per process (~0.9 s)."""
    candidates = sorted((cp, styles) for cp, styles in _coverage().items() if len(styles) >= MIN_STYLES)
    bits = np.stack([_bitmap(chr(cp), styles[0]) for cp, styles in candidates])  # (N, 1024) bool
    signs = bits.astype(np.float32) * 2 - 1
    kept = np.zeros(len(candidates), dtype=bool)
    for start in range(0, len(candidates), 512):  # row blocks: (512, N) distances at a time, not (N, N)
        # Hamming distance of +-1 vectors: (P - a.b) / 2; float32 holds these integers exactly
        distance = (bits.shape[1] - signs[start:start + 512] @ signs.T) / 2  # (512, N)
        for row, k in enumerate(range(start, min(start + 512, len(candidates)))):
            # in code point order: the lowest of a look-alike group stays
            if bits[k].sum() >= MIN_INK_PIXELS and not (distance[row, kept] <= LOOKALIKE_PIXELS).any():
                kept[k] = True
    chosen = [candidates[k] for k in np.flatnonzero(kept)]
    return GlyphSet(tuple(chr(cp) for cp, _ in chosen), tuple(tuple(s) for _, s in chosen))


def glyph_set_digest() -> str:
    """16 hex digits of the sha256 of the set's characters, in order: equal digests, equal identities."""
    return hashlib.sha256("".join(glyph_set().chars).encode("utf-8")).hexdigest()[:16]


def glyph_capacity() -> dict[str, int]:
    """How many identities each side may use: {"train": len(set) - EVAL_GLYPHS, "eval": EVAL_GLYPHS,
    "total": len(set)}. Training ids [0, train) and evaluation ids [EVAL_IDENTITY_OFFSET,
    EVAL_IDENTITY_OFFSET + eval) never share a character."""
    total = len(glyph_set().chars)
    return {"train": total - EVAL_GLYPHS, "eval": EVAL_GLYPHS, "total": total}


class _RenderCache:
    """An LRU of rendered glyphs, bounded by their pixel bytes (per process: DataLoader workers have their own)."""

    def __init__(self, max_bytes: int):
        self.max_bytes, self.bytes = max_bytes, 0
        self.items: OrderedDict[tuple, Image.Image | None] = OrderedDict()

    def get(self, char: str, style: int, px: int) -> Image.Image | None:
        key = (char, style, px)
        if key in self.items:
            self.items.move_to_end(key)
            return self.items[key]
        ink = render_glyph(char, style, px)
        self.items[key] = ink
        self.bytes += _ENTRY_BYTES + (0 if ink is None else ink.width * ink.height)
        while self.bytes > self.max_bytes and len(self.items) > 1:
            _, old = self.items.popitem(last=False)
            self.bytes -= _ENTRY_BYTES + (0 if old is None else old.width * old.height)
        return ink


_CACHE = _RenderCache(_CACHE_BYTES)


def _side_check(num_identities: int, identity_offset: int) -> None:
    """ValueError when the ids [offset, offset + num) leave their side's share of the set (glyph_capacity)."""
    if num_identities < 1:
        raise ValueError(f"num_identities={num_identities} is invalid: must be >= 1")
    cap = glyph_capacity()
    if identity_offset >= EVAL_IDENTITY_OFFSET:
        first, side, room = identity_offset - EVAL_IDENTITY_OFFSET, "eval", cap["eval"]
        name = "identity_offset - EVAL_IDENTITY_OFFSET"
    else:
        first, side, room, name = identity_offset, "train", cap["train"], "identity_offset"
    if first < 0 or first + num_identities > room:
        raise ValueError(f"{name}={first} + num_identities={num_identities} exceeds the {room} {side} identities "
                         f"of the glyph set ({cap['total']} characters: {cap['train']} for training, the last "
                         f"{cap['eval']} for evaluation, so the two never overlap): use at most {room} identities "
                         f"from offset 0 (data.num_classes <= {cap['train']} for training)")


class GlyphIdentities(RenderedIdentities):
    """Glyph identities rendered on demand: ``sample(identity, index) -> (H, W, 3) uint8`` (module doc).

    The interface of ``SyntheticIdentities``: identity is local in [0, num_identities), its global id
    identity_offset + identity (evaluation ids from EVAL_IDENTITY_OFFSET); the pixels depend only on
    (seed, global id, index, image_size, difficulty). ``char(identity)`` names the character.
    """

    def __init__(self, num_identities: int, image_size: int = 32, seed: int = 0, identity_offset: int = 0,
                 difficulty="medium"):
        _side_check(int(num_identities), int(identity_offset))
        super().__init__(num_identities, image_size, seed, identity_offset, difficulty, "32 for glyphs")
        self.glyphs = glyph_set()
        total = len(self.glyphs.chars)
        perm = FeistelPermutation(total, int(hash_keys(self.seed, _TAG_PERM)))
        gids = self.identity_offset + np.arange(self.num_identities, dtype=np.int64)
        positions = gids if self.identity_offset < EVAL_IDENTITY_OFFSET else total - 1 - (gids - EVAL_IDENTITY_OFFSET)
        self._chars = perm(positions)  # (num_identities,) indices into self.glyphs
        self._render = 2 * self.image_size  # drawn at twice the size, box-averaged down: smooth edges

    def char(self, identity: int) -> str:
        """The character of a (local) identity."""
        self.global_id(identity)
        return self.glyphs.chars[self._chars[identity]]

    def sample(self, identity: int, index: int) -> np.ndarray:
        """Renders sample ``index`` of ``identity``: (H, W, 3) uint8."""
        gid = self.global_id(identity)
        k = int(self._chars[identity])
        n = hash_uniform((self.seed, _TAG_SAMPLE, gid, index), 25)
        styles = self.glyphs.styles[k]
        ink = _CACHE.get(self.glyphs.chars[k], styles[int(n[0] * len(styles))], self._font_px)
        if ink is None:  # that style draws the character empty (rare): the look-alike test's style drew ink
            ink = _CACHE.get(self.glyphs.chars[k], styles[0], self._font_px)
        mask = self._stroke(self._pose(ink, n), n).reduce(2)  # (H, W) "L", 255 = ink
        sigma = self.difficulty.blur * n[7] * self.image_size / 112.0
        if sigma > 0.3:
            mask = mask.filter(ImageFilter.GaussianBlur(float(sigma)))
        img = self._paint(np.asarray(mask, dtype=np.float32) * np.float32(1 / 255), n, gid, index)
        return (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)

    @property
    def _font_px(self) -> int:
        return round(_FONT_FRACTION * self._render)

    def _pose(self, ink: Image.Image, n: np.ndarray) -> Image.Image:
        """The ink centered on the (2S, 2S) canvas, rotated, scaled and shifted: one inverse affine map
        output (x, y) -> ink (a x + b y + c, d x + e y + f)."""
        d, size = self.difficulty, self._render
        theta = np.deg2rad(d.rotation_deg) * (2 * n[1] - 1)
        zoom = (1.0 + d.scale * (2 * n[2] - 1)) * min(1.0, _FIT * size / max(ink.width, ink.height))
        ox = size / 2 + d.shift * (2 * n[3] - 1) * size / 2  # where the ink's center lands
        oy = size / 2 + d.shift * (2 * n[4] - 1) * size / 2
        a, b = np.cos(theta) / zoom, np.sin(theta) / zoom
        data = (a, b, ink.width / 2 - a * ox - b * oy, -b, a, ink.height / 2 + b * ox - a * oy)
        return ink.transform((size, size), Image.Transform.AFFINE, data, resample=Image.Resampling.BILINEAR,
                             fillcolor=0)

    def _stroke(self, mask: Image.Image, n: np.ndarray) -> Image.Image:
        """Thicker (3x3 max) or thinner (3x3 min) strokes with probability ``yaw``, else unchanged. A thinning
        that would leave under 60% of the ink is skipped: hairlines (STIX, small glyphs) would vanish."""
        if n[5] >= min(1.0, self.difficulty.yaw):
            return mask
        if n[6] < 0.5:
            return mask.filter(ImageFilter.MaxFilter(3))
        thin = mask.filter(ImageFilter.MinFilter(3))
        return thin if np.asarray(thin).sum(dtype=np.int64) >= 0.6 * np.asarray(mask).sum(dtype=np.int64) else mask

    def _paint(self, mask: np.ndarray, n: np.ndarray, gid: int, index: int) -> np.ndarray:
        """Foreground/background colors, illumination, noise, occlusion: mask (H, W) in [0, 1] -> (H, W, 3)."""
        d, size = self.difficulty, self.image_size
        back, contrast = n[8], 0.35 + 0.5 * n[9]  # gray levels; the ink goes toward the far end
        fore = max(0.0, back - contrast) if back >= 0.5 else min(1.0, back + contrast)
        bg = np.clip(back + 0.3 * (n[10:13] - 0.5), 0, 1).astype(np.float32)  # (3,) a tint on each
        fg = np.clip(fore + 0.3 * (n[13:16] - 0.5), 0, 1).astype(np.float32)
        img = bg + (fg - bg) * mask[..., None]  # (H, W, 3)
        gain, light = 1.0 + d.illumination * (2 * n[16] - 1), d.illumination * (2 * n[17:19] - 1)
        img *= (gain * (1.0 + light[0] * self._x + light[1] * self._y))[..., None].astype(np.float32)
        if d.noise > 0:
            rng = np.random.default_rng([self.seed, _TAG_NOISE, gid, index])
            img += rng.standard_normal(img.shape, dtype=np.float32) * np.float32(d.noise)
        if n[19] < d.occlusion:  # smaller than the faces' patch: a glyph is a few strokes
            h, w = int(size * (0.15 + 0.2 * n[20])), int(size * (0.15 + 0.2 * n[21]))
            top, left = int((size - h) * n[22]), int((size - w) * n[23])
            img[top:top + h, left:left + w] = np.float32(back if n[24] < 0.5 else fore)
        return img
