"""What ``dsoft bench chaos`` checks, read from the run's own files: every logged loss, the final weights, and
every sample of every epoch trained exactly once.

    tail = MetricsTail("run/metrics.jsonl")    # every row the file ever held, across a resumed run's rewrites
    rows = tail.poll()                          # the rows written since the last call (and tail.attempts)
    history, redone = trained_history(segments) # logging.sample_keys' lines, per launch, per rank
    counts = sample_counts(history, epoch_keys(reference_history))   # {"lost", "repeated", "unexpected"}
    differ = weights_differ(final_weights("run", cfg), final_weights("reference", cfg))

Nothing here starts a process: ``dsoft_dist.bench.chaos`` runs the soak and feeds these its files.
"""
from __future__ import annotations

import json
import os
import re
from collections import Counter
from pathlib import Path

import torch

from dsoft_dist.head import ShardedClassifier, load_head_checkpoint
from dsoft_dist.models.checkpoint import read_backbone_file

# {step: {rank: (epoch, keys)}}: the batches a step of the final run was trained on, by rank
History = dict[int, dict[int, tuple[int, list[str]]]]
RESUMED = re.compile(r"resumed from \S+: step (\d+)")  # Checkpointer.load's line


class MetricsTail:
    """Follows a run's metrics.jsonl through the rewrites of its restarts.

    A resumed run rewrites the file (the rows up to its checkpoint) into a new file, so the rows the killed
    attempt logged past its checkpoint vanish from it. The tail keeps the file it reads open: when the path
    names a new file, the rest of the old one is read first, so every row any attempt logged is seen once
    (a row torn by a kill, without its newline, is dropped). Each new file is an attempt (``attempts``): the
    start of the run and each restart, whose first rows are the history it kept.
    """

    def __init__(self, path: str):
        self.path, self.attempts = path, 0
        self._fh, self._ino, self._partial = None, None, ""

    def poll(self) -> list[dict]:
        """The rows written since the last call, in order, each with ``attempt`` (1 = the first file) added."""
        rows = self._read()
        try:
            ino = os.stat(self.path).st_ino
        except FileNotFoundError:  # not started yet, or between the rewrite's steps
            return rows
        if ino != self._ino:
            rows += self._read()  # the old file's last rows, written before the restart replaced it
            self.close()
            self._fh = open(self.path, encoding="utf-8")  # noqa: SIM115 - kept open across calls on purpose
            self._ino, self._partial = os.fstat(self._fh.fileno()).st_ino, ""
            self.attempts += 1
            rows += self._read()
        return rows

    def _read(self) -> list[dict]:
        if self._fh is None:
            return []
        *lines, self._partial = (self._partial + self._fh.read()).split("\n")
        return [{**json.loads(line), "attempt": self.attempts} for line in lines if line.strip()]

    def close(self) -> None:
        """Closes the file it follows."""
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def loss_mismatches(rows: list[dict], reference: dict[int, float]) -> list[str]:
    """Each training row whose loss is not exactly the reference's at its step, as 'step S: got X, want Y'."""
    return [f"step {r['step']}: got {r['loss']!r}, want {reference.get(r['step'])!r}" for r in rows
            if "loss" in r and r["loss"] != reference.get(r["step"])]


def _parse(line: str, where: str) -> tuple[int, int, list[str]]:
    words = line.split()
    if len(words) < 3 or not (words[0].isdigit() and words[1].isdigit()):
        raise ValueError(f"{where}: {line[:80]!r} is not a sample-key line '<step> <epoch> <key> ...'")
    return int(words[0]), int(words[1]), words[2:]


def _drop_from(history: History, step: int, rank: int | None = None) -> None:
    """Forgets the steps >= ``step`` (of one rank, or of every rank)."""
    for s in [s for s in history if s >= step]:
        if rank is None:
            del history[s]
        else:
            history[s].pop(rank, None)
            if not history[s]:
                del history[s]


def trained_history(segments: list[dict[int, list[str]]]) -> tuple[History, int]:
    """The batches the finished run is made of, from logging.sample_keys' lines ``<step> <epoch> <key> ...``.

    ``segments``: per launch of the run, in order, the lines each rank appended during it. Within a launch
    the world size is fixed and a restart resumes every rank from ``latest``: a rank's line for a step at or
    before its previous line's starts again there, and its later lines win. A launch starts where its
    checkpoint left the run: every step from its first line on is forgotten on every rank, those of a
    world size that is gone included. Returns ({step: {rank: (epoch, keys)}}, steps redone: rank 0's lines
    beyond one per step of the result).
    """
    history: History = {}
    rank0_lines = 0
    for n, segment in enumerate(segments):
        parsed = {rank: [_parse(line, f"launch {n + 1}, rank {rank}") for line in lines]
                  for rank, lines in segment.items()}
        firsts = [entries[0][0] for entries in parsed.values() if entries]
        if firsts:
            _drop_from(history, min(firsts))
        for rank, entries in parsed.items():
            previous = None
            for step, epoch, keys in entries:
                if previous is not None and step <= previous:
                    _drop_from(history, step, rank)  # a restart inside the launch resumed before this step
                history.setdefault(step, {})[rank] = (epoch, keys)
                previous = step
        rank0_lines += len(parsed.get(0, []))
    return history, rank0_lines - len(history)


def epoch_keys(history: History) -> dict[int, set[str]]:
    """{epoch: the keys trained in it}."""
    out: dict[int, set[str]] = {}
    for by_rank in history.values():
        for epoch, keys in by_rank.values():
            out.setdefault(epoch, set()).update(keys)
    return out


