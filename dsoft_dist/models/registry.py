"""The backbone registry: ``build_model(name, ...)`` for every name in ``MODELS`` (the config's choices).

    from dsoft_dist.models import build_model
    model = build_model("iresnet_tiny", embedding_size=64, input_size=32)
"""
from __future__ import annotations

from typing import Callable

from torch import nn

from dsoft_dist.models.iresnet import iresnet, iresnet_tiny
from dsoft_dist.models.mlp import MLPEmbedder
from dsoft_dist.models.mobilefacenet import mobilefacenet, mobilefacenet_tiny

_IMAGE_MODELS: dict[str, Callable[..., nn.Module]] = {
    "iresnet18": lambda **kw: iresnet(18, **kw),
    "iresnet34": lambda **kw: iresnet(34, **kw),
    "iresnet50": lambda **kw: iresnet(50, **kw),
    "iresnet100": lambda **kw: iresnet(100, **kw),
    "mobilefacenet": mobilefacenet,
    "iresnet_tiny": iresnet_tiny,
    "mobilefacenet_tiny": mobilefacenet_tiny,
}
MODELS = (*_IMAGE_MODELS, "mlp")  # every name build_model takes; config.schema validates model.name against it
# the smallest input each image model accepts (its final feature map must be >= 1x1 with padding)
MIN_INPUT_SIZE = 8


def build_model(name: str, embedding_size: int = 512, input_size: int = 112, in_features: int = 0,
                dropout: float = 0.0) -> nn.Module:
    """Builds a backbone mapping (B, 3, input_size, input_size) images in [-1, 1] (or (B, in_features)
    vectors for ``mlp``) to (B, embedding_size) un-normalized embeddings."""
    if name not in MODELS:
        raise ValueError(f"model name={name!r} is unknown: use one of {', '.join(MODELS)}")
    if embedding_size <= 0:
        raise ValueError(f"embedding_size={embedding_size} is invalid: must be > 0 (512 is usual)")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout={dropout} is invalid: must be in [0, 1)")
    if name == "mlp":
        return MLPEmbedder(in_features, embedding_size=embedding_size, dropout=dropout)
    if input_size < MIN_INPUT_SIZE:
        raise ValueError(f"input_size={input_size} is too small for {name}: use >= {MIN_INPUT_SIZE} (112 is usual)")
    return _IMAGE_MODELS[name](embedding_size=embedding_size, input_size=input_size, dropout=dropout)


def model_config_dict(name: str, embedding_size: int = 512, input_size: int = 112, in_features: int = 0,
                      dropout: float = 0.0) -> dict:
    """The plain dict stored in checkpoints (the same keys as ``config.schema.ModelConfig``)."""
    return {"name": name, "embedding_size": int(embedding_size), "input_size": int(input_size),
            "in_features": int(in_features), "dropout": float(dropout)}
