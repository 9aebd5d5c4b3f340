"""Run checkpoints: one folder per step, written aside and renamed, proven whole by a manifest.

    ckpt = Checkpointer(cfg, env)              # under checkpoint.dir (default <output_dir>/checkpoints)
    ckpt.save(states, step)                    # collective: every part of the states map
    path = ckpt.find_resume()                  # collective: the newest checkpoint that verifies, or None
    ckpt.load(states, path)                    # collective: every part back, on any number of ranks
    ckpt.init_weights(states, "runs/old")      # collective: checkpoint.init_from, the parts' weights only

``states`` maps a name to a part (``dsoft_dist.train.state``: a Stateful wrapped in Replicated or
PerRank, or a part that lays out its own files); the checkpointer adds its own, ``checkpointer``
(the best-metric record), and walks the map in its order, saving and loading each part at
``step-N/<name>``. It never looks into a part. The trainer's map gives this layout
(``checkpoint.dir`` must be one folder every rank can read and write, e.g. a shared file system):

    step-00001234/
      trainer.pt               the step, skipped steps and the run's config (Replicated: rank 0 writes)
      backbone.pt              the backbone's plain state dict, CPU fp32 (rank 0)
      engine/                  the backbone optimizer and loss scale (DDP: ddp.pt; DeepSpeed: its own form)
      head/                    the head and its optimizer by class range (``dsoft_dist.head.state``)
      data.pt                  the data position, world-size independent (Replicated, OR-ed over ranks)
      rng/rank-00000.pt        each rank's python, numpy, torch and CUDA RNG states (PerRank)
      checkpointer.pt          the best ``checkpoint.keep_best`` value and its folder
      manifest.json            every file above with its size and sha256, the step, the writer's world size
    latest                     the newest complete folder's name; moves only after every rank finished
    best                       the folder with the best ``checkpoint.keep_best`` metric

A folder is written as ``step-N.tmp`` and renamed by rank 0 after every rank's files are in and
hashed, so a crash mid-write leaves a ``.tmp`` folder that is never loaded. A checkpoint of the
earlier format /1 (its trainer.pt also held the data position and the best record) resumes too. Everything is read
with ``torch.load(weights_only=True)``: a file carrying pickled code is refused, nothing runs.
With ``checkpoint.async_save`` the parts' snapshots are CPU copies written by a background thread
(its collectives on a gloo group of its own); a part that saves itself (DeepSpeed) makes the save
synchronous.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass

import torch.distributed as dist

from dsoft_dist.errors import CheckpointError
from dsoft_dist.observability import get_logger
from dsoft_dist.parallel.comm import broadcast_object, gather_objects
from dsoft_dist.train.ckpt_files import (
    FORMAT,
    FORMAT_1,
    MANIFEST,
    check_manifest,
    hash_files,
    multi_rank,
    read_manifest,
    storage_error,
    write_manifest,
)
from dsoft_dist.train.state import Replicated, SelfSavingPart, SnapshotPart
from dsoft_dist.utils import __version__, atomic_save, failpoint, load_weights_only, write_text_atomic

log = get_logger(__name__)

RUN_CHECKPOINTS = "checkpoints"  # the checkpoint root inside a run folder (checkpoint.dir's default)
STEP_PREFIX = "step-"
OWN_PART = "checkpointer"


def step_folder(step: int) -> str:
    """The folder name of the checkpoint after optimizer step ``step``."""
    return f"{STEP_PREFIX}{step:08d}"


def step_folders(root: str) -> list[str]:
    """The complete-looking step folders under a checkpoint root, oldest first (``.tmp`` ones are unfinished)."""
    if not os.path.isdir(root):
        return []
    return sorted(n for n in os.listdir(root) if n.startswith(STEP_PREFIX) and not n.endswith(".tmp")
                  and os.path.isdir(os.path.join(root, n)))


def read_pointer(root: str, name: str = "latest") -> str | None:
    """The folder name a pointer file (``latest``, ``best``) under ``root`` holds, or None."""
    path = os.path.join(root, name)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as fh:
        return fh.read().strip() or None


def checkpoint_root_of(path: str) -> str | None:
    """PATH when it is a checkpoint root (it holds ``latest`` or step folders), PATH/checkpoints when PATH
    is a run folder (logging.output_dir, whose default checkpoint.dir that is), else None."""
    if os.path.isfile(os.path.join(path, "latest")) or step_folders(path):
        return path
    run = os.path.join(path, RUN_CHECKPOINTS)
    return run if os.path.isdir(run) and not os.path.isfile(os.path.join(path, MANIFEST)) else None


def newest_checkpoint(root: str) -> str | None:
    """The folder a checkpoint root's ``latest`` names, else its highest step; None when it has none."""
    names = step_folders(root)
    newest = read_pointer(root) or (names[-1] if names else None)
    return os.path.join(root, newest) if newest else None


