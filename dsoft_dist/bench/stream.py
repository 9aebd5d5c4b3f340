"""Shard streaming at scale: write, start-up, samples/s against bare tar reads, memory per worker.

For each identity count (vector shards by default, ``--images`` for image shards) it writes a
shard set with the converter (timed), then measures side by side on the same shards, page
cache warm:

- bare sequential reads, one process: the raw bytes (``f.read``), Python's ``tarfile`` member
  loop, and the project's tar reader (``dsoft_dist.data.tarstream``) alone;
- the training loader (``build_train_loader``: split, shard reads, shuffle buffer, decode,
  re-batching; images also flip and normalization) with 0, 1, 2... DataLoader workers:
  start-up (building the loader until the first batch), steady samples/s over the rest of one
  epoch, and the memory of each worker, read 20 times over the epoch, the last reading kept
  (a worker that finished its part before the first reading, possible only at toy sizes, is not listed)
  (peak RSS, and private memory: what the worker does not share with the main process it
  was forked from).

Every loader measurement runs in a fresh process, so peaks do not carry over between rows.
This is a benchmark script, not a test.

    dsoft bench stream                                     # 100k and 1M identities x 2, 128-d float16
    dsoft bench stream --identities 100000 --images --image-size 32 --workers 0,2
    dsoft bench stream --identities 10000 --keep /data/bench-shards --json out.json
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import re
import shutil
import sys
import tarfile
import tempfile
import time

import torch

from dsoft_dist.bench.cli import bench_parser
from dsoft_dist.config.schema import DataConfig
from dsoft_dist.data.decode import FAST_JPEG, decode_image
from dsoft_dist.data.manifest import MANIFEST_NAME, load_manifest
from dsoft_dist.data.tarstream import iter_members
from dsoft_dist.observability.procs import children, cmdline
from dsoft_dist.utils import int_list


def write(out: str, identities: int, args) -> dict:
    """Writes the shard set; returns {"write_s", "bytes", "samples", "shards"}. A finished set kept by an
    earlier ``--keep`` run is reused, with write_s None (the converter would only resume it)."""
    if os.path.isfile(os.path.join(out, MANIFEST_NAME)):
        manifest = load_manifest(out)
        return {"write_s": None, "bytes": sum(s.bytes for s in manifest.shards), "samples": manifest.num_samples,
                "shards": len(manifest.shards)}
    start = time.perf_counter()
    kw = dict(per_shard=args.per_shard, workers=args.write_workers, progress=sys.stderr.isatty())
    if args.images:
        from dsoft_dist.data.convert import synth_to_shards

        manifest = synth_to_shards(out, identities, args.samples_per_identity, image_size=args.image_size, **kw)
    else:
        from dsoft_dist.data.vectors import synth_vectors_to_shards

        manifest = synth_vectors_to_shards(out, identities, args.samples_per_identity, dim=args.dim,
                                           dtype=args.dtype, **kw)
    return {"write_s": time.perf_counter() - start, "bytes": sum(s.bytes for s in manifest.shards),
            "samples": manifest.num_samples, "shards": len(manifest.shards)}


def bare_reads(paths: list[str], samples: int, images: bool) -> dict:
    """Samples/s of single-process sequential reads of the same shards: raw bytes, tarfile, tarstream, and
    for image shards tarstream + decoding every image (the least any image loader does)."""
    rates = {}
    start, n = time.perf_counter(), 0
    for path in paths:
        with open(path, "rb") as f:
            while block := f.read(1 << 22):
                n += len(block)
    rates["raw bytes (f.read)"] = samples / (time.perf_counter() - start)
    start = time.perf_counter()
    for path in paths:
        with tarfile.open(path, mode="r|") as tar:
            for member in tar:
                tar.extractfile(member).read()
    rates["tarfile members"] = samples / (time.perf_counter() - start)
    start = time.perf_counter()
    for path in paths:
        with open(path, "rb") as f:
            for _ in iter_members(f):
                pass
    rates["tarstream members"] = samples / (time.perf_counter() - start)
    if images:
        start = time.perf_counter()
        for path in paths:
            with open(path, "rb") as f:
                for name, data in iter_members(f):
                    if name.endswith(".jpg"):
                        decode_image(data)
        rates[f"tarstream + decode ({'simplejpeg' if FAST_JPEG else 'pillow'})"] = \
            samples / (time.perf_counter() - start)
    return rates


def _memory(pid: int) -> dict:
    """{"peak_rss_mb", "private_mb"} of a process, from /proc."""
    with open(f"/proc/{pid}/status") as f:
        peak = int(re.search(r"VmHWM:\s+(\d+)", f.read()).group(1))
    with open(f"/proc/{pid}/smaps_rollup") as f:
        private = sum(int(v) for v in re.findall(r"Private_(?:Clean|Dirty):\s+(\d+)", f.read()))
    return {"peak_rss_mb": peak / 1024, "private_mb": private / 1024}


def _loader_workers(parent: int) -> list[int]:
    """The DataLoader workers of ``parent``: its live children forked without exec (same command line), so
    helpers it started with exec (multiprocessing's resource tracker) are not counted."""
    own = cmdline(parent)
    return [pid for pid in children(parent) if cmdline(pid) == own]


def measure_loader(spec: dict) -> dict:
    """One epoch of build_train_loader in this process (run it in a fresh one): start-up, steady rate, memory."""
    from dsoft_dist.data.pipeline import build_train_loader

    mp.set_start_method("fork", force=True)  # this process was spawned; DataLoader workers fork, as under torchrun
    torch.set_num_threads(1)
    cfg = DataConfig(**spec["cfg"])
    start = time.perf_counter()
    loader = build_train_loader(cfg, rank=0, world_size=1, epoch=0)
    steps, n, first, workers = len(loader), 0, None, {}
    every = max(1, steps // 20)
    for step, (x, _) in enumerate(loader):
        if first is None:
            first = time.perf_counter()
            start_s = first - start
        else:
            n += len(x)
        if step % every == 0 or step == steps - 2:  # each worker's latest reading while it lives (a peak)
            for pid in _loader_workers(os.getpid()):
                try:
                    workers[pid] = _memory(pid)
                except (OSError, AttributeError):  # it ended between the listing and the read
                    continue
    steady = n / (time.perf_counter() - first)
    return {"start_s": start_s, "steady_per_s": steady, "steps": steps, "workers": list(workers.values()),
            "main": _memory(os.getpid())}


def _measure_into(spec: dict, queue) -> None:
    queue.put(measure_loader(spec))


def _fresh(spec: dict) -> dict:
    """measure_loader in a fresh (spawned, non-daemonic: it starts the DataLoader workers) process."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(target=_measure_into, args=(spec, queue))
    child.start()
    try:
        while child.is_alive() or not queue.empty():
            try:
                return queue.get(timeout=1.0)
            except Exception:  # queue.Empty: keep waiting while the child runs
                continue
        raise RuntimeError(f"the loader measurement process exited with code {child.exitcode} (see its log above)")
    finally:
        child.join()


def run_size(identities: int, args, folder: str) -> dict:
    """Write + bare reads + the loader at every worker count, for one identity count."""
    info = write(folder, identities, args)
    manifest = load_manifest(folder)
    info["bare"] = bare_reads(manifest.shard_paths(), manifest.num_samples, args.images)
    cfg = {"source": "webdataset", "manifest": folder, "num_classes": identities, "batch_size": args.batch_size,
           "shuffle_buffer": args.shuffle_buffer, "image_size": args.image_size, "vector_dim": args.dim}
    info["loader"] = {w: _fresh({"cfg": {**cfg, "num_workers": w}}) for w in args.worker_counts}
    return info


def format_report(results: dict, args) -> str:
    kind = (f"{args.image_size}x{args.image_size} JPEG images" if args.images
            else f"{args.dim}-d {args.dtype} vectors")
    lines = [f"dsoft bench stream: {kind}, {args.samples_per_identity} samples per identity, batch {args.batch_size}, "
             f"shuffle buffer {args.shuffle_buffer}, {args.per_shard} samples per shard; "
             f"{platform.node()} ({os.cpu_count()} cores), torch {torch.__version__}, "
             f"Python {platform.python_version()}"]
    for identities, r in results.items():
        lines += ["", f"== {identities:,} identities: {r['samples']:,} samples, {r['shards']} shards, "
                  f"{r['bytes'] / 2**20:,.0f} MiB ({r['bytes'] / r['samples']:.0f} B/sample); " + (
                      "written by an earlier run (not timed)" if r["write_s"] is None else
                      f"written in {r['write_s']:.1f} s ({r['samples'] / r['write_s']:,.0f} samples/s, "
                      f"{args.write_workers} writer processes)"),
                  f"{'read':40s} {'start s':>8s} {'samples/s':>10s} {'vs tarfile':>10s} {'vs tarstream':>12s} "
                  f"{'worker peak RSS MiB':>20s} {'worker private MiB':>19s}"]
        tar, own = r["bare"]["tarfile members"], r["bare"]["tarstream members"]
        for name, rate in r["bare"].items():
            lines.append(f"{'bare ' + name:40s} {'':>8s} {rate:10,.0f} {rate / tar:10.2f} {rate / own:12.2f}")
        for w, m in r["loader"].items():
            mem = m["workers"] or [m["main"]]
            peak = "/".join(f"{x['peak_rss_mb']:.0f}" for x in mem)
            private = "/".join(f"{x['private_mb']:.0f}" for x in mem)
            who = f"loader, {w} workers" if w else "loader, in the main process"
            lines.append(f"{who:40s} {m['start_s']:8.2f} {m['steady_per_s']:10,.0f} {m['steady_per_s'] / tar:10.2f} "
                         f"{m['steady_per_s'] / own:12.2f} {peak:>20s} {private:>19s}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = bench_parser("stream", __doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--identities", default="100000,1000000", help="comma-separated identity counts")
    p.add_argument("--samples-per-identity", type=int, default=2, help="samples written per identity (default 2)")
    p.add_argument("--images", action="store_true", help="image shards instead of vector shards")
    p.add_argument("--image-size", type=int, default=32, help="--images: side in pixels (default 32)")
    p.add_argument("--dim", type=int, default=128, help="vector size")
    p.add_argument("--dtype", choices=("float16", "float32"), default="float16",
                   help="vectors: stored dtype (default float16)")
    p.add_argument("--workers", default="0,1,2", help="comma-separated DataLoader worker counts")
    p.add_argument("--batch-size", type=int, default=512, help="the loader's data.batch_size (default 512)")
    p.add_argument("--shuffle-buffer", type=int, default=1000,
                   help="the loader's data.shuffle_buffer, samples (default 1000)")
    p.add_argument("--per-shard", type=int, default=1000, help="samples per shard")
    p.add_argument("--write-workers", type=int, default=2, help="converter processes")
    p.add_argument("--keep", metavar="DIR", help="write the shards here and keep them (default: a temporary folder)")
    p.add_argument("--json", metavar="PATH", help="also write the measurements as JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    sizes = int_list(args.identities, "--identities", 1)
    args.worker_counts = int_list(args.workers, "--workers", 0)
    for name in ("samples_per_identity", "image_size", "dim", "batch_size", "per_shard", "write_workers"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} {getattr(args, name)} is invalid: must be >= 1")
    root = args.keep or tempfile.mkdtemp(prefix="dsoft-stream-")
    results = {}
    try:
        for identities in sizes:
            folder = os.path.join(root, f"{'images' if args.images else 'vectors'}-{identities}")
            results[identities] = run_size(identities, args, folder)
            if not args.keep:
                shutil.rmtree(folder)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    report = format_report(results, args)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"args": {k: v for k, v in vars(args).items()}, "results": results, "report": report}, f,
                      indent=1)
    sys.stdout.write(report + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
