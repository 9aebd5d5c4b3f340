"""Backbones (IResNet, MobileFaceNet, arcface_torch's mbf and ViT, tiny CPU variants, an MLP), the registry
and checkpoints.

    from dsoft_dist.models import build_model, save_backbone, load_backbone
"""
from dsoft_dist.models.checkpoint import load_backbone, read_backbone_file, save_backbone
from dsoft_dist.models.iresnet import IResNet, iresnet, iresnet_tiny
from dsoft_dist.models.mbf import ArcFaceMobileNet
from dsoft_dist.models.mlp import MLPEmbedder
from dsoft_dist.models.mobilefacenet import MobileFaceNet, mobilefacenet, mobilefacenet_tiny
from dsoft_dist.models.registry import ModelSpec, build_model, checkpointing_models, model_config_dict
from dsoft_dist.models.vit import VisionTransformer

__all__ = [
    "build_model", "model_config_dict", "ModelSpec", "checkpointing_models", "save_backbone", "load_backbone",
    "read_backbone_file", "IResNet", "iresnet", "iresnet_tiny", "MobileFaceNet", "mobilefacenet",
    "mobilefacenet_tiny", "ArcFaceMobileNet", "VisionTransformer", "MLPEmbedder",
]
