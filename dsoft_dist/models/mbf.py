"""arcface_torch's MobileFaceNet, "mbf" and "mbf_large": the network InsightFace trains and publishes weights for.

A different network from our ``mobilefacenet`` (the paper's table): it is wider (``scale`` times 64
channels), its inverted residuals expand to fixed widths (128/256/512) instead of a multiple of
their input, and its second stem conv is a grouped (64 groups), not a depthwise, conv. Layout:

    stem:   conv3x3 s2 (64 s) -> grouped conv3x3 (64 groups) [mbf] | n0 residual blocks [mbf_large]
    stage1: block s2 (64 s, hidden 128)  -> n1 residual blocks (hidden 128)
    stage2: block s2 (128 s, hidden 256) -> n2 residual blocks (hidden 256)
    stage3: block s2 (128 s, hidden 512) -> n3 residual blocks (hidden 256)
    conv1x1 (512) -> global depthwise conv over the final map + BN -> dropout -> Linear (no bias) -> BN1d

mbf: blocks (1, 4, 6, 2), scale 2; mbf_large: blocks (2, 8, 12, 4), scale 4. Every conv is followed
by BN and PReLU except the linear ones (block projection, global depthwise conv). The state_dict
lists the same tensors in the same order as arcface_torch's, so its weights import by position
(``dsoft ckpt import --from insightface``). The global depthwise conv's kernel is the final map's
side (7 at 112 px), so any input size >= 8 works (2 at 32 px).

    from dsoft_dist.models import build_model
    model = build_model("mbf", embedding_size=512, input_size=112)
    emb = model(torch.rand(2, 3, 112, 112) * 2 - 1)  # (2, 512)
"""
from __future__ import annotations

import torch
from torch import nn

from dsoft_dist.models.iresnet import check_image_input, init_weights, spatial_after_strides
from dsoft_dist.models.mobilefacenet import conv_bn
from dsoft_dist.models.registry import ModelSpec
from dsoft_dist.registry import MODELS

MBF_BLOCKS = (1, 4, 6, 2)
MBF_LARGE_BLOCKS = (2, 8, 12, 4)
# per stage: (output width in multiples of 64 * scale, hidden width of its stride-2 block, of its residual blocks)
MBF_STAGES = ((1, 128, 128), (2, 256, 256), (2, 512, 256))
STEM_HIDDEN = 128  # hidden width of mbf_large's residual stem blocks
STEM_GROUPS = 64  # groups of mbf's second stem conv
GDC_CHANNELS = 512  # channels of the last 1x1 conv and the global depthwise conv


class InvertedResidual(nn.Module):
    """1x1 expand to ``hidden`` (BN, PReLU) -> 3x3 depthwise, stride s (BN, PReLU) -> 1x1 linear project (BN);
    plus the input when the shape is kept (stride 1, in == out). (B, Cin, H, W) -> (B, Cout, H/s, W/s)."""

    def __init__(self, in_ch: int, out_ch: int, hidden: int, stride: int):
        super().__init__()
        self.expand = conv_bn(in_ch, hidden, 1)
        self.depthwise = conv_bn(hidden, hidden, 3, stride, groups=hidden)
        self.project = conv_bn(hidden, out_ch, 1, act=False)
        self.residual = stride == 1 and in_ch == out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.project(self.depthwise(self.expand(x)))
        return x + out if self.residual else out


def _stage(in_ch: int, out_ch: int, down_hidden: int, hidden: int, num_blocks: int) -> nn.Sequential:
    """One stride-2 block to ``out_ch`` followed by ``num_blocks`` residual blocks."""
    blocks = [InvertedResidual(in_ch, out_ch, down_hidden, stride=2)]
    blocks += [InvertedResidual(out_ch, out_ch, hidden, stride=1) for _ in range(num_blocks)]
    return nn.Sequential(*blocks)


class ArcFaceMobileNet(nn.Module):
    """arcface_torch's MobileFaceNet: (B, 3, S, S) in [-1, 1] -> (B, embedding_size) un-normalized embeddings.

    blocks: residual blocks of the stem and the three stages (stem count 1 = the grouped conv instead);
    scale: width multiplier (stem width 64 * scale). Four stride-2 layers: the final map is ceil(S / 16).
    """

    def __init__(self, blocks=MBF_BLOCKS, scale: int = 2, embedding_size: int = 512, input_size: int = 112,
                 dropout: float = 0.0, name: str = "mbf"):
        super().__init__()
        self.name = name
        self.input_size = input_size
        width = 64 * scale
        if blocks[0] == 1:
            second = conv_bn(width, width, 3, groups=STEM_GROUPS)
        else:
            second = nn.Sequential(*[InvertedResidual(width, width, STEM_HIDDEN, 1) for _ in range(blocks[0])])
        self.stem = nn.Sequential(conv_bn(3, width, 3, 2), second)  # (B, 64 s, S/2, S/2)
        stages, in_ch = [], width
        for num_blocks, (mult, down_hidden, hidden) in zip(blocks[1:], MBF_STAGES):
            stages.append(_stage(in_ch, mult * width, down_hidden, hidden, num_blocks))
            in_ch = mult * width
        self.stages = nn.Sequential(*stages)  # (B, 128 s, s', s'), s' = ceil(S / 16)
        self.expand = conv_bn(in_ch, GDC_CHANNELS, 1)
        side = spatial_after_strides(input_size, 1 + len(stages))
        # global depthwise conv: one side x side filter per channel, no padding -> (B, 512, 1, 1)
        self.gdconv = nn.Sequential(
            nn.Conv2d(GDC_CHANNELS, GDC_CHANNELS, side, 1, 0, groups=GDC_CHANNELS, bias=False),
            nn.BatchNorm2d(GDC_CHANNELS),
        )
        self.dropout = nn.Dropout(p=dropout)
        self.linear = nn.Linear(GDC_CHANNELS, embedding_size, bias=False)
        self.features = nn.BatchNorm1d(embedding_size)
        init_weights(self, linear=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_image_input(x, self.input_size, self.name)
        x = self.expand(self.stages(self.stem(x)))  # (B, 512, s', s')
        x = torch.flatten(self.gdconv(x), 1)  # (B, 512)
        return self.features(self.linear(self.dropout(x)))  # (B, E)


def mbf(embedding_size: int = 512, input_size: int = 112, dropout: float = 0.0) -> ArcFaceMobileNet:
    """arcface_torch's "mbf": blocks (1, 4, 6, 2), scale 2 (2.06M parameters at 512-d)."""
    return ArcFaceMobileNet(MBF_BLOCKS, 2, embedding_size, input_size, dropout, name="mbf")


def mbf_large(embedding_size: int = 512, input_size: int = 112, dropout: float = 0.0) -> ArcFaceMobileNet:
    """arcface_torch's "mbf_large": blocks (2, 8, 12, 4), scale 4 (6.31M parameters at 512-d)."""
    return ArcFaceMobileNet(MBF_LARGE_BLOCKS, 4, embedding_size, input_size, dropout, name="mbf_large")


MODELS.register("mbf", ModelSpec(mbf))
MODELS.register("mbf_large", ModelSpec(mbf_large))
