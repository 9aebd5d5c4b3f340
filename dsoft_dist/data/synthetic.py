"""Procedural synthetic identities: an open-set face-like embedding task at any scale.

Nothing is stored. Identity ``g`` (a global id) is a deterministic function of
(seed, g): a face-like layout (face oval, hair, eyes, brows, nose, mouth, their sizes,
positions and colors) plus an identity-specific skin texture (a sum of sinusoids).
Sample ``j`` of that identity renders the layout through nuisance variation drawn
from (seed, g, j): a pose-like warp (rotation, scale, shift, yaw that moves the inner
features against the outline), illumination (gain and a light gradient), blur, pixel
noise, an occluding patch and a horizontal flip. Rendering is analytic, so any image
size works (112 for real backbones, 32 for CPU demos) and costs ~1 ms per 112x112 image.

Open set: training uses global ids [identity_offset, identity_offset + num_identities)
with identity_offset=0 by default; evaluation uses ids starting at
``EVAL_IDENTITY_OFFSET`` (2**40), so train and eval identities never overlap.

``SyntheticVectors`` is the cheap mode for head-scaling experiments: latent identity
(normal, ``latent_dim``) + latent nuisance -> a fixed random 2-layer tanh network ->
``dim`` features + noise, vectorized over a batch (millions of classes on one CPU).

    python -c "from dsoft_dist.data.synthetic import SyntheticIdentities as S; print(S(10, image_size=32).sample(3, 0).shape)"
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dsoft_dist.data.rng import hash_normal, hash_uniform

EVAL_IDENTITY_OFFSET = 1 << 40  # first global id of the evaluation (unseen) identities
_TAG_ID, _TAG_SAMPLE, _TAG_NOISE, _TAG_VEC_ID, _TAG_VEC_SAMPLE = 11, 12, 13, 21, 22
_N_ID_PARAMS = 48
_N_TEXTURE = 8


@dataclass(frozen=True)
class Difficulty:
    """Knobs of the synthetic task (image mode). Larger nuisance / smaller spread = harder.

    identity_spread: how far identities deviate from the mean face (0..1); small values
        make identities look alike (fine-grained task).
    rotation_deg, scale, shift: pose-like affine warp ranges (uniform +-).
    yaw: +- horizontal shift of eyes/nose/mouth against the face outline (3D-pose proxy).
    illumination: +- global gain and light-gradient strength.
    blur: max Gaussian blur sigma in pixels at 112x112 (scaled with image size).
    noise: pixel noise standard deviation on the [0, 1] scale.
    occlusion: probability of an occluding rectangle (glasses/mask/hand proxy).
    flip: probability of a horizontal flip.
    """

    identity_spread: float = 1.0
    rotation_deg: float = 12.0
    scale: float = 0.08
    shift: float = 0.08
    yaw: float = 0.5
    illumination: float = 0.3
    blur: float = 1.2
    noise: float = 0.03
    occlusion: float = 0.2
    flip: float = 0.5

    def __post_init__(self):
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and value >= 0):
                raise ValueError(f"Difficulty.{name}={value!r} is invalid: must be a number >= 0")
        for name in ("identity_spread", "occlusion", "flip"):
            if getattr(self, name) > 1:
                raise ValueError(f"Difficulty.{name}={getattr(self, name)!r} is invalid: must be in [0, 1]")


DIFFICULTIES = {
    "easy": Difficulty(rotation_deg=5, scale=0.04, shift=0.04, yaw=0.2, illumination=0.15,
                       blur=0.5, noise=0.01, occlusion=0.0, flip=0.5),
    "medium": Difficulty(),
    "hard": Difficulty(identity_spread=0.6, rotation_deg=20, scale=0.12, shift=0.12, yaw=0.9,
                       illumination=0.5, blur=2.0, noise=0.06, occlusion=0.4, flip=0.5),
}


def get_difficulty(name_or_obj) -> Difficulty:
    """Returns a Difficulty from a preset name (easy | medium | hard) or passes one through."""
    if isinstance(name_or_obj, Difficulty):
        return name_or_obj
    if name_or_obj not in DIFFICULTIES:
        raise ValueError(f"difficulty={name_or_obj!r} is unknown: use one of {', '.join(DIFFICULTIES)}")
    return DIFFICULTIES[name_or_obj]


VECTOR_DIFFICULTIES = {  # SyntheticVectors' nuisance and noise for data.difficulty in vector mode
    "easy": {"nuisance": 0.15, "noise": 0.02},
    "medium": {"nuisance": 0.3, "noise": 0.05},  # SyntheticVectors' defaults
    "hard": {"nuisance": 0.6, "noise": 0.2},
}


def vector_difficulty(name: str) -> dict:
    """SyntheticVectors keyword arguments (nuisance, noise) of a preset name (easy | medium | hard)."""
    if name not in VECTOR_DIFFICULTIES:
        raise ValueError(f"difficulty={name!r} is unknown: use one of {', '.join(VECTOR_DIFFICULTIES)}")
    return dict(VECTOR_DIFFICULTIES[name])


def _check_ids(num_identities: int, identity_offset: int) -> None:
    if num_identities < 1:
        raise ValueError(f"num_identities={num_identities} is invalid: must be >= 1")
    if identity_offset < 0 or identity_offset + num_identities > (1 << 62):
        raise ValueError(f"identity_offset={identity_offset} is invalid: ids must lie in [0, 2**62)")


class RenderedIdentities:
    """What every image identity source shares (faces here, glyphs in ``dsoft_dist.data.glyphs``): identity is
    local in [0, num_identities), its global id identity_offset + identity; ``sample(identity, index) -> (H, W, 3)
    uint8`` (the subclass's) depends only on (seed, global id, index, image_size, difficulty)."""

    def __init__(self, num_identities: int, image_size: int, seed: int, identity_offset: int, difficulty,
                 usual_sizes: str):
        if image_size < 8:
            raise ValueError(f"image_size={image_size} is invalid: must be >= 8 ({usual_sizes} are usual)")
        self.num_identities, self.image_size = int(num_identities), int(image_size)
        self.seed, self.identity_offset = int(seed), int(identity_offset)
        self.difficulty = get_difficulty(difficulty)
        axis = (np.arange(self.image_size, dtype=np.float32) + 0.5) / self.image_size * 2 - 1
        self._y, self._x = np.meshgrid(axis, axis, indexing="ij")  # (H, W) each, in [-1, 1]

    def __len__(self) -> int:
        return self.num_identities

    def global_id(self, identity: int) -> int:
        if not 0 <= identity < self.num_identities:
            raise IndexError(f"identity={identity} outside [0, {self.num_identities})")
        return self.identity_offset + int(identity)

    def samples(self, identities, indices) -> np.ndarray:
        """Renders a batch: identities (B,), indices (B,) -> (B, H, W, 3) uint8."""
        return np.stack([self.sample(int(i), int(j)) for i, j in zip(identities, indices)])


class SyntheticIdentities(RenderedIdentities):
    """Face-like identities rendered on demand: ``sample(identity, index) -> (H, W, 3) uint8``.

    The pixels depend only on (seed, global id, index, image_size, difficulty). The
    background color is a per-sample nuisance, so identity lives in the face only.
    """

    def __init__(self, num_identities: int, image_size: int = 112, seed: int = 0,
                 identity_offset: int = 0, difficulty="medium"):
        _check_ids(num_identities, identity_offset)
        super().__init__(num_identities, image_size, seed, identity_offset, difficulty, "32 or 112")

    def identity_params(self, identity: int) -> np.ndarray:
        """The identity's layout parameters: (48,) uniforms in [0, 1), spread toward 0.5."""
        u = hash_uniform((self.seed, _TAG_ID, self.global_id(identity)), _N_ID_PARAMS)
        return 0.5 + self.difficulty.identity_spread * (u - 0.5)

    def sample(self, identity: int, index: int) -> np.ndarray:
        """Renders sample ``index`` of ``identity``: (H, W, 3) uint8."""
        gid = self.global_id(identity)
        p = self.identity_params(identity)
        n = hash_uniform((self.seed, _TAG_SAMPLE, gid, index), 22)
        x, y = self._warp(n)
        img = _render_face(p, n[16:19], x, y, yaw=self.difficulty.yaw * (2 * n[4] - 1), size=self.image_size)
        img = self._nuisance(img, n, gid, index)
        return (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)

    def _warp(self, n: np.ndarray):
        """Inverse affine map of the output grid into canonical face coordinates."""
        d = self.difficulty
        theta = np.deg2rad(d.rotation_deg) * (2 * n[0] - 1)
        scale = 1.0 + d.scale * (2 * n[1] - 1)
        tx, ty = d.shift * (2 * n[2] - 1), d.shift * (2 * n[3] - 1)
        c, s = np.float32(np.cos(theta) / scale), np.float32(np.sin(theta) / scale)
        xs, ys = self._x - np.float32(tx), self._y - np.float32(ty)
        return c * xs + s * ys, -s * xs + c * ys

    def _nuisance(self, img: np.ndarray, n: np.ndarray, gid: int, index: int) -> np.ndarray:
        """Illumination, blur, noise, occlusion, flip; img (H, W, 3) float32 in ~[0, 1]."""
        d, size = self.difficulty, self.image_size
        gain = 1.0 + d.illumination * (2 * n[5] - 1)
        light = d.illumination * (2 * n[6:8] - 1)
        shade = gain * (1.0 + light[0] * self._x + light[1] * self._y)  # (H, W)
        cast = 1.0 + 0.5 * d.illumination * (2 * n[19:22] - 1)  # (3,) color cast
        img = img * (shade[..., None] * cast).astype(np.float32)
        sigma = d.blur * n[8] * size / 112.0
        if sigma > 0.3:
            img = _gaussian_blur(img, sigma)
        if d.noise > 0:
            rng = np.random.default_rng([self.seed, _TAG_NOISE, gid, index])
            img = img + rng.standard_normal(img.shape, dtype=np.float32) * np.float32(d.noise)
        if n[9] < d.occlusion:
            h, w = int(size * (0.2 + 0.3 * n[10])), int(size * (0.2 + 0.4 * n[11]))
            top, left = int((size - h) * n[12]), int((size - w) * n[13])
            img[top:top + h, left:left + w] = np.float32(n[14])
        if n[15] < d.flip:
            img = img[:, ::-1]
        return img


def _ellipse(x, y, cx, cy, rx, ry, edge):
    """Soft mask of an axis-aligned ellipse; edge = transition width in ellipse units."""
    r = np.sqrt(((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2)
    return np.clip((1.0 - r) / edge + 0.5, 0.0, 1.0)


def _lerp(img, color, mask):
    return img + (np.asarray(color, np.float32) - img) * mask[..., None]


def _render_face(p: np.ndarray, bg, x: np.ndarray, y: np.ndarray, yaw: float, size: int) -> np.ndarray:
    """Renders face parameters p on background color bg (a per-sample nuisance) at
    canonical coordinates (x, y), each (H, W): returns (H, W, 3) float32."""
    edge = np.float32(4.0 / size)
    f32 = lambda v: np.float32(v)  # noqa: E731 - keep arithmetic in float32
    hair, skin = 0.05 + 0.5 * p[3:6], 0.35 + 0.55 * p[6:9]
    eye_c, mouth_c = 0.3 * p[9:12], np.array([0.5 + 0.4 * p[12], 0.15 + 0.3 * p[13], 0.15 + 0.3 * p[14]])
    face_rx, face_ry = f32(0.5 + 0.25 * p[15]) * f32(1 - 0.25 * abs(yaw)), f32(0.65 + 0.25 * p[16])
    face_cy = f32(0.1 * (p[17] - 0.5))
    shift = f32(0.25 * yaw * face_rx)  # inner features move with yaw, the outline does not
    img = np.broadcast_to(np.asarray(bg, np.float32), x.shape + (3,)).copy()  # (H, W, 3)
    img = _lerp(img, hair, _ellipse(x, y, 0, face_cy - f32(0.1 + 0.15 * p[18]), face_rx * f32(1.15), face_ry, edge))
    texture = np.zeros_like(x)
    for k in range(_N_TEXTURE):  # identity-specific skin texture
        a, fr, ang, ph = p[19 + k % 8], 3 + 7 * p[27 + k % 8], np.pi * p[(35 + k) % 48], 2 * np.pi * p[(40 + k) % 48]
        texture += f32(0.1 * a) * np.sin(f32(fr * np.cos(ang)) * x + f32(fr * np.sin(ang)) * y + f32(ph))
    face = _ellipse(x, y, 0, face_cy, face_rx, face_ry, edge)
    img = img + (np.asarray(skin, np.float32) * (1 + texture[..., None]) - img) * face[..., None]
    ex, ey = f32(0.18 + 0.17 * p[43]), face_cy - f32(0.05 + 0.2 * p[44])
    erx, ery = f32(0.07 + 0.08 * p[45]), f32(0.04 + 0.05 * p[46])
    brow_dy, brow_w = f32(0.08 + 0.1 * p[47]), f32(0.015 + 0.03 * p[1])
    for side in (-1, 1):
        cx = shift + side * ex
        img = _lerp(img, hair * 0.7, _ellipse(x, y, cx, ey - brow_dy - ery, erx * f32(1.3), brow_w, edge))
        img = _lerp(img, (0.95, 0.95, 0.95), _ellipse(x, y, cx, ey, erx, ery, edge))
        img = _lerp(img, eye_c, _ellipse(x, y, cx + f32(0.3) * erx * f32(yaw), ey, ery, ery, edge))
    nose_len = f32(0.1 + 0.12 * p[2])
    img = _lerp(img, skin * 0.75, _ellipse(x, y, shift * f32(1.2), ey + f32(0.1) + nose_len,
                                           f32(0.04 + 0.05 * p[4]), nose_len, edge) * f32(0.8))
    my = face_cy + f32(0.3 + 0.2 * p[5])
    return _lerp(img, mouth_c, _ellipse(x, y, shift, my, f32(0.12 + 0.18 * p[7]), f32(0.03 + 0.05 * p[8]), edge))


def _gaussian_blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur with edge padding; img (H, W, C) float32."""
    radius = max(1, int(np.ceil(2.5 * sigma)))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2).astype(np.float32)
    taps /= taps.sum()
    for axis in (0, 1):
        pad = [(0, 0)] * 3
        pad[axis] = (radius, radius)
        padded = np.pad(img, pad, mode="edge")
        n = img.shape[axis]
        img = sum(t * np.take(padded, np.arange(i, i + n), axis=axis) for i, t in enumerate(taps))
    return img.astype(np.float32)


class SyntheticVectors:
    """Cheap vector-mode identities: ``batch(identities, indices) -> (B, dim) float32``.

    x = tanh((z_g + nuisance * e_gj) W1 + b1) W2 + noise * n_gj, with z_g, e_gj ~ N(0, I)
    of size latent_dim drawn from (seed, g) and (seed, g, j), and W1 (latent_dim, hidden),
    b1, W2 (hidden, dim) fixed by seed. Cost per batch is O(B * (latent_dim + dim) * hidden).
    """

    def __init__(self, num_identities: int, dim: int = 128, seed: int = 0, identity_offset: int = 0,
                 latent_dim: int = 32, hidden: int = 256, nuisance: float = 0.3, noise: float = 0.05):
        _check_ids(num_identities, identity_offset)
        for name, value in (("dim", dim), ("latent_dim", latent_dim), ("hidden", hidden)):
            if value < 1:
                raise ValueError(f"SyntheticVectors {name}={value} is invalid: must be >= 1")
        if nuisance < 0 or noise < 0:
            raise ValueError(f"nuisance={nuisance}, noise={noise} are invalid: both must be >= 0")
        self.num_identities, self.dim, self.seed = int(num_identities), int(dim), int(seed)
        self.identity_offset, self.latent_dim = int(identity_offset), int(latent_dim)
        self.nuisance, self.noise = float(nuisance), float(noise)
        rng = np.random.default_rng([self.seed, 31])  # the fixed map: same for train and eval ids
        self.w1 = rng.standard_normal((latent_dim, hidden)) * (1.5 / np.sqrt(latent_dim))
        self.b1 = rng.standard_normal(hidden) * 0.1
        self.w2 = rng.standard_normal((hidden, dim)) / np.sqrt(hidden)

    def __len__(self) -> int:
        return self.num_identities

    def batch(self, identities, indices) -> np.ndarray:
        """identities (B,) local ids, indices (B,) sample ids -> (B, dim) float32."""
        ids = np.asarray(identities, dtype=np.int64)
        idx = np.broadcast_to(np.asarray(indices, dtype=np.int64), ids.shape)
        if ids.size and (ids.min() < 0 or ids.max() >= self.num_identities):
            raise IndexError(f"identities must lie in [0, {self.num_identities}), got [{ids.min()}, {ids.max()}]")
        gid = ids + self.identity_offset
        z = hash_normal((self.seed, _TAG_VEC_ID, gid), self.latent_dim)  # (B, latent_dim)
        e = hash_normal((self.seed, _TAG_VEC_SAMPLE, gid, idx), self.latent_dim + self.dim)  # (B, latent+dim)
        # float64 then rounded: a row's value must not depend on the BLAS kernel its batch size picks
        h = np.tanh((z + self.nuisance * e[:, :self.latent_dim]) @ self.w1 + self.b1)  # (B, hidden)
        return (h @ self.w2 + self.noise * e[:, self.latent_dim:]).astype(np.float32)  # (B, dim)

    def sample(self, identity: int, index: int) -> np.ndarray:
        """One vector: (dim,) float32."""
        return self.batch([identity], [index])[0]