def init_source(path: str) -> tuple[str, str]:
    """What checkpoint.init_from names: ("backbone", file) for a backbone.pt; ("checkpoint", folder) for a
    checkpoint folder, or the newest of a checkpoint root's or a run folder's (``<run>/checkpoints``)."""
    if os.path.isfile(path):
        return "backbone", path
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint.init_from={path!r} does not exist: pass a checkpoint folder "
                                "(<output_dir>/checkpoints/step-N), a run's output_dir or its backbone.pt")
    if os.path.isfile(os.path.join(path, MANIFEST)):
        return "checkpoint", path
    root = checkpoint_root_of(path)
    newest = newest_checkpoint(root) if root else None
    if newest is None:
        raise CheckpointError(f"checkpoint.init_from={path!r} holds no checkpoint (no manifest.json, no step-N "
                              "folders, no checkpoints/): pass a checkpoint folder, a run's output_dir or a "
                              "backbone.pt")
    return "checkpoint", newest


@dataclass
class BestRecord:
    """The checkpointer's own state: the best ``checkpoint.keep_best`` value so far and the folder holding it."""

    best: float | None = None
    folder: str | None = None

    def improves(self, value: float) -> bool:
        """Higher is better; the first value always improves."""
        return self.best is None or value > self.best

    def state_dict(self) -> dict:
        """{"best", "best_folder"}."""
        return {"best": self.best, "best_folder": self.folder}

    def load_state_dict(self, state: dict) -> None:
        """Restores what ``state_dict`` returned."""
        self.best, self.folder = state["best"], state["best_folder"]


def _fresh_folder(tmp: str, parts: dict) -> None:
    """An empty ``tmp`` (what a torn write of an earlier attempt left there is removed first), with the folders
    of the parts that save themselves: their collective save then creates none (a failure there is agreed on
    here, before it starts)."""
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    for key, part in parts.items():
        if not isinstance(part, SnapshotPart):
            os.makedirs(os.path.join(tmp, key))


def _attempt(action) -> str | None:
    """Runs ``action()``; None when it worked, the error as text when the storage failed (``storage_error``)."""
    try:
        action()
    except (OSError, RuntimeError) as err:
        if not storage_error(err):
            raise
        return f"{type(err).__name__}: {err}"
    return None


def _format_1_parts(path: str, scratch: str) -> dict[str, str]:
    """Where the data and checkpointer parts of a checkpoint of format /1 are: its trainer.pt held them (the
    trainer's map named its data part "data"), so they are written apart into ``scratch`` as /2 has them."""
    state = load_weights_only(os.path.join(path, "trainer.pt"))
    atomic_save(state["data"], os.path.join(scratch, "data.pt"))
    atomic_save({"best": state["best"], "best_folder": state["best_folder"]}, os.path.join(scratch, OWN_PART + ".pt"))
    return {"data": os.path.join(scratch, "data"), OWN_PART: os.path.join(scratch, OWN_PART)}


def _parts(states: dict, record: BestRecord) -> dict:
    """The states map with the checkpointer's own part; a part of no known kind is refused by name."""
    if OWN_PART in states:
        raise ValueError(f"the states map has a part named {OWN_PART!r}, the checkpointer's own: rename it")
    for name, part in states.items():
        if not isinstance(part, (SnapshotPart, SelfSavingPart)):
            raise TypeError(f"states[{name!r}] is a {type(part).__name__}, not a checkpoint part: wrap a Stateful "
                            "in dsoft_dist.train.state.Replicated or PerRank, or give it snapshot/write/load "
                            "(or save/load) methods")
    return {**states, OWN_PART: Replicated(record)}


