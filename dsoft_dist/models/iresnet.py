"""IResNet backbones (InsightFace-style "improved ResNet") for face embeddings.

Architecture (written from its published description, He et al. / Deng et al.):
stem 3x3 conv (stride 1) -> BN -> PReLU; four stages of residual blocks whose FIRST
block has stride 2; each block is BN -> conv3x3 -> BN -> PReLU -> conv3x3(stride) -> BN
plus a shortcut (1x1 conv stride s + BN when the shape changes); the output is
BN2d -> dropout -> flatten -> FC -> BN1d, giving an un-normalized embedding. Block for block
this is arcface_torch's IResNet (its r18/r34/r50/r100/r200), so its weights import by position.

With ``activation_checkpointing`` each residual block's activations are recomputed in backward
instead of stored (``run_blocks``; the ViT uses the same helper).

    from dsoft_dist.models import build_model
    model = build_model("iresnet50", embedding_size=512, input_size=112)
    emb = model(torch.randn(2, 3, 112, 112))  # (2, 512)
"""
from __future__ import annotations

import contextlib
from functools import partial
from typing import Iterable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from dsoft_dist.models.registry import ModelSpec
from dsoft_dist.registry import MODELS

# blocks per stage for each depth
IRESNET_LAYERS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 14, 3), 100: (3, 13, 30, 3), 200: (6, 26, 60, 6)}
IRESNET_WIDTHS = (64, 128, 256, 512)


def spatial_after_strides(size: int, num_stride2: int) -> int:
    """Side length after `num_stride2` 3x3/pad-1/stride-2 convs: ceil(size / 2) each time."""
    for _ in range(num_stride2):
        size = (size + 1) // 2
    return size


def check_image_input(x: torch.Tensor, input_size: int, model_name: str) -> None:
    """Raises ValueError unless x is (B, 3, input_size, input_size)."""
    if torch.jit.is_tracing():  # shapes are fixed by the example input; only the batch dim is dynamic
        return
    if x.dim() != 4 or x.shape[1] != 3 or x.shape[2] != input_size or x.shape[3] != input_size:
        raise ValueError(
            f"{model_name} expects images of shape (B, 3, {input_size}, {input_size}) normalized to [-1, 1], "
            f"got {tuple(x.shape)}: resize/crop the faces or rebuild the model with input_size={x.shape[-1]}"
        )


def init_weights(module: nn.Module, linear: bool = False) -> None:
    """Kaiming-normal (fan_out, relu) weights for every conv (and Linear layer when ``linear``), scale 1 and
    shift 0 for every BatchNorm, in ``module.modules()`` order (the order decides the random draws)."""
    weighted = (nn.Conv2d, nn.Linear) if linear else nn.Conv2d
    for m in module.modules():
        if isinstance(m, weighted):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


