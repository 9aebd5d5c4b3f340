"""An MLP embedder for vector inputs (the synthetic "vectors" data mode): in_features -> embedding.

    model = build_model("mlp", in_features=64, embedding_size=32)
    emb = model(torch.randn(8, 64))  # (8, 32)
"""
from __future__ import annotations

import torch
from torch import nn

from dsoft_dist.models.registry import ModelSpec
from dsoft_dist.registry import MODELS


class MLPEmbedder(nn.Module):
    """(B, in_features) -> Linear -> BN -> PReLU -> dropout -> Linear -> BN1d -> (B, embedding_size).

    Inputs with more than two dims are flattened from dim 1 (their product must equal in_features).
    """

    def __init__(self, in_features: int, embedding_size: int = 512, hidden: int = 0, dropout: float = 0.0):
        super().__init__()
        if in_features <= 0:
            raise ValueError(f"mlp needs in_features > 0, got {in_features}: set model.in_features to the vector size")
        hidden = hidden or max(64, embedding_size)
        self.name = "mlp"
        self.in_features = in_features
        self.net = nn.Sequential(
            nn.Linear(in_features, hidden), nn.BatchNorm1d(hidden), nn.PReLU(hidden), nn.Dropout(dropout),
            nn.Linear(hidden, embedding_size), nn.BatchNorm1d(embedding_size),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(x, 1) if x.dim() > 2 else x
        if x.dim() != 2 or x.shape[1] != self.in_features:
            raise ValueError(
                f"mlp expects (B, {self.in_features}) vectors, got {tuple(x.shape)}: "
                f"rebuild the model with in_features={x.shape[-1] if x.dim() else 0} or fix the input"
            )
        return self.net(x)


MODELS.register("mlp", ModelSpec(MLPEmbedder, inputs="vectors"))
