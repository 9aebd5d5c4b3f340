"""The data layer: synthetic identities, WebDataset streaming, converters, manifests.

Entry points (see docs/data.md):

- ``build_train_loader(data_cfg, rank, world_size, epoch)`` -> TrainLoader yielding
  (images (B, 3, H, W) in [-1, 1] or vectors (B, D), labels (B,) int64) for exactly
  ``len(loader)`` batches on every rank, from the source ``data.source`` names (``dsoft_dist.data.sources``:

  synthetic, webdataset, or one registered in ``dsoft_dist.registry.DATA_SOURCES``);
- ``SyntheticIdentities`` / ``SyntheticVectors``: the procedural identity source;
- ``load_manifest`` / ``check_num_classes``: the converters' dataset manifests;
- ``dsoft data synth | from-rec | from-folder | align | make-bin | verify``: the CLI.
"""
from dsoft_dist.data.manifest import Manifest, ManifestError, check_num_classes, load_manifest
from dsoft_dist.data.pipeline import TrainLoader, build_train_loader
from dsoft_dist.data.shards import assign_samples, expand_shards
from dsoft_dist.data.synthetic import (
    DIFFICULTIES,
    EVAL_IDENTITY_OFFSET,
    Difficulty,
    SyntheticIdentities,
    SyntheticVectors,
)
from dsoft_dist.errors import BadDataError

__all__ = [
    "BadDataError", "DIFFICULTIES", "Difficulty", "EVAL_IDENTITY_OFFSET", "Manifest", "ManifestError",
    "SyntheticIdentities", "SyntheticVectors", "TrainLoader", "assign_samples", "build_train_loader",
    "check_num_classes", "expand_shards", "load_manifest",
]