@contextlib.contextmanager
def _running_statistics_held(block: nn.Module):
    """While a checkpointed block is recomputed in backward: its BatchNorms normalize with the batch's
    statistics exactly as in the forward, but leave their running statistics as they are (momentum 0:
    running * 1 + batch * 0) and ``num_batches_tracked`` too, so a checkpointed step leaves the same buffers
    as a plain one. (The op and what it saves for backward stay those of the forward, which checkpoint checks.)"""
    norms = [m for m in block.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    kept = [(m, m.momentum, m.num_batches_tracked.clone()) for m in norms]
    for m in norms:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum, tracked in kept:
            m.momentum = momentum
            m.num_batches_tracked.copy_(tracked)


def run_blocks(blocks: Iterable[nn.Module], x: torch.Tensor, checkpointing: bool) -> torch.Tensor:
    """``x`` through each block in turn. With ``checkpointing`` (and autograd recording) each block runs under
    ``torch.utils.checkpoint.checkpoint(use_reentrant=False)``: its inner activations are freed after the
    forward and recomputed in backward (about one more forward per block) with the RNG state of the forward,
    so dropout/drop path replay identically and loss and gradients equal those without checkpointing."""
    for block in blocks:
        if checkpointing and torch.is_grad_enabled():
            x = checkpoint(block, x, use_reentrant=False,
                           context_fn=lambda b=block: (contextlib.nullcontext(), _running_statistics_held(b)))
        else:
            x = block(x)
    return x


class IBasicBlock(nn.Module):
    """BN -> conv3x3 -> BN -> PReLU -> conv3x3(stride) -> BN, plus shortcut. (B,Cin,H,W)->(B,C,H/s,W/s)."""

    def __init__(self, in_channels: int, channels: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels, eps=1e-5)
        self.conv1 = nn.Conv2d(in_channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels, eps=1e-5)
        self.prelu = nn.PReLU(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, stride, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(channels, eps=1e-5)
        self.shortcut = None
        if stride != 1 or in_channels != channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride, bias=False), nn.BatchNorm2d(channels, eps=1e-5)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        identity = x if self.shortcut is None else self.shortcut(x)
        return out + identity


class IResNet(nn.Module):
    """Improved ResNet: (B, 3, S, S) in [-1, 1] -> (B, embedding_size) un-normalized embeddings.

    layers: blocks per stage; widths: channels per stage; stem_channels: stem conv width.
    The FC input is widths[-1] * s * s with s = ceil(S / 16) (four stride-2 stages).
    activation_checkpointing: in training mode, recompute each residual block in backward (``run_blocks``).
    """

    def __init__(self, layers, widths=IRESNET_WIDTHS, stem_channels: int = 64, embedding_size: int = 512,
                 input_size: int = 112, dropout: float = 0.0, name: str = "iresnet",
                 activation_checkpointing: bool = False):
        super().__init__()
        self.name = name
        self.input_size = input_size
        self.activation_checkpointing = activation_checkpointing
        self.stem = nn.Sequential(
            nn.Conv2d(3, stem_channels, 3, 1, 1, bias=False), nn.BatchNorm2d(stem_channels, eps=1e-5),
            nn.PReLU(stem_channels),
        )
        stages, in_ch = [], stem_channels
        for num_blocks, width in zip(layers, widths):
            blocks = [IBasicBlock(in_ch, width, stride=2)]
            blocks += [IBasicBlock(width, width, stride=1) for _ in range(num_blocks - 1)]
            stages.append(nn.Sequential(*blocks))
            in_ch = width
        self.stages = nn.Sequential(*stages)
        side = spatial_after_strides(input_size, len(layers))
        self.bn_out = nn.BatchNorm2d(in_ch, eps=1e-5)
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(in_ch * side * side, embedding_size)
        self.features = nn.BatchNorm1d(embedding_size, eps=1e-5)
        self._init_weights()

    def _init_weights(self) -> None:
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_image_input(x, self.input_size, self.name)
        blocks = (block for stage in self.stages for block in stage)
        x = run_blocks(blocks, self.stem(x), self.activation_checkpointing and self.training)  # (B, C, s, s)
        x = self.dropout(self.bn_out(x))
        x = self.fc(torch.flatten(x, 1))  # (B, embedding_size)
        return self.features(x)


def iresnet(depth: int, embedding_size: int = 512, input_size: int = 112, dropout: float = 0.0,
            activation_checkpointing: bool = False) -> IResNet:
    """IResNet-18/34/50/100/200 with the standard widths (64, 128, 256, 512)."""
    if depth not in IRESNET_LAYERS:
        raise ValueError(f"iresnet depth={depth} is not supported: use one of {sorted(IRESNET_LAYERS)}")
    return IResNet(IRESNET_LAYERS[depth], embedding_size=embedding_size, input_size=input_size,
                   dropout=dropout, name=f"iresnet{depth}", activation_checkpointing=activation_checkpointing)


def iresnet_tiny(embedding_size: int = 512, input_size: int = 112, dropout: float = 0.0,
                 activation_checkpointing: bool = False) -> IResNet:
    """A CPU-sized IResNet: one block per stage, widths (8, 16, 32, 64); same structure as the big ones."""
    return IResNet((1, 1, 1, 1), widths=(8, 16, 32, 64), stem_channels=8, embedding_size=embedding_size,
                   input_size=input_size, dropout=dropout, name="iresnet_tiny",
                   activation_checkpointing=activation_checkpointing)


for _depth in IRESNET_LAYERS:  # model.name: iresnet18 ... iresnet200, iresnet_tiny
    MODELS.register(f"iresnet{_depth}", ModelSpec(partial(iresnet, _depth), checkpointing=True))
MODELS.register("iresnet_tiny", ModelSpec(iresnet_tiny, checkpointing=True))
