"""arcface_torch's Vision Transformer for faces: "vit_t", "vit_s", "vit_b", "vit_l".

(B, 3, S, S) images -> non-overlapping 9 x 9 patches, each a D-dim token (a 9x9 stride-9 conv), plus a
learned position embedding: N = (S // 9)^2 tokens (144 at 112 px; no class token). In training, a random
``mask_ratio`` of the tokens of every image is left out of the transformer and replaced, after the final
LayerNorm, by a learned mask token. Then ``depth`` pre-norm blocks:

    x = x + drop_path(proj(softmax(q k^T / sqrt(D / 8)) v))   q, k, v = qkv(LayerNorm(x)), 8 heads, no bias
    x = x + drop_path(fc2(ReLU6(fc1(LayerNorm(x)))))         hidden 4 D

with stochastic depth rates linspace(0, drop_path_rate, depth); attention runs in float32 at least
(also under bf16/fp16 autocast). The final LayerNorm'd tokens, flattened to N * D, go through
Linear(N D -> D, no bias) -> BN1d -> Linear(D -> E, no bias) -> BN1d (eps 2e-5): the embedding.

| name | D | depth | drop path | mask ratio |
|---|---|---|---|---|
| vit_t | 256 | 12 | 0.1 | 0.1 |
| vit_s | 512 | 12 | 0.1 | 0.1 |
| vit_b | 512 | 24 | 0.1 | 0.1 |
| vit_l | 768 | 24 | 0.05 | 0.05 (arcface_torch's vit_l_dp005_mask_005) |
| vit_tiny | 64 | 2 | 0.1 | 0.1 (ours: the same network at CPU size) |

The parameter names and order are arcface_torch's (pos_embed, mask_token, patch_embed.proj, blocks.N.*,
norm, feature.0-3), so its weights import by position (``dsoft ckpt import --from insightface``).
Randomness (masking, drop path, dropout) happens only in training mode and only through torch's RNG.

    from dsoft_dist.models import build_model
    model = build_model("vit_t", embedding_size=512, input_size=112)
    emb = model.eval()(torch.rand(2, 3, 112, 112) * 2 - 1)  # (2, 512)
"""
from __future__ import annotations

import contextlib
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from dsoft_dist.models.iresnet import check_image_input, run_blocks
from dsoft_dist.models.registry import ModelSpec
from dsoft_dist.registry import MODELS

PATCH_SIZE = 9
NUM_HEADS = 8
MLP_RATIO = 4
FEATURE_BN_EPS = 2e-5
# name: (width D, depth, drop path rate, mask ratio)
VIT_SETTINGS = {"vit_t": (256, 12, 0.1, 0.1), "vit_s": (512, 12, 0.1, 0.1), "vit_b": (512, 24, 0.1, 0.1),
                "vit_l": (768, 24, 0.05, 0.05)}
VIT_TINY = (64, 2, 0.1, 0.1)  # vit_tiny, ours (not arcface_torch's): the same network at CPU size