def sample_counts(history: History, expected: dict[int, set[str]]) -> dict[str, int]:
    """Against ``expected`` ({epoch: keys}, the undisturbed run's): ``lost`` = expected samples an epoch never
    trained, ``repeated`` = extra trainings of a sample within one epoch, ``unexpected`` = samples an epoch
    trained that the undisturbed run's epoch did not have."""
    trained: dict[int, Counter] = {}
    for by_rank in history.values():
        for epoch, keys in by_rank.values():
            trained.setdefault(epoch, Counter()).update(keys)
    lost = sum(len(keys - set(trained.get(epoch, ()))) for epoch, keys in expected.items())
    repeated = sum(n - 1 for counts in trained.values() for n in counts.values() if n > 1)
    unexpected = sum(1 for epoch, counts in trained.items() for key in counts if key not in expected.get(epoch, ()))
    return {"lost": lost, "repeated": repeated, "unexpected": unexpected}


def read_segments(samples_dir: str, offsets: list[dict[str, int]]) -> list[dict[int, list[str]]]:
    """The lines each rank file of ``samples_dir`` (``rank-NNNNN.txt``) got during each launch: ``offsets[k]``
    holds every file's size when launch k started (``file_sizes``); a launch ends where the next one starts."""
    names = sorted(os.listdir(samples_dir)) if os.path.isdir(samples_dir) else []
    texts = {name: Path(samples_dir, name).read_bytes() for name in names}
    segments = []
    for k, start in enumerate(offsets):
        end = offsets[k + 1] if k + 1 < len(offsets) else {name: len(text) for name, text in texts.items()}
        segment = {}
        for name, text in texts.items():
            chunk = text[start.get(name, 0):end.get(name, len(text))].decode()
            if chunk:
                segment[int(name.split("-")[1].split(".")[0])] = chunk.splitlines()
        segments.append(segment)
    return segments


def file_sizes(folder: str) -> dict[str, int]:
    """{name: size} of the files in ``folder`` ({} when it does not exist yet)."""
    if not os.path.isdir(folder):
        return {}
    return {name: os.path.getsize(os.path.join(folder, name)) for name in os.listdir(folder)}


def final_weights(out_dir: str, num_classes: int, embedding_size: int) -> dict[str, torch.Tensor]:
    """A finished run's backbone.pt tensors and its whole head weight (C, D), by name."""
    head = ShardedClassifier(num_classes, embedding_size)
    load_head_checkpoint(os.path.join(out_dir, "head"), head)
    backbone = read_backbone_file(os.path.join(out_dir, "backbone.pt"))["state_dict"]
    return {**{f"backbone.{k}": v for k, v in backbone.items()}, "head.weight": head.weight.detach()}


def weights_differ(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    """The names of the tensors that are not bit for bit equal (or are missing from one side)."""
    return sorted(name for name in a.keys() | b.keys()
                  if name not in a or name not in b or not torch.equal(a[name], b[name]))


def resumed_steps(log_paths: list[str]) -> list[int]:
    """The step each start resumed from, in order over the launchers' logs (rank 0's ``resumed from ...: step N``)."""
    steps = []
    for path in log_paths:
        with open(path, encoding="utf-8", errors="replace") as fh:
            steps += [int(m) for m in RESUMED.findall(fh.read())]
    return steps


def _final_steps(run_dir: str) -> list[int]:
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as fh:
        return [row["step"] for row in map(json.loads, filter(str.strip, fh)) if "loss" in row]


def findings(reference, soak, steps: int, num_classes: int, embedding_size: int) -> dict:
    """Everything the report states about ``soak`` against ``reference`` (both ``dsoft_dist.bench.chaos.Soak``s
    that ran to the end): the losses checked and the ones that differ, whether metrics.jsonl and the sample keys
    hold each step once, the sample counts, the steps redone, the weights that differ, the restarts."""
    want = {row["step"]: row["loss"] for row in reference.rows if "loss" in row}
    sizes = [launch.world_size for launch in soak.launches]
    same = next((k for k, n in enumerate(sizes) if n != sizes[0]), len(sizes))  # launches before the first resize
    # every row an attempt logged, once: a restart's rewritten history repeats rows byte for byte (their time too)
    checked = list({(row["step"], row["time"]): row for row in soak.rows if "loss" in row and row["launch"] <= same}
                   .values())
    ref_history, _ = trained_history(read_segments(os.path.join(reference.run_dir, "samples"), reference.offsets))
    history, redone = trained_history(read_segments(os.path.join(soak.run_dir, "samples"), soak.offsets))
    want_weights = final_weights(reference.run_dir, num_classes, embedding_size)
    differ = weights_differ(final_weights(soak.run_dir, num_classes, embedding_size), want_weights)
    return {"checked": checked, "mismatches": loss_mismatches(checked, want), "resized": same < len(sizes),
            "metrics_whole": _final_steps(soak.run_dir) == list(range(1, steps + 1)),
            "history_whole": sorted(history) == list(range(1, steps + 1)), "redone": redone,
            **sample_counts(history, epoch_keys(ref_history)), "epochs": len(epoch_keys(ref_history)),
            "differ": differ, "tensors": len(want_weights),
            "restarts": soak.tail.attempts - 1, "relaunches": len(soak.launches) - 1,
            "resumed": resumed_steps([launch.log_path for launch in soak.launches])}