class Checkpointer:
    """Saves and restores a states map (see the module doc). Collective calls."""

    def __init__(self, cfg, env):
        c = cfg.checkpoint
        self.env = env
        self.root = c.dir or os.path.join(cfg.logging.output_dir, RUN_CHECKPOINTS)
        self.every, self.keep_last, self.metric = c.every_steps, c.keep_last, c.keep_best
        self.record = BestRecord()
        self.async_save = c.async_save
        self.saved_step: int | None = None  # the step of the newest save started (or resumed from)
        self.saved_at = time.monotonic()  # when that save started (the run's start before one): every_minutes
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.background_saves = 0
        self.written_step: int | None = None  # the step of the newest save written whole (or resumed from)
        self.failed_saves, self.failed_in_a_row = 0, 0  # saves a storage error stopped (_failed)
        self._record_before = (None, None)  # the best record before the save in progress
        # the saves' own collectives: a background save must not interleave with training's on WORLD
        self.group = dist.new_group(backend="gloo") if multi_rank() else None

    def folders(self) -> list[str]:
        """Complete-looking step folders, newest first (``.tmp`` folders are never candidates)."""
        return step_folders(self.root)[::-1]

    def save(self, states: dict, step: int, best_metric: float | None = None) -> str:
        """Writes step-N.tmp on every rank, hashes it, renames it to step-N and moves ``latest``; returns step-N
        (``written_step`` says whether it was written: a storage error abandons a save, see ``_write``).

        With checkpoint.async_save (and no part that saves itself) the parts' snapshots are CPU copies and
        the files are written by a background thread (its collectives on a gloo group of their own), so
        training goes on; the next save, ``wait()`` and the end of the run wait for it. A pending save's
        error is raised by the next ``wait()``.
        """
        self.wait()
        parts = _parts(states, self.record)
        name = step_folder(step)
        final, tmp = os.path.join(self.root, name), os.path.join(self.root, name + ".tmp")
        self._record_before = (self.record.best, self.record.folder)  # what _failed puts back
        problem = _attempt(lambda: _fresh_folder(tmp, parts)) if self.env.is_main else None
        problem = self._agree(problem)  # every rank waits for the folder (no background save is in flight)
        if problem is not None:
            self._failed(tmp, step, problem)
            return final
        if best_metric is not None:
            self.record.best, self.record.folder = best_metric, name
        background = self.async_save and all(isinstance(p, SnapshotPart) for p in parts.values())
        snapshots = {}
        for key, part in parts.items():  # in the map's order on every rank: the parts' collectives match
            if isinstance(part, SnapshotPart):
                snapshots[key] = part.snapshot(copy=background)
            else:  # collective, now; a storage error on a rank is agreed on as the files' is (_write)
                problem = self._agree(_attempt(lambda p=part, k=key: p.save(os.path.join(tmp, k))))
                if problem is not None:
                    self._failed(tmp, step, problem)
                    return final
        self.saved_step, self.saved_at = step, time.monotonic()
        writes = [(parts[key], os.path.join(tmp, key), snapshot) for key, snapshot in snapshots.items()]
        if background:
            self.background_saves += 1
            self._thread = threading.Thread(target=self._write_guarded, args=(writes, tmp, final, step),
                                            name=f"checkpoint-{name}")
            self._thread.start()
        else:
            self._write(writes, tmp, final, step)
        return final

    def wait(self) -> None:
        """Blocks until a background save has finished; raises its error, if it had one."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            err, self._error = self._error, None
            raise CheckpointError(f"the background checkpoint save failed: {err}") from err

    def _write_guarded(self, *args) -> None:
        try:
            self._write(*args)
        except BaseException as err:  # raised in the training thread by the next wait()
            self._error = err

    def _write(self, writes: list, tmp: str, final: str, step: int) -> None:
        """Every rank's files, then the manifest, the rename and ``latest`` (collectives on self.group).

        A storage error on any rank (a full disk, a lost mount: ``storage_error``) fails the save on every
        rank, which agree on it (``_agree``): the unfinished folder is removed, ``latest`` and the previous
        checkpoints stay as they were, and the run goes on (``_failed``); the next save is tried as usual."""
        problem = _attempt(lambda: [part.write(path, snapshot) for part, path, snapshot in writes])
        problem = self._agree(problem)  # every rank's files are in, or the save is abandoned on every rank
        if problem is None:
            files = hash_files(tmp, self.group)
            problem = self._agree(_attempt(lambda: self._finish_folder(tmp, final, step, files))
                                  if self.env.is_main else None)
        if problem is not None:
            self._failed(tmp, step, problem)
            return
        if self.failed_in_a_row and self.env.is_main:
            log.warning("checkpoint %s written: saving works again after %d failed saves", final, self.failed_in_a_row)
        self.failed_in_a_row, self.written_step = 0, step
        log.debug("checkpoint %s written", final)

    def _finish_folder(self, tmp: str, final: str, step: int, files: dict) -> None:
        """Rank 0: the manifest, the rename, ``latest`` (and ``best``), the pruning of old folders."""
        name = os.path.basename(final)
        write_manifest(tmp, step, self.env.world_size, files)
        failpoint("ckpt-write", step)  # the chaos soak's kill with the folder written, before its rename
        if os.path.isdir(final):
            shutil.rmtree(final)
        os.rename(tmp, final)
        failpoint("ckpt-rename", step)  # the chaos soak's kill after the rename, before `latest` moves
        write_text_atomic(os.path.join(self.root, "latest"), name + "\n")
        if self.record.folder == name:
            write_text_atomic(os.path.join(self.root, "best"), name + "\n")
        self._prune()

    def _agree(self, problem: str | None) -> str | None:
        """Collective on self.group: the first rank's problem (with its rank), or None when no rank has one."""
        if not multi_rank():
            return problem
        return next((f"rank {r}: {p}" for r, p in enumerate(gather_objects(problem, self.group)) if p), None)

    def _failed(self, tmp: str, step: int, problem: str) -> None:
        """A save that could not be written: its folder removed, the record and the step of the newest written
        checkpoint kept, so the next interval tries again; one warning per run of failed saves."""
        if self.env.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        self.saved_step, (self.record.best, self.record.folder) = self.written_step, self._record_before
        self.failed_saves += 1
        self.failed_in_a_row += 1
        if self.env.is_main and self.failed_in_a_row == 1:
            latest = read_pointer(self.root)
            log.warning("checkpoint %s could not be written (%s): %s stays the checkpoint a restart resumes; the "
                        "next save is tried at the next interval (checkpoint.every_steps / every_minutes). Free "
                        "space in %s or set checkpoint.dir to another folder. This is not repeated until a save "
                        "succeeds", step_folder(step), problem, latest or "no checkpoint", self.root)

    def _prune(self) -> None:
        """Keeps the newest ``keep_last`` folders and the best one; removes the rest (rank 0)."""
        keep = set(self.folders()[:self.keep_last]) | {read_pointer(self.root, "best"), read_pointer(self.root)}
        for name in self.folders():
            if name not in keep:
                shutil.rmtree(os.path.join(self.root, name), ignore_errors=True)

    def find_resume(self) -> str | None:
        """Collective: the newest folder that verifies (``latest`` first); failures are logged by name. Folders
        of later steps than it (a save killed after its rename, before ``latest`` moved; ones that failed to
        verify) are removed: the resumed run redoes those steps, and a later resume must not take them."""
        candidates = None
        if self.env.is_main:
            latest, folders = read_pointer(self.root), self.folders()
            candidates = ([latest] if latest in folders else []) + [f for f in folders if f != latest]
        for name in broadcast_object(candidates):
            problem = check_manifest(os.path.join(self.root, name))
            if problem is None:
                if self.env.is_main:
                    self._discard_after(name)
                return os.path.join(self.root, name)
            if self.env.is_main:
                log.warning("checkpoint %s is not used: %s; trying the previous one", name, problem)
        return None

    def _discard_after(self, name: str) -> None:
        """Rank 0: ``name`` made ``latest``; the step folders after it removed (and ``best`` when it named one)."""
        later = [other for other in self.folders() if other > name]
        if later:
            log.warning("checkpoint folders after %s are removed, the run redoes their steps: %s", name,
                        ", ".join(sorted(later)))
        if read_pointer(self.root) != name:
            write_text_atomic(os.path.join(self.root, "latest"), name + "\n")
        for other in later:
            shutil.rmtree(os.path.join(self.root, other), ignore_errors=True)
        if read_pointer(self.root, "best") not in (None, *self.folders()):
            os.remove(os.path.join(self.root, "best"))

    def roll_back_to(self, before: int) -> str | None:
        """Collective: the newest checkpoint of a step before ``before`` that verifies, made ``latest``, with
        every later folder removed (the abandoned stretch of a run that diverged: a restart must not resume it,
        nor a later save count it among the newest); None when there is none (nothing is changed)."""
        self.wait()
        names = [n for n in self.folders() if int(n[len(STEP_PREFIX):]) < before] if self.env.is_main else None
        target = next((n for n in broadcast_object(names) if check_manifest(os.path.join(self.root, n)) is None),
                      None)
        if target is not None and self.env.is_main:
            self._discard_after(target)
        broadcast_object(None)  # every rank waits for rank 0's changes
        return None if target is None else os.path.join(self.root, target)

    def latest_step(self) -> int | None:
        """The step of ``latest`` (rank 0 reads, every rank gets it), None without one."""
        name = read_pointer(self.root) if self.env.is_main else None
        name = broadcast_object(name)
        return int(name[len(STEP_PREFIX):]) if name else None

    def improves(self, metrics: dict) -> float | None:
        """The new best value of checkpoint.keep_best when ``metrics`` (rank 0's) improve on it, else None
        (collective: every rank gets rank 0's verdict)."""
        value = None
        if self.metric and self.env.is_main:
            if self.metric not in metrics:
                raise CheckpointError(f"checkpoint.keep_best={self.metric!r} is not a verification metric of this "
                                      f"run; it logs: {', '.join(sorted(metrics)) or 'none'}")
            value = metrics[self.metric] if self.record.improves(metrics[self.metric]) else None
        return broadcast_object(value) if self.metric else None

    def init_weights(self, states: dict, given: str) -> None:
        """checkpoint.init_from (``init_source``): every part that can (``init_from``) takes its weights from
        a backbone.pt or a checkpoint; the rest (optimizers, step, data) start fresh."""
        kind, path = init_source(given)
        if kind == "checkpoint":
            problem = check_manifest(path)
            if problem is not None:
                raise CheckpointError(f"checkpoint.init_from={given!r} cannot be used: {problem}")
        taken = [part.init_from(kind, path if kind == "backbone" else os.path.join(path, key))
                 for key, part in states.items() if hasattr(part, "init_from")]
        if self.env.is_main:
            log.info("initialized from %s: %s", path, "; ".join(taken))

    def load(self, states: dict, path: str) -> None:
        """Restores every part of ``states`` from the checkpoint ``path``, written on any number of ranks
        (each part decides what another world size means for it)."""
        problem = check_manifest(path)
        if problem is not None:
            raise CheckpointError(f"checkpoint {path} cannot be resumed: {problem}; pick another one or use "
                                  "checkpoint.resume=auto (the newest that verifies)")
        manifest = read_manifest(path)
        if manifest.get("format") not in (FORMAT, FORMAT_1):
            raise CheckpointError(f"checkpoint {path} has format {manifest.get('format')!r} (dsoft_dist "
                                  f"{manifest.get('version')}); dsoft_dist {__version__} reads {FORMAT!r} and "
                                  f"{FORMAT_1!r}: resume it with the version that wrote it, or start afresh "
                                  "(--overwrite)")
        saved_world = manifest["world_size"]
        with tempfile.TemporaryDirectory(prefix="dsoft-ckpt-") as scratch:
            paths = {key: os.path.join(path, key) for key in _parts(states, self.record)}
            if manifest["format"] == FORMAT_1:
                paths.update(_format_1_parts(path, scratch))
            notes = [part.load(paths[key], saved_world) for key, part in _parts(states, self.record).items()]
        self.saved_step = self.written_step = manifest["step"]
        if self.env.is_main:
            log.info("resumed from %s: step %d (written by %d ranks, now %d)%s", path, manifest["step"], saved_world,
                     self.env.world_size, "".join(f"; {note}" for note in notes if note))
