"""The backbones ``model.name`` names: each model file registers its own in ``dsoft_dist.registry.MODELS``
as a ``ModelSpec``; ``build_model(name, ...)`` looks it up.

    from dsoft_dist.models import build_model
    model = build_model("iresnet_tiny", embedding_size=64, input_size=32)
    model = build_model("vit_t", activation_checkpointing=True)  # recompute each block in backward
    MODELS.get("vit_t").checkpointing                             # True: the config may ask for it

A backbone of your own: ``MODELS.register("my_net", ModelSpec(my_net))`` in its module, named in the
config's ``extra_modules``; ``my_net(embedding_size=, input_size=, dropout=)`` returns the module.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

from dsoft_dist.registry import MODELS

# the smallest input each image model accepts (its final feature map must be >= 1x1 with padding; a ViT's
# 9 x 9 patches need 9, which the ViT checks itself)
MIN_INPUT_SIZE = 8


@dataclass(frozen=True, eq=False)
class ModelSpec:
    """A registered backbone: ``build`` and what the builder and the config need to know of it.

    build: for images, ``build(embedding_size=, input_size=, dropout=)`` (plus ``activation_checkpointing=True``
    when asked for) -> a module mapping (B, 3, S, S) images in [-1, 1] to (B, E); for vectors,
    ``build(in_features, embedding_size=, dropout=)`` -> a module mapping (B, in_features) to (B, E).
    inputs: "images" | "vectors". checkpointing: it recomputes each block's activations in backward when
    built with ``activation_checkpointing=True`` (else the config refuses that setting).
    """

    build: Callable[..., nn.Module]
    inputs: str = "images"
    checkpointing: bool = False

    def __post_init__(self):
        if self.inputs not in ("images", "vectors"):
            raise ValueError(f"ModelSpec inputs={self.inputs!r} is invalid: use images or vectors")


def checkpointing_models() -> tuple[str, ...]:
    """The registered backbones that support activation checkpointing."""
    return tuple(name for name in MODELS.names() if MODELS.get(name).checkpointing)


def build_model(name: str, embedding_size: int = 512, input_size: int = 112, in_features: int = 0,
                dropout: float = 0.0, activation_checkpointing: bool = False) -> nn.Module:
    """Builds a backbone mapping (B, 3, input_size, input_size) images in [-1, 1] (or (B, in_features)
    vectors for a vector model such as ``mlp``) to (B, embedding_size) un-normalized embeddings.

    activation_checkpointing: in training mode, recompute each block's activations in backward instead of
    storing them (models whose ``ModelSpec.checkpointing`` is true; refused for the others)."""
    if name not in MODELS:
        raise ValueError(f"model name={name!r} is unknown: use one of {', '.join(MODELS.names())}")
    spec = MODELS.get(name)
    if embedding_size <= 0:
        raise ValueError(f"embedding_size={embedding_size} is invalid: must be > 0 (512 is usual)")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout={dropout} is invalid: must be in [0, 1)")
    if activation_checkpointing and not spec.checkpointing:
        raise ValueError(f"activation_checkpointing=True is not supported by model {name!r}: only "
                         f"{', '.join(checkpointing_models())} have it; set model.activation_checkpointing=false "
                         "or use one of those")
    if spec.inputs == "vectors":
        return spec.build(in_features, embedding_size=embedding_size, dropout=dropout)
    if input_size < MIN_INPUT_SIZE:
        raise ValueError(f"input_size={input_size} is too small for {name}: use >= {MIN_INPUT_SIZE} (112 is usual)")
    extra = {"activation_checkpointing": True} if activation_checkpointing else {}
    return spec.build(embedding_size=embedding_size, input_size=input_size, dropout=dropout, **extra)


def model_config_dict(name: str, embedding_size: int = 512, input_size: int = 112, in_features: int = 0,
                      dropout: float = 0.0, activation_checkpointing: bool = False) -> dict:
    """The plain dict stored in checkpoints (the same keys as ``config.schema.ModelConfig``)."""
    return {"name": name, "embedding_size": int(embedding_size), "input_size": int(input_size),
            "in_features": int(in_features), "dropout": float(dropout),
            "activation_checkpointing": bool(activation_checkpointing)}
