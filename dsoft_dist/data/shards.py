"""Shard lists, the rank/worker split, tar streaming and the bad-data policy.

Stages (plain generators, composed by ``dsoft_dist.data.pipeline``):

- ``expand_shards(spec)``: local paths, brace patterns (``train-{000000..000099}.tar``),
  ``::``-joined lists, a text file with one URL per line, a folder holding a manifest,
  and ``pipe:CMD`` URLs (the command's stdout is the tar stream).
- ``assign_samples(...)``: the explicit split. Each epoch the shard order is shuffled
  from (seed, epoch); with per-shard counts (from the manifest) the concatenated sample
  sequence is cut into world_size contiguous rank ranges, each cut into num_workers
  worker ranges, so every sample is read exactly once per epoch and ranks differ by at
  most one sample. A shard straddling a cut is read by both sides, each keeping its
  part. Without counts, whole shards are dealt round-robin to (rank, worker) slots. Given
  a done mask (a resume on another world size), the cut is made over the samples left.
- ``iter_tar_samples(url, ...)``: groups tar members by key into sample dicts
  (``{"__key__", "__index__", "jpg": bytes, "cls": bytes, ...}``).
- ``BadData``: per-worker counts of bad samples plus the policy: ``skip`` counts and warns (first
  few of each kind, then every 1000th; a shard that cannot be read, or breaks off, counts the samples
  of its part it lost and is warned about once), ``fail`` raises BadDataError at once.

    python -c "from dsoft_dist.data.shards import assign_samples as a; print(a([5, 3, 4], 0, 2, 0, 2, epoch=0, seed=0))"
"""
from __future__ import annotations

import importlib
import os
from typing import Iterator, Sequence

import braceexpand
import numpy as np

from dsoft_dist.data.position import done_range, is_done
from dsoft_dist.data.tarstream import TarFormatError, iter_members
from dsoft_dist.errors import BadDataError
from dsoft_dist.observability import get_logger

log = get_logger(__name__)

BAD_KINDS = ("corrupt_image", "missing_image", "corrupt_vector", "missing_vector", "missing_label", "bad_label",
             "truncated_shard", "unreadable_shard")
SHARD_KINDS = ("truncated_shard", "unreadable_shard")  # a shard's part lost at once, not one sample
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
POLICIES = ("skip", "fail")


class BadData:
    """Counts bad samples of each kind and applies the policy (skip | fail).

    ``counts[kind]`` are samples. A shard that cannot be opened (unreadable_shard) or breaks off
    (truncated_shard) counts the samples of its part it did not deliver (1 when no manifest gives the
    shard's count) and is also recorded in ``events`` as (kind, url, samples, message), one per shard
    read. log_shards=False leaves the warning about such a shard to the caller, which reads
    ``events`` (the training loader does, with the rank's running count).
    """

    def __init__(self, policy: str = "skip", where: str = "", warn_first: int = 5, log_shards: bool = True):
        if policy not in POLICIES:
            raise ValueError(f"bad-data policy {policy!r} is unknown: use one of {', '.join(POLICIES)}")
        self.policy, self.where, self.warn_first, self.log_shards = policy, where, warn_first, log_shards
        self.counts = {kind: 0 for kind in BAD_KINDS}
        self.events: list[tuple[str, str, int, str]] = []

    def report(self, kind: str, message: str, samples: int = 1, url: str = "") -> None:
        """Records ``samples`` bad samples of ``kind`` (a shard kind: the shard at ``url``); raises BadDataError
        under the fail policy."""
        if self.policy == "fail":
            raise BadDataError(f"{self.where}{message} [{kind}]: fix or drop the data, or set data.bad_data=skip "
                               "to skip and count bad samples")
        self.counts[kind] += samples
        if kind in SHARD_KINDS:
            self.events.append((kind, url, samples, message))
            if self.log_shards:
                log.warning("%s%s [%s]: skipped and counted as bad samples", self.where, message, kind)
            return
        n = self.counts[kind]
        if n <= self.warn_first or n % 1000 == 0:
            log.warning("%sskipped bad data #%d of kind %s: %s", self.where, n, kind, message)

    def total(self) -> int:
        """Bad samples of every kind."""
        return sum(self.counts.values())


