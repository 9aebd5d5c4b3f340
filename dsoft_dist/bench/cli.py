"""``dsoft bench NAME [ARGS...]``: runs a benchmark script; ARGS go to it unchanged.

    dsoft bench head --classes 1000000 --dim 512 --batch 512 --sample-rates 1 0.125 0.015625
    dsoft bench train                     # the whole training step, 2 ranks, C=1,000,000, r=1 vs 1/64
    dsoft bench speedup --nproc 2         # every method vs full softmax and full D-Softmax, rates 1/2..1/64
    dsoft bench accuracy                  # every method trained and verified, 3 seeds (about an hour on CPU)
    dsoft bench dissection                # intra-class angles of 3-D embeddings, 5 vs 10 identities
    dsoft bench data --samples 6000 --workers 0,1,2
    dsoft bench stream --identities 100000,1000000  # vector shards; --images for image shards
    dsoft bench backbone --models vit_b iresnet100 --device cuda --batch 128 --dtype bf16
    dsoft bench kernels                   # CUDA only; launch/gpu_check.sh OUT runs it with the GPU tests
    dsoft bench chaos --faults 20 --seed 0  # kills, preemptions, torn saves under torchrun; --world-sizes 2,1,3,2
    dsoft bench terms --runs runs/dsoft runs/arcface  # each loss on the target and hardest negatives per checkpoint
    dsoft bench head --help

Same as ``python -m dsoft_dist.bench.NAME ARGS...``; each benchmark's parser comes from ``bench_parser``,
so its help says ``dsoft bench NAME``.
"""
from __future__ import annotations

import argparse
import importlib

BENCHMARKS = {
    "head": "one sharded head step (forward + backward + optimizer) vs sample rate, against plain matmul",
    "train": "the trainer's whole step vs sample rate (C=1M), against a bare loop over the same objects",
    "speedup": "the paper's speedup table: every method's whole head step and memory vs rate, CSV/Markdown/PNG",
    "accuracy": "the paper's accuracy table: every method trained by dsoft train, verified on unseen identities",
    "logit_cache": "the head step with and without the logit cache, alternating in one run",
    "dissection": "the paper's dissection figure: 3-D embeddings of 5 vs 10 identities, softmax vs D-Softmax",
    "data": "data pipeline samples/s against a bare decode loop",
    "stream": "shards of many identities: write, start-up, samples/s vs bare tar reads, memory per worker",
    "backbone": "backbones' forward + backward per step, activation checkpointing off and on, side by side",
    "kernels": "triton backend vs torch chunked vs naive on CUDA (time, peak memory, bf16 matmul fraction)",
    "chaos": "seeded kills, preemptions and resizes of a run under torchrun; it must end as an undisturbed run",
    "terms": "each loss's pull on the target and push on the hardest negative, margins, per checkpoint of runs",
}


def bench_parser(name: str, description: str | None = None, **kwargs) -> argparse.ArgumentParser:
    """The parser of benchmark NAME: usage ``dsoft bench NAME``, ``description`` without reStructuredText
    double backticks (module docs are its usual source); ``kwargs`` go to ArgumentParser."""
    from dsoft_dist.utils import plain_help

    return argparse.ArgumentParser(prog=f"dsoft bench {name}", description=plain_help(description), **kwargs)


def _run(args) -> int:
    module = importlib.import_module(f"dsoft_dist.bench.{args.name}")
    return int(module.main(args.args) or 0)


def register(subparsers) -> None:
    """Adds ``dsoft bench``."""
    listing = "; ".join(f"{k}: {v}" for k, v in BENCHMARKS.items())
    parser = subparsers.add_parser("bench", help="run a benchmark (ratios measured side by side in one run)",
                                   description=f"Benchmarks. {listing}.")
    parser.add_argument("name", choices=sorted(BENCHMARKS), help="which benchmark")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="arguments for that benchmark (see NAME --help)")
    parser.set_defaults(func=_run)