def _at_least_float32(t: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 -> float32; float32 and float64 unchanged (a float64 check stays float64)."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _no_autocast(device_type: str):
    """A context that turns autocast off on ``device_type`` (nothing where autocast does not exist, e.g. meta)."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def drop_path(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Stochastic depth: in training, zeroes the whole branch of a sample with probability ``rate`` and scales
    the kept ones by 1 / (1 - rate). x: (B, ...); one Bernoulli draw of B numbers from torch's RNG (the draw
    timm's DropPath, which arcface_torch uses, makes)."""
    if not training or rate == 0.0:
        return x
    keep = x.new_empty(x.shape[0], *([1] * (x.dim() - 1))).bernoulli_(1.0 - rate)  # (B, 1, ..., 1) of 0/1
    return x * keep.div_(1.0 - rate)


class Attention(nn.Module):
    """Multi-head self-attention, qkv without bias: (B, N, D) -> (B, N, D). Softmax(q k^T / sqrt(D/h)) v is
    computed in float32 at least, whatever the autocast or parameter dtype."""

    def __init__(self, dim: int, num_heads: int, dropout: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"vit width {dim} is not a multiple of num_heads={num_heads}: use a multiple")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        with _no_autocast(x.device.type):
            q, k, v = (_at_least_float32(t) for t in qkv)  # (B, h, N, D/h) each
            out = F.scaled_dot_product_attention(q, k, v)  # scale 1 / sqrt(D/h)
        out = out.to(qkv.dtype).transpose(1, 2).reshape(b, n, d)  # (B, N, D)
        return self.proj_drop(self.proj(out))


class Mlp(nn.Module):
    """fc1 (D -> hidden) -> ReLU6 -> dropout -> fc2 (hidden -> D) -> dropout. (B, N, D) -> (B, N, D)."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.ReLU6()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Block(nn.Module):
    """Pre-norm transformer block with stochastic depth ``drop_path_rate``: (B, N, D) -> (B, N, D)."""

    def __init__(self, dim: int, num_heads: int, drop_path_rate: float, dropout: float = 0.0):
        super().__init__()
        # registered in arcface_torch's order (norm1, norm2, attn, mlp): the state_dict lists them so
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, dropout)
        self.mlp = Mlp(dim, MLP_RATIO * dim, dropout)
        self.drop_path_rate = drop_path_rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + drop_path(self.attn(self.norm1(x)), self.drop_path_rate, self.training)
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_path_rate, self.training)


class PatchEmbed(nn.Module):
    """(B, 3, S, S) -> (B, N, D): a 9 x 9 conv with stride 9 (one token per patch, N = (S // 9)^2)."""

    def __init__(self, dim: int, patch_size: int = PATCH_SIZE):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch_size, patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


def random_masking(x: torch.Tensor, mask_ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Keeps K = int(N (1 - mask_ratio)) random tokens of every sample, at least one (one torch.rand (B, N)
    draw; the K with the smallest noise). x: (B, N, D) -> (kept (B, K, D), restore (B, N)): the positions that
    put the kept tokens followed by N - K filler tokens back in their original order."""
    b, n, d = x.shape
    keep = max(1, int(n * (1 - mask_ratio)))  # 1 only matters for a single-patch input (< 18 px)
    shuffle = torch.argsort(torch.rand(b, n, device=x.device), dim=1)  # (B, N): kept first
    restore = torch.argsort(shuffle, dim=1)  # (B, N)
    return torch.gather(x, 1, shuffle[:, :keep, None].expand(-1, -1, d)), restore


class VisionTransformer(nn.Module):
    """arcface_torch's face ViT (module docstring): (B, 3, S, S) in [-1, 1] -> (B, embedding_size).

    dim: token width D; depth: blocks; drop_path_rate: the last block's stochastic depth rate (linear from 0);
    mask_ratio: fraction of tokens masked in training; dropout: after the position embedding, the attention
    projection and both MLP layers; activation_checkpointing: in training mode, recompute each block in
    backward. input_size S >= 9 (N = (S // 9)^2 tokens, 144 at 112 px).
    """

    def __init__(self, dim: int, depth: int, num_heads: int = NUM_HEADS, drop_path_rate: float = 0.0,
                 mask_ratio: float = 0.0, embedding_size: int = 512, input_size: int = 112, dropout: float = 0.0,
                 activation_checkpointing: bool = False, name: str = "vit"):
        super().__init__()
        if input_size < PATCH_SIZE:
            raise ValueError(f"input_size={input_size} is too small for {name}: its patches are {PATCH_SIZE} x "
                             f"{PATCH_SIZE} pixels, use >= {PATCH_SIZE} (112 is usual)")
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio={mask_ratio} is invalid: must be in [0, 1)")
        self.name, self.input_size, self.mask_ratio = name, input_size, mask_ratio
        self.activation_checkpointing = activation_checkpointing
        self.num_patches = (input_size // PATCH_SIZE) ** 2
        # own parameters first in the state_dict, in this order (arcface_torch's)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches, dim))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.patch_embed = PatchEmbed(dim)
        self.pos_drop = nn.Dropout(dropout)
        rates = [drop_path_rate * i / (depth - 1) if depth > 1 else 0.0 for i in range(depth)]  # linspace(0, rate)
        self.blocks = nn.ModuleList(Block(dim, num_heads, rate, dropout) for rate in rates)
        self.norm = nn.LayerNorm(dim)
        self.feature = nn.Sequential(
            nn.Linear(dim * self.num_patches, dim, bias=False), nn.BatchNorm1d(dim, eps=FEATURE_BN_EPS),
            nn.Linear(dim, embedding_size, bias=False), nn.BatchNorm1d(embedding_size, eps=FEATURE_BN_EPS),
        )
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.normal_(self.mask_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_image_input(x, self.input_size, self.name)
        b = x.shape[0]
        x = self.pos_drop(self.patch_embed(x) + self.pos_embed)  # (B, N, D)
        masking = self.training and self.mask_ratio > 0
        if masking:
            x, restore = random_masking(x, self.mask_ratio)  # (B, K, D), (B, N)
        x = self.norm(run_blocks(self.blocks, x, self.activation_checkpointing and self.training))
        if masking:
            _, k, d = x.shape
            filler = self.mask_token.to(x.dtype).expand(b, self.num_patches - k, d)
            x = torch.gather(torch.cat([x, filler], 1), 1, restore[..., None].expand(-1, -1, d))  # (B, N, D)
        return self.feature(x.reshape(b, -1))  # (B, N D) -> (B, E)


def vit(name: str, embedding_size: int = 512, input_size: int = 112, dropout: float = 0.0,
        activation_checkpointing: bool = False) -> VisionTransformer:
    """arcface_torch's ViT ``name`` (one of VIT_SETTINGS: vit_t, vit_s, vit_b, vit_l), or ``vit_tiny``: the same
    network at CPU size (width 64, 2 blocks, 8 heads, drop path and masking 0.1) for tests and demos."""
    settings = {**VIT_SETTINGS, "vit_tiny": VIT_TINY}
    if name not in settings:
        raise ValueError(f"vit name={name!r} is unknown: use one of {', '.join(settings)}")
    dim, depth, drop_path_rate, mask_ratio = settings[name]
    return VisionTransformer(dim, depth, drop_path_rate=drop_path_rate, mask_ratio=mask_ratio,
                             embedding_size=embedding_size, input_size=input_size, dropout=dropout,
                             activation_checkpointing=activation_checkpointing, name=name)


for _name in (*VIT_SETTINGS, "vit_tiny"):  # model.name: vit_t, vit_s, vit_b, vit_l, vit_tiny
    MODELS.register(_name, ModelSpec(partial(vit, _name), checkpointing=True))