def expand_shards(spec) -> list[str]:
    """Expands a shard spec (str or list of str) into a list of URLs (see module doc)."""
    if isinstance(spec, (list, tuple)):
        return [url for item in spec for url in expand_shards(item)]
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"shard spec {spec!r} is empty: give a path, a brace pattern like "
                         "/data/train-{000000..000099}.tar, a list file or a pipe: command")
    spec = spec.strip()
    if "::" in spec:
        return expand_shards(spec.split("::"))
    if spec.startswith("pipe:"):
        return list(braceexpand.braceexpand(spec))
    if os.path.isdir(spec):
        from dsoft_dist.data.manifest import MANIFEST_NAME, load_manifest

        if os.path.exists(os.path.join(spec, MANIFEST_NAME)):
            return load_manifest(spec).shard_paths()
        found = sorted(os.path.join(spec, f) for f in os.listdir(spec) if f.endswith(".tar"))
        if not found:
            raise ValueError(f"shard folder {spec!r} holds no .tar files and no manifest.json")
        return found
    if os.path.isfile(spec) and not spec.endswith((".tar", ".tgz", ".tar.gz")):
        with open(spec, encoding="utf-8") as f:  # a list file: one URL per line
            return [url for raw in f if (line := raw.strip()) and not line.startswith("#")
                    for url in expand_shards(line)]
    return list(braceexpand.braceexpand(spec))


def check_local_shards(urls: Sequence[str], what: str) -> None:
    """Raises FileNotFoundError when local shard paths do not exist (URLs and ``pipe:`` are not checked):
    a missing local shard at start-up is a wrong path, not bad data to skip for a whole run."""
    missing = [u for u in urls if "://" not in u and not u.startswith("pipe:") and not os.path.isfile(u)]
    if missing:
        raise FileNotFoundError(f"{what}: {len(missing)} of {len(urls)} shard files do not exist (first: "
                                f"{missing[0]!r}): check the path or pattern (dsoft data verify DIR checks a "
                                "shard set against its manifest)")


def _epoch_order(num_shards: int, epoch: int, seed: int, shuffle: bool) -> np.ndarray:
    if not shuffle:
        return np.arange(num_shards)
    return np.random.default_rng([seed, epoch, 101]).permutation(num_shards)


def shard_starts(counts: Sequence[int]) -> np.ndarray:
    """(S + 1,) int64: each shard's first sample id (shards in manifest order), then the total."""
    return np.concatenate([[0], np.cumsum(np.asarray(counts, dtype=np.int64))])


def assign_samples(counts: Sequence[int] | int, rank: int, world_size: int, worker: int, num_workers: int,
                   epoch: int = 0, seed: int = 0, shuffle: bool = True,
                   done: np.ndarray | None = None) -> list[tuple[int, int, int]]:
    """The (rank, worker) slot's reading plan for an epoch: [(shard, start, stop), ...].

    counts: per-shard sample counts, or the number of shards when counts are unknown
    (then whole shards are dealt round-robin and stop=-1 means "to the end").
    Samples [start, stop) of shard ``shard`` (its position in the tar) belong to the slot.
    done: a done mask over sample ids (``dsoft_dist.data.position``): the cut is made over the
    epoch's remaining samples only, and the reader skips the done ones inside [start, stop).
    """
    if not (0 <= rank < world_size and 0 <= worker < num_workers):
        raise ValueError(f"rank={rank}/world_size={world_size}, worker={worker}/num_workers={num_workers} "
                         "are inconsistent: need 0 <= rank < world_size and 0 <= worker < num_workers")
    if isinstance(counts, int):
        if done is not None:
            raise ValueError("a done mask needs per-shard counts (a manifest) to number the samples")
        order = _epoch_order(counts, epoch, seed, shuffle)
        slot, slots = rank * num_workers + worker, world_size * num_workers
        return [(int(s), 0, -1) for s in order[slot::slots]]
    counts = np.asarray(counts, dtype=np.int64)
    starts = shard_starts(counts)
    left = counts if done is None else np.array(
        [c - done_range(done, starts[s], starts[s] + c).sum() for s, c in enumerate(counts)], dtype=np.int64)
    order = _epoch_order(len(counts), epoch, seed, shuffle)
    total = int(left.sum())
    r0, r1 = total * rank // world_size, total * (rank + 1) // world_size
    lo, hi = r0 + (r1 - r0) * worker // num_workers, r0 + (r1 - r0) * (worker + 1) // num_workers
    plan, offset = [], 0
    for s in order:
        n = int(left[s])
        a, b = max(lo, offset) - offset, min(hi, offset + n) - offset  # in the shard's remaining samples
        if a < b:
            if done is not None:  # the a-th .. (b-1)-th remaining sample, as tar positions
                keep = np.flatnonzero(~done_range(done, starts[s], starts[s + 1]))
                a, b = int(keep[a]), int(keep[b - 1]) + 1
            plan.append((int(s), a, b))
        offset += n
    return plan


def _open(url: str):
    """A readable binary stream for a path or any URL webdataset's gopen handles (pipe:, ...)."""
    if "://" not in url and not url.startswith("pipe:"):
        return open(url, "rb")
    return importlib.import_module("webdataset.gopen").gopen(url, "rb")


