"""Data-pipeline throughput: decoded + augmented samples/s against a bare decode loop.

Writes synthetic 112x112 JPEG shards (a converter run), then measures in one run:

- bare decode: read the tar members and decode each JPEG in a plain loop (one process),
  with simplejpeg (when installed) and with Pillow;
- the training pipeline (``build_train_loader``: split, shuffle buffer, decode, flip,
  batching, normalization) with 0, 1, 2... DataLoader workers;
- the in-process synthetic sources (no files): images at 112 and 32 px, vectors.

Ratios are against the bare decode loop with the same decoder, measured in the same run.
This is a benchmark script, not a test.

    dsoft bench data                       # 2000 samples, workers 0,1,2
    dsoft bench data --samples 8000 --workers 0,2,4 --color-jitter 0.2
"""
from __future__ import annotations

import argparse
import sys
import tarfile
import tempfile
import time

import numpy as np
import torch

from dsoft_dist.bench.cli import bench_parser
from dsoft_dist.config.schema import DataConfig
from dsoft_dist.data.convert import synth_to_shards
from dsoft_dist.data.decode import FAST_JPEG, decode_image
from dsoft_dist.data.manifest import load_manifest
from dsoft_dist.data.pipeline import build_train_loader
from dsoft_dist.data.synthetic import SyntheticIdentities, SyntheticVectors
from dsoft_dist.utils import int_list


def bare_decode(paths: list[str], use_fast: bool) -> float:
    """Samples/s of a plain loop: tar read + JPEG decode, nothing else."""
    n, start = 0, time.perf_counter()
    for path in paths:
        with tarfile.open(path) as tar:
            for member in tar:
                if member.name.endswith(".jpg"):
                    decode_image(tar.extractfile(member).read(), use_fast=use_fast)
                    n += 1
    return n / (time.perf_counter() - start)


def pipeline(manifest_dir: str, num_classes: int, workers: int, batch_size: int, color_jitter: float) -> float:
    """Samples/s of one epoch of build_train_loader (worker start-up included)."""
    cfg = DataConfig(source="webdataset", manifest=manifest_dir, num_classes=num_classes, image_size=112,
                     batch_size=batch_size, num_workers=workers, shuffle_buffer=256, color_jitter=color_jitter)
    start, n = time.perf_counter(), 0
    for x, _ in build_train_loader(cfg, rank=0, world_size=1, epoch=0):
        n += len(x)
    return n / (time.perf_counter() - start)


def synthetic_images(size: int, count: int) -> float:
    src = SyntheticIdentities(1000, image_size=size)
    start = time.perf_counter()
    for k in range(count):
        src.sample(k % 1000, k)
    return count / (time.perf_counter() - start)


def synthetic_vectors(batch: int = 512, steps: int = 20) -> float:
    src = SyntheticVectors(10_000_000, dim=128)
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    for _ in range(steps):
        src.batch(rng.integers(0, 10_000_000, batch), rng.integers(0, 100, batch))
    return batch * steps / (time.perf_counter() - start)


def _worker_counts(args) -> list[int]:
    """The --workers counts; ValueError naming the option for a size below 1 or a worker count that is not >= 0."""
    for name, value in (("--samples", args.samples), ("--identities", args.identities),
                        ("--batch-size", args.batch_size)):
        if value < 1:
            raise ValueError(f"{name} {value} is invalid: must be >= 1")
    return int_list(args.workers, "--workers", 0)


def build_parser() -> argparse.ArgumentParser:
    p = bench_parser("data", __doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=2000,
                   help="synthetic 112 px JPEG samples written to the shards and read back (default %(default)s)")
    p.add_argument("--workers", default="0,1,2", help="comma-separated DataLoader worker counts")
    p.add_argument("--batch-size", type=int, default=64, help="samples per batch of the pipeline (default %(default)s)")
    p.add_argument("--color-jitter", type=float, default=0.0,
                   help="data.color_jitter of the pipeline (0 = off, the default)")
    p.add_argument("--identities", type=int, default=100,
                   help="synthetic identities the samples are drawn from (default %(default)s)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    workers = _worker_counts(args)
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        synth_to_shards(tmp, args.identities, max(1, args.samples // args.identities), image_size=112,
                        per_shard=250, workers=2, progress=False)
        paths, manifest = load_manifest(tmp).shard_paths(), load_manifest(tmp)
        bare = {"pillow": bare_decode(paths, use_fast=False)}
        if FAST_JPEG:
            bare["simplejpeg"] = bare_decode(paths, use_fast=True)
        decoder = "simplejpeg" if FAST_JPEG else "pillow"
        for name, rate in bare.items():
            rows.append((f"bare decode loop ({name})", 1, rate, rate / bare[decoder]))
        for w in workers:
            rate = pipeline(tmp, manifest.num_classes, w, args.batch_size, args.color_jitter)
            rows.append((f"pipeline, {w} workers ({decoder})", max(1, w), rate, rate / bare[decoder]))
    for size in (112, 32):
        rate = synthetic_images(size, 500 if size == 112 else 2000)
        rows.append((f"synthetic images {size}x{size}, in-process", 1, rate, float("nan")))
    rows.append(("synthetic vectors D=128, 10M classes", 1, synthetic_vectors(), float("nan")))
    out = [f"{manifest.num_samples} samples, 112x112 JPEG, batch {args.batch_size}, "
           f"color_jitter {args.color_jitter}, torch threads 1",
           f"{'source':44s} {'procs':>5s} {'samples/s':>10s} {'per proc':>9s} {'vs bare':>8s}"]
    out += [f"{name:44s} {procs:5d} {rate:10.0f} {rate / procs:9.0f} {ratio:8.2f}" for name, procs, rate, ratio in rows]
    sys.stdout.write("\n".join(out) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
