"""The backbone registry: ``build_model(name, ...)`` for every name in ``MODELS`` (the config's choices).

    from dsoft_dist.models import build_model
    model = build_model("iresnet_tiny", embedding_size=64, input_size=32)
    model = build_model("vit_t", activation_checkpointing=True)  # recompute each block in backward
"""
from __future__ import annotations

from functools import partial
from typing import Callable

from torch import nn

from dsoft_dist.models.iresnet import iresnet, iresnet_tiny
from dsoft_dist.models.mbf import mbf, mbf_large
from dsoft_dist.models.mlp import MLPEmbedder
from dsoft_dist.models.mobilefacenet import mobilefacenet, mobilefacenet_tiny
from dsoft_dist.models.vit import VIT_SETTINGS, vit

_IMAGE_MODELS: dict[str, Callable[..., nn.Module]] = {
    **{f"iresnet{depth}": partial(iresnet, depth) for depth in (18, 34, 50, 100, 200)},
    "mobilefacenet": mobilefacenet,
    "mbf": mbf,
    "mbf_large": mbf_large,
    **{name: partial(vit, name) for name in VIT_SETTINGS},
    "iresnet_tiny": iresnet_tiny,
    "mobilefacenet_tiny": mobilefacenet_tiny,
    "vit_tiny": partial(vit, "vit_tiny"),
}
MODELS = (*_IMAGE_MODELS, "mlp")  # every name build_model takes; config.schema validates model.name against it
# the models whose blocks activation checkpointing recomputes (IResNet: residual blocks; ViT: transformer blocks)
CHECKPOINTING_MODELS = tuple(n for n in _IMAGE_MODELS if n.startswith(("iresnet", "vit_")))
# the smallest input each image model accepts (its final feature map must be >= 1x1 with padding; a ViT's
# 9 x 9 patches need 9, which the ViT checks itself)
MIN_INPUT_SIZE = 8


def build_model(name: str, embedding_size: int = 512, input_size: int = 112, in_features: int = 0,
                dropout: float = 0.0, activation_checkpointing: bool = False) -> nn.Module:
    """Builds a backbone mapping (B, 3, input_size, input_size) images in [-1, 1] (or (B, in_features)
    vectors for ``mlp``) to (B, embedding_size) un-normalized embeddings.

    activation_checkpointing: in training mode, recompute each block's activations in backward instead of
    storing them (models in ``CHECKPOINTING_MODELS``; refused for the others)."""
    if name not in MODELS:
        raise ValueError(f"model name={name!r} is unknown: use one of {', '.join(MODELS)}")
    if embedding_size <= 0:
        raise ValueError(f"embedding_size={embedding_size} is invalid: must be > 0 (512 is usual)")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout={dropout} is invalid: must be in [0, 1)")
    if activation_checkpointing and name not in CHECKPOINTING_MODELS:
        raise ValueError(f"activation_checkpointing=True is not supported by model {name!r}: only "
                         f"{', '.join(CHECKPOINTING_MODELS)} have it; set model.activation_checkpointing=false "
                         "or use one of those")
    if name == "mlp":
        return MLPEmbedder(in_features, embedding_size=embedding_size, dropout=dropout)
    if input_size < MIN_INPUT_SIZE:
        raise ValueError(f"input_size={input_size} is too small for {name}: use >= {MIN_INPUT_SIZE} (112 is usual)")
    extra = {"activation_checkpointing": True} if activation_checkpointing else {}
    return _IMAGE_MODELS[name](embedding_size=embedding_size, input_size=input_size, dropout=dropout, **extra)


def model_config_dict(name: str, embedding_size: int = 512, input_size: int = 112, in_features: int = 0,
                      dropout: float = 0.0, activation_checkpointing: bool = False) -> dict:
    """The plain dict stored in checkpoints (the same keys as ``config.schema.ModelConfig``)."""
    return {"name": name, "embedding_size": int(embedding_size), "input_size": int(input_size),
            "in_features": int(in_features), "dropout": float(dropout),
            "activation_checkpointing": bool(activation_checkpointing)}