def _split_name(name: str) -> tuple[str, str]:
    """webdataset convention: key = path up to the first dot of the basename, ext = the rest."""
    dot = name.find(".", name.rfind("/") + 1)
    if dot < 0:
        return name, ""
    return name[:dot], name[dot + 1:].lower()


def _lost(first: int, start: int, stop: int, done: np.ndarray | None) -> int:
    """How many of positions [max(first, start), stop) a damaged shard did not deliver, less the ones
    ``done`` (the (stop - start,) bool mask of positions an interrupted epoch used) marks; -1 when the
    shard's count is unknown (stop=-1: no manifest)."""
    if stop < 0:
        return -1
    first = max(first, start)
    if first >= stop:
        return 0
    return stop - first - (0 if done is None else int(done[first - start:].sum()))


def _report_lost(bad: BadData, kind: str, url: str, what: str, lost: int) -> None:
    """One shard event: ``lost`` samples (-1: unknown, counted as 1) of the part [start, stop)."""
    words = (f"{lost} samples of this part are lost" if lost >= 0 else
             "an unknown number of its samples are lost (no manifest gives the count; 1 is counted)")
    bad.report(kind, f"{what}: {words}", samples=1 if lost < 0 else lost, url=url)


def iter_tar_samples(url: str, bad: BadData, start: int = 0, stop: int = -1,
                     done: np.ndarray | None = None) -> Iterator[dict]:
    """Yields the samples with positions [start, stop) of one tar shard (stop=-1: to the end).

    A sample is a dict of its members' bytes by extension plus ``__key__``, ``__url__``,
    ``__index__``. An unreadable or truncated shard is reported to ``bad`` with the samples of
    [start, stop) it could not deliver (the samples read before the damage are kept; the incomplete
    one is lost); ``done``, the (stop - start,) bool mask of positions the epoch already used, are not
    counted as lost. It may break at any time: a shard removed or cut while a run reads its data set.
    """
    try:
        stream = _open(url)
    except OSError as exc:
        lost = _lost(start, start, stop, done)
        _report_lost(bad, "unreadable_shard", url, f"cannot open shard {url!r} ({exc})", lost)
        return
    index, current, key = -1, None, None
    try:
        for name, data in iter_members(stream):
            k, ext = _split_name(name)
            if k != key:
                if current is not None and index >= start:
                    yield current
                index, key, current = index + 1, k, None
                if 0 <= stop <= index:
                    return
                if index >= start:
                    current = {"__key__": k, "__url__": url, "__index__": index}
            if current is not None:
                current[ext] = data
        if current is not None:
            yield current
        if stop >= 0 and index + 1 < stop:  # ended early at a member boundary: only the manifest can tell
            _report_lost(bad, "truncated_shard", url, f"shard {url!r} ended after {index + 1} samples but the "
                         f"manifest promises at least {stop}", _lost(index + 1, start, stop, done))
    except (TarFormatError, OSError) as exc:  # the sample in progress (index) is dropped
        where = f"in sample {index}" if index >= 0 else "at its start"
        _report_lost(bad, "truncated_shard", url, f"shard {url!r} is truncated or corrupt {where} ({exc})",
                     _lost(max(index, 0), start, stop, done))
    finally:
        try:
            stream.close()
        except Exception as exc:  # a pipe: closed early may complain about its exit status
            log.debug("closing %s: %s", url, exc)


def iter_plan(urls: Sequence[str], plan, bad: BadData, counts: Sequence[int] | None = None,
              done: np.ndarray | None = None) -> Iterator[dict]:
    """Chains iter_tar_samples over a slot's plan from assign_samples. With per-shard counts each
    sample gets its ``__id__`` (-1 without) and the ones set in ``done`` are left out."""
    starts = None if counts is None else shard_starts(counts)
    for shard, start, stop in plan:
        used = None if done is None or stop < 0 else done_range(done, starts[shard] + start, starts[shard] + stop)
        for sample in iter_tar_samples(urls[shard], bad, start, stop, used):
            sample["__id__"] = -1 if starts is None else int(starts[shard]) + sample["__index__"]
            if done is not None and is_done(done, [sample["__id__"]])[0]:
                continue
            yield sample


def shuffle_buffer(items: Iterator, size: int, rng: np.random.Generator) -> Iterator:
    """Seeded reservoir shuffle with a buffer of ``size`` items (size <= 1: no shuffle)."""
    if size <= 1:
        yield from items
        return
    buf, draws = [], iter(())
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        j = next(draws, None)
        if j is None:  # slots drawn 1024 at a time: one numpy call per item would cost as much as the read
            draws = iter(rng.integers(size, size=1024).tolist())
            j = next(draws)
        buf[j], item = item, buf[j]
        yield item
    order = rng.permutation(len(buf))
    for j in order:
        yield buf[j]
