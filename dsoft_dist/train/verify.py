"""Verification during training: every ``eval.every_steps`` and at the end, through ``dsoft_dist.eval``.

    verifier = Verifier(cfg, env, output_dir)  # collective: rank 0 builds the synthetic .bin if configured
    metrics = verifier(backbone)               # collective; {"lfw/accuracy": ..., "lfw/val_at_far": ...} on rank 0

All ranks share the work of the .bin sets: each embeds a contiguous 1/P of the 2N images,
one all-gather brings the (2N, D) embeddings to every rank, and rank 0 runs the 10-fold
protocol (a few milliseconds). A rank-0-only evaluation would leave P - 1 accelerators idle
and, on a large set, keep them in a barrier long enough to risk the collective timeout;
shared, the evaluation takes 1/P of the time and no rank waits long. Pair lists
(``eval.pairs``, TAR@FAR on image paths) are scored on rank 0 while the others wait in a
barrier: they are rare in training and their images are files only rank 0 may see.
"""
from __future__ import annotations

import os

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from dsoft_dist.config.schema import Config
from dsoft_dist.eval.binfile import load_bin
from dsoft_dist.eval.extract import extract_embeddings
from dsoft_dist.eval.runner import evaluate_pairs, flat_metrics, set_name
from dsoft_dist.eval.verification import verify_kfold
from dsoft_dist.observability import get_logger

log = get_logger(__name__)

SYNTHETIC_SET = "synthetic_unseen"


class EvalForward(nn.Module):
    """The backbone as eval sees it: inputs cast to the parameters' dtype, fp32 embeddings out."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """fp32 embeddings of ``x`` cast to the backbone's parameter dtype."""
        dtype = next(self.module.parameters()).dtype
        return self.module(x.to(dtype)).float()


def build_synthetic_bin(cfg: Config, path: str) -> str:
    """A .bin of eval.synthetic_pairs pairs over eval.synthetic_identities identities never seen in training."""
    from dsoft_dist.data.verification import collect_synthetic, sample_pairs, write_bin

    groups = collect_synthetic(cfg.eval.synthetic_identities, per_identity=6, image_size=cfg.data.image_size,
                               seed=cfg.data.seed, difficulty=cfg.data.difficulty, fmt="png")
    write_bin(path, sample_pairs(groups, cfg.eval.synthetic_pairs, seed=cfg.seed))
    return path


def _gather_rows(x: torch.Tensor, n_total: int, world: int, device: torch.device) -> torch.Tensor:
    """Concatenates every rank's contiguous slice of an (n_total, D) array (slices differ by <= 1 row)."""
    if world == 1:
        return x
    padded = torch.zeros(-(-n_total // world), x.shape[1], dtype=x.dtype, device=device)
    padded[:len(x)] = x.to(device)
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    sizes = [hi - lo for lo, hi in (_bounds(n_total, world, r) for r in range(world))]
    return torch.cat([p[:n] for p, n in zip(parts, sizes)]).cpu()


def _bounds(n: int, world: int, rank: int) -> tuple[int, int]:
    return n * rank // world, n * (rank + 1) // world


class Verifier:
    """The configured .bin sets (and the synthetic unseen set), evaluated collectively (see module doc)."""

    def __init__(self, cfg: Config, env, output_dir: str):
        self.cfg, self.env = cfg, env
        self.bins = list(cfg.eval.bins)
        for key, paths in (("eval.bins", cfg.eval.bins), ("eval.pairs", cfg.eval.pairs)):
            for i, path in enumerate(paths):  # found now, not after hours of training
                if not os.path.isfile(path):
                    raise FileNotFoundError(f"{key}[{i}]={path!r} does not exist: give the path of a verification "
                                            f"set (.bin from `dsoft data make-bin`, or a pair list), or remove it")
        if cfg.eval.synthetic_identities:
            path = os.path.join(output_dir, f"{SYNTHETIC_SET}.bin")
            if env.is_main:
                build_synthetic_bin(cfg, path)
            if dist.is_initialized():
                dist.barrier()
            self.bins.append(path)
        self._loaded: dict[str, tuple] = {}  # decoded once per run, not per evaluation

    @property
    def enabled(self) -> bool:
        """True when there is a set to verify on."""
        return bool(self.bins or self.cfg.eval.pairs)

    def _bin(self, path: str, model: nn.Module) -> dict:
        if path not in self._loaded:
            self._loaded[path] = load_bin(path)
        images, issame = self._loaded[path]
        e = self.cfg.eval
        lo, hi = _bounds(len(images), self.env.world_size, self.env.rank)
        mine = extract_embeddings(model, images[lo:hi], batch_size=e.batch_size, flip=e.flip, device=self.env.device)
        emb = _gather_rows(torch.from_numpy(mine), len(images), self.env.world_size, self.env.device).numpy()
        if not self.env.is_main:
            return {}
        result = verify_kfold(emb[0::2], emb[1::2], np.asarray(issame), folds=e.folds)
        result["name"] = set_name(path)
        return result

    def __call__(self, backbone: nn.Module) -> dict[str, float]:
        """Evaluates ``backbone`` on every set; rank 0 gets the flat metrics, the others {}.

        Every rank first takes rank 0's buffers (BatchNorm's running statistics): each rank's own
        last training step updated its copy, and rank 0's is the one ``backbone.pt`` holds. Training
        does not read them (DDP broadcasts rank 0's before each forward anyway)."""
        if dist.is_initialized() and self.env.world_size > 1:
            for buffer in backbone.buffers():
                dist.broadcast(buffer, src=0)
        model = EvalForward(backbone)
        bins = [self._bin(path, model) for path in self.bins]
        pairs = []
        if self.cfg.eval.pairs and self.env.is_main:
            e = self.cfg.eval
            pairs = [evaluate_pairs(model, path, fars=e.fars, batch_size=e.batch_size, flip=e.flip,
                                    device=self.env.device) for path in e.pairs]
        if self.cfg.eval.pairs and dist.is_initialized():
            dist.barrier()
        if not self.env.is_main:
            return {}
        metrics = flat_metrics({"bins": bins, "pairs": pairs})
        for r in bins:
            log.info("%s: accuracy %.4f +- %.4f, VAL@FAR=1e-3 %.4f", r["name"], r["accuracy"], r["accuracy_std"],
                     r["val"])
        return metrics
