"""MobileFaceNet (Chen et al., 2018) and a tiny CPU variant, for face embeddings.

Layout (from the paper's table): conv3x3 s2 (64) -> depthwise 3x3 (64) -> inverted
residual bottlenecks (expansion t, channels c, repeats n, first stride s):
(2,64,5,2) (4,128,1,2) (2,128,6,1) (4,128,1,2) (2,128,2,1) -> conv1x1 (512) ->
global depthwise conv over the whole final map (GDConv, linear) -> dropout ->
linear 1x1 conv to the embedding -> BN1d. PReLU everywhere a nonlinearity is used.

    model = build_model("mobilefacenet", embedding_size=128)
    emb = model(torch.randn(2, 3, 112, 112))  # (2, 128)
"""
from __future__ import annotations

import torch
from torch import nn

from dsoft_dist.models.iresnet import check_image_input, spatial_after_strides
from dsoft_dist.models.registry import ModelSpec
from dsoft_dist.registry import MODELS

# (expansion t, out channels c, repeats n, stride of the first repeat s)
MOBILEFACENET_BLOCKS = ((2, 64, 5, 2), (4, 128, 1, 2), (2, 128, 6, 1), (4, 128, 1, 2), (2, 128, 2, 1))
TINY_BLOCKS = ((2, 16, 1, 2), (2, 32, 1, 2), (2, 32, 1, 1), (2, 32, 1, 2))


def conv_bn(in_ch: int, out_ch: int, kernel: int, stride: int = 1, groups: int = 1, act: bool = True) -> nn.Sequential:
    """conv (no bias) -> BN -> optional PReLU; padding keeps the map size at stride 1."""
    layers = [nn.Conv2d(in_ch, out_ch, kernel, stride, kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(out_ch)]
    if act:
        layers.append(nn.PReLU(out_ch))
    return nn.Sequential(*layers)


class Bottleneck(nn.Module):
    """Inverted residual: 1x1 expand -> 3x3 depthwise (stride) -> 1x1 linear project; residual if shapes match."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, expansion: int):
        super().__init__()
        hidden = in_ch * expansion
        self.block = nn.Sequential(
            conv_bn(in_ch, hidden, 1), conv_bn(hidden, hidden, 3, stride, groups=hidden),
            conv_bn(hidden, out_ch, 1, act=False),
        )
        self.residual = stride == 1 and in_ch == out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return x + out if self.residual else out


class MobileFaceNet(nn.Module):
    """(B, 3, S, S) in [-1, 1] -> (B, embedding_size) un-normalized embeddings.

    The GDConv kernel equals the final map side s = ceil(S / 2^k), k = number of stride-2 layers,
    so any input size works (112 -> 7x7, 32 -> 2x2).
    """

    def __init__(self, blocks=MOBILEFACENET_BLOCKS, stem_channels: int = 64, last_channels: int = 512,
                 embedding_size: int = 128, input_size: int = 112, dropout: float = 0.0,
                 name: str = "mobilefacenet"):
        super().__init__()
        self.name = name
        self.input_size = input_size
        layers = [conv_bn(3, stem_channels, 3, 2), conv_bn(stem_channels, stem_channels, 3, groups=stem_channels)]
        in_ch, num_stride2 = stem_channels, 1
        for t, c, n, s in blocks:
            for i in range(n):
                stride = s if i == 0 else 1
                layers.append(Bottleneck(in_ch, c, stride, t))
                in_ch, num_stride2 = c, num_stride2 + (stride == 2)
        layers.append(conv_bn(in_ch, last_channels, 1))
        self.body = nn.Sequential(*layers)
        side = spatial_after_strides(input_size, num_stride2)
        # global depthwise conv: one side x side filter per channel, no padding -> (B, C, 1, 1)
        self.gdconv = nn.Sequential(
            nn.Conv2d(last_channels, last_channels, side, 1, 0, groups=last_channels, bias=False),
            nn.BatchNorm2d(last_channels),
        )
        self.dropout = nn.Dropout(p=dropout)
        self.linear = nn.Conv2d(last_channels, embedding_size, 1, bias=False)
        self.features = nn.BatchNorm1d(embedding_size)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_image_input(x, self.input_size, self.name)
        x = self.gdconv(self.body(x))  # (B, C, 1, 1)
        x = self.linear(self.dropout(x))  # (B, E, 1, 1)
        return self.features(torch.flatten(x, 1))  # (B, E)


def mobilefacenet(embedding_size: int = 512, input_size: int = 112, dropout: float = 0.0) -> MobileFaceNet:
    """The paper's MobileFaceNet (about 1M parameters at 128-d)."""
    return MobileFaceNet(embedding_size=embedding_size, input_size=input_size, dropout=dropout)


def mobilefacenet_tiny(embedding_size: int = 512, input_size: int = 112, dropout: float = 0.0) -> MobileFaceNet:
    """A CPU-sized MobileFaceNet: 16-channel stem, four bottlenecks, 64-channel head."""
    return MobileFaceNet(TINY_BLOCKS, stem_channels=16, last_channels=64, embedding_size=embedding_size,
                         input_size=input_size, dropout=dropout, name="mobilefacenet_tiny")


MODELS.register("mobilefacenet", ModelSpec(mobilefacenet))
MODELS.register("mobilefacenet_tiny", ModelSpec(mobilefacenet_tiny))
