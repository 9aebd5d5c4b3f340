"""Run checkpoints: one folder per step, written aside and renamed, proven whole by a manifest.

    ckpt = Checkpointer(cfg, env)            # under checkpoint.dir (default <output_dir>/checkpoints)
    ckpt.save(trainer)                       # collective
    path = ckpt.find_resume()                # collective: the newest checkpoint that verifies, or None
    ckpt.load(trainer, path)                 # collective: the whole run state, on any number of ranks

Layout (``checkpoint.dir`` must be one folder every rank can read and write, e.g. a shared file
system on a cluster):

    step-00001234/
      trainer.pt               step, skipped steps, best metric, data position, config, version (rank 0)
      backbone.pt              the backbone's plain state dict (rank 0)
      engine/                  the backbone optimizer and loss scale (DDP: one file; DeepSpeed: its own form)
      head/                    the head and its optimizer by class range (``save_head_checkpoint``)
      rng/rank-00000.pt        each rank's python, numpy, torch and CUDA RNG states
      manifest.json            every file above with its size and sha256, written last
    latest                     the newest complete folder's name; moves only after every rank finished
    best                       the folder with the best ``checkpoint.keep_best`` metric

A folder is written as ``step-N.tmp`` and renamed by rank 0 after every rank's files are in and
hashed, so a crash mid-write leaves a ``.tmp`` folder that is never loaded. Everything is read
with ``torch.load(weights_only=True)``: a file carrying pickled code is refused, nothing runs.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import threading
import time

import numpy as np
import torch
import torch.distributed as dist

from dsoft_dist.config import config_to_dict
from dsoft_dist.errors import CheckpointError
from dsoft_dist.head import load_head_checkpoint
from dsoft_dist.head.state import head_snapshot, write_head_meta, write_head_piece
from dsoft_dist.observability import get_logger
from dsoft_dist.parallel import group_rank_size
from dsoft_dist.parallel.comm import broadcast_object
from dsoft_dist.utils import __version__, atomic_save, load_weights_only, sha256_file, write_text_atomic

log = get_logger(__name__)

FORMAT = "dsoft_dist.run_checkpoint/1"
MANIFEST = "manifest.json"
RUN_CHECKPOINTS = "checkpoints"  # the checkpoint root inside a run folder (checkpoint.dir's default)
STEP_PREFIX = "step-"


def step_folder(step: int) -> str:
    return f"{STEP_PREFIX}{step:08d}"


def _multi() -> bool:
    return group_rank_size()[1] > 1


def _barrier(group=None) -> None:
    if _multi():
        dist.barrier(group=group)


# ----------------------------------------------------------------------------- RNG states as tensors

def rng_state() -> dict:
    """This process's python, numpy, torch (and its CUDA device's) RNG states, as tensors and plain values."""
    version, words, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": {"version": version, "words": torch.tensor(words, dtype=torch.int64), "gauss": gauss},
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached": float(cached)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        # this rank's device only: get_rng_state_all would create a context on every GPU of the node
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    py, npy = state["python"], state["numpy"]
    random.setstate((py["version"], tuple(int(w) for w in py["words"].tolist()), py["gauss"]))
    np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def reseed(seed: int, step: int, rank: int) -> None:
    """Fresh RNG states from (seed, step, rank): the resume path when the world size changed."""
    value = (seed * 1_000_003 + step * 7919 + rank) % (2 ** 31)
    random.seed(value)
    np.random.seed(value)
    torch.manual_seed(value)


# ----------------------------------------------------------------------------- manifest

def _files(folder: str) -> list[str]:
    out = []
    for root, _, names in os.walk(folder):
        for name in names:
            if name != MANIFEST and ".tmp." not in name:
                out.append(os.path.relpath(os.path.join(root, name), folder))
    return sorted(out)


def _hash_share(folder: str, names: list[str], group=None) -> dict:
    """{name: {size, sha256}} for this rank's share of ``names`` (ranks hash in parallel)."""
    rank, world = (dist.get_rank(group), dist.get_world_size(group)) if _multi() else (0, 1)
    return {n: {"size": os.path.getsize(os.path.join(folder, n)), "sha256": sha256_file(os.path.join(folder, n))}
            for n in names[rank::world]}


def _gather_dicts(part: dict, group=None) -> dict:
    if not _multi():
        return part
    parts = [None] * dist.get_world_size(group)
    dist.all_gather_object(parts, part, group=group)
    return {k: v for p in parts for k, v in p.items()}


def verify(folder: str) -> str | None:
    """Collective: None when every file of the manifest is there with its size and sha256, else why not."""
    problem = None
    manifest_path = os.path.join(folder, MANIFEST)
    if not os.path.isdir(folder):
        problem = f"{folder} does not exist"
    elif not os.path.isfile(manifest_path):
        problem = f"{manifest_path} is missing (the checkpoint was not finished)"
    else:
        try:
            with open(manifest_path, encoding="utf-8") as fh:
                files = json.load(fh)["files"]
        except (OSError, ValueError, KeyError) as err:
            problem = f"{manifest_path} is unreadable ({err})"
    if problem is None:
        names = sorted(files)
        rank, world = (dist.get_rank(), dist.get_world_size()) if _multi() else (0, 1)
        for name in names[rank::world]:
            path, want = os.path.join(folder, name), files[name]
            if not os.path.isfile(path):
                problem = f"{path} is missing"
            elif os.path.getsize(path) != want["size"]:
                problem = f"{path} has {os.path.getsize(path)} bytes, the manifest says {want['size']}"
            elif sha256_file(path) != want["sha256"]:
                problem = f"{path} does not match its sha256 in the manifest (corrupt or truncated)"
            if problem:
                break
    problems = [problem]
    if _multi():
        problems = [None] * dist.get_world_size()
        dist.all_gather_object(problems, problem)
    return next((p for p in problems if p), None)


def read_pointer(root: str, name: str = "latest") -> str | None:
    """The folder name a pointer file (``latest``, ``best``) under ``root`` holds, or None."""
    path = os.path.join(root, name)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as fh:
        return fh.read().strip() or None


# ----------------------------------------------------------------------------- the checkpointer

class Checkpointer:
    """Saves and restores the whole run state of a Trainer (see the module doc). Collective calls."""

    def __init__(self, cfg, env):
        c = cfg.checkpoint
        self.cfg, self.env = cfg, env
        self.root = c.dir or os.path.join(cfg.logging.output_dir, RUN_CHECKPOINTS)
        self.every, self.keep_last, self.metric = c.every_steps, c.keep_last, c.keep_best
        self.best: float | None = None
        self.best_folder: str | None = None
        self.async_save = c.async_save
        self.saved_step: int | None = None  # the step of the newest save started (or resumed from)
        self.saved_at = time.monotonic()  # when that save started (the run's start before one): every_minutes
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.background_saves = 0
        # the saves' own collectives: a background save must not interleave with training's on WORLD
        self.group = dist.new_group(backend="gloo") if _multi() else None

    def _pointer(self, name: str) -> str | None:
        return read_pointer(self.root, name)

    def folders(self) -> list[str]:
        """Complete-looking step folders, newest first (``.tmp`` folders are never candidates)."""
        return step_folders(self.root)[::-1]

    def save(self, trainer, best_metric: float | None = None) -> str:
        """Writes step-N.tmp on every rank, hashes it, renames it to step-N and moves ``latest``.

        With checkpoint.async_save the state is copied to CPU memory here and the files are written
        by a background thread (its collectives on a gloo group of their own), so training goes on;
        the next save, ``wait()`` and the end of the run wait for it. A pending save's error is
        raised by the next ``wait()``.
        """
        self.wait()
        name = step_folder(trainer.step)
        final, tmp = os.path.join(self.root, name), os.path.join(self.root, name + ".tmp")
        if self.env.is_main:
            shutil.rmtree(tmp, ignore_errors=True)  # a torn write of an earlier attempt
            os.makedirs(tmp)
        _barrier()
        if best_metric is not None:
            self.best, self.best_folder = best_metric, name
        background = self.async_save and trainer.engine.snapshots_state
        data = trainer.data.state_dict(self.group)  # collective: the epoch's done samples over every rank
        snapshot = {"trainer": self._trainer_state(trainer, data) if self.env.is_main else None,
                    "backbone": _plain_state(trainer.engine.module) if self.env.is_main else None,
                    "engine": trainer.engine.state_snapshot(copy=background),
                    "head": head_snapshot(trainer.head, trainer.head_optimizer, copy=background),
                    "rng": rng_state()}
        if snapshot["engine"] is None:  # DeepSpeed writes its own form, collectively, now
            trainer.engine.save_state(os.path.join(tmp, "engine"))
        self.saved_step, self.saved_at = trainer.step, time.monotonic()
        if background:
            self.background_saves += 1
            self._thread = threading.Thread(target=self._write_guarded, args=(snapshot, tmp, final, name),
                                            name=f"checkpoint-{name}")
            self._thread.start()
        else:
            self._write(snapshot, tmp, final, name)
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

    def _write(self, snapshot: dict, tmp: str, final: str, name: str) -> None:
        """Every rank's files, then the manifest, the rename and ``latest`` (collectives on self.group)."""
        if self.env.is_main:
            atomic_save(snapshot["trainer"], os.path.join(tmp, "trainer.pt"))
            atomic_save(snapshot["backbone"], os.path.join(tmp, "backbone.pt"))
        engine = snapshot["engine"]
        if engine is not None and engine["payload"] is not None:
            atomic_save(engine["payload"], os.path.join(tmp, "engine", engine["file"]))
        write_head_piece(os.path.join(tmp, "head"), snapshot["head"])
        write_head_meta(os.path.join(tmp, "head"), snapshot["head"])
        atomic_save(snapshot["rng"], os.path.join(tmp, "rng", f"rank-{self.env.rank:05d}.pt"))
        _barrier(self.group)  # every rank's files are in
        files = _gather_dicts(_hash_share(tmp, _files(tmp), self.group), self.group)
        if self.env.is_main:
            step = int(name[len(STEP_PREFIX):])
            manifest = {"format": FORMAT, "step": step, "world_size": self.env.world_size, "version": __version__,
                        "files": files}
            write_text_atomic(os.path.join(tmp, MANIFEST), json.dumps(manifest, indent=1))
            if os.path.isdir(final):
                shutil.rmtree(final)
            os.rename(tmp, final)
            write_text_atomic(os.path.join(self.root, "latest"), name + "\n")
            if self.best_folder == name:
                write_text_atomic(os.path.join(self.root, "best"), name + "\n")
            self._prune()
        _barrier(self.group)
        log.debug("checkpoint %s written", final)

    def _trainer_state(self, trainer, data: dict) -> dict:
        return {"format": FORMAT, "version": __version__, "step": trainer.step, "skipped": trainer.skipped,
                "world_size": self.env.world_size, "data": data,
                "batch_size": self.cfg.data.batch_size, "best": self.best, "best_folder": self.best_folder,
                "config": config_to_dict(self.cfg)}

    def _prune(self) -> None:
        """Keeps the newest ``keep_last`` folders and the best one; removes the rest (rank 0)."""
        keep = set(self.folders()[:self.keep_last]) | {self._pointer("best"), self._pointer("latest")}
        for name in self.folders():
            if name not in keep:
                shutil.rmtree(os.path.join(self.root, name), ignore_errors=True)

    def find_resume(self) -> str | None:
        """Collective: the newest folder that verifies (``latest`` first); failures are logged by name."""
        candidates = None
        if self.env.is_main:
            latest, folders = self._pointer("latest"), self.folders()
            candidates = ([latest] if latest in folders else []) + [f for f in folders if f != latest]
        for name in broadcast_object(candidates):
            problem = verify(os.path.join(self.root, name))
            if problem is None:
                return os.path.join(self.root, name)
            if self.env.is_main:
                log.warning("checkpoint %s is not used: %s; trying the previous one", name, problem)
        return None

    def latest_step(self) -> int | None:
        """The step of ``latest`` (rank 0 reads, every rank gets it), None without one."""
        name = self._pointer("latest") if self.env.is_main else None
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
            value = metrics[self.metric] if _improves_on(metrics[self.metric], self.best) else None
        return broadcast_object(value) if self.metric else None

    def init_weights(self, trainer, given: str) -> None:
        """checkpoint.init_from (``init_source``): the backbone's weights, and from a checkpoint the head's when
        the class count matches (a different count keeps the fresh head, and says so). Optimizers, step and
        data start fresh."""
        kind, path = init_source(given)
        if kind == "backbone":
            from dsoft_dist.models import read_backbone_file

            state = read_backbone_file(path)["state_dict"]
            try:
                trainer.engine.module.load_state_dict(state)
            except RuntimeError as err:
                raise CheckpointError(f"checkpoint.init_from={given!r}: its weights do not fit model "
                                      f"{self.cfg.model.name} of this config ({err})") from err
            if self.env.is_main:
                log.info("initialized from %s: backbone weights; the head is new", path)
            return
        problem = verify(path)
        if problem is not None:
            raise CheckpointError(f"checkpoint.init_from={given!r} cannot be used: {problem}")
        trainer.engine.module.load_state_dict(load_weights_only(os.path.join(path, "backbone.pt")))
        with open(os.path.join(path, "head", "meta.json"), encoding="utf-8") as fh:
            saved_classes = json.load(fh)["num_classes"]
        if saved_classes == trainer.head.num_classes:
            load_head_checkpoint(os.path.join(path, "head"), trainer.head)
            trainer.head.step = 0
        if self.env.is_main:
            log.info("initialized from %s: backbone weights%s", path, " and head weights"
                     if saved_classes == trainer.head.num_classes else
                     f"; the head is new: the checkpoint has {saved_classes} classes, this run "
                     f"{trainer.head.num_classes}")

    def load(self, trainer, path: str) -> None:
        """Restores the run state of ``path`` into ``trainer`` (any world size; see load_run_state)."""
        problem = verify(path)
        if problem is not None:
            raise CheckpointError(f"checkpoint {path} cannot be resumed: {problem}; pick another one or use "
                                  "checkpoint.resume=auto (the newest that verifies)")
        state = load_weights_only(os.path.join(path, "trainer.pt"))
        same_world = state["world_size"] == self.env.world_size
        trainer.engine.module.load_state_dict(load_weights_only(os.path.join(path, "backbone.pt")))
        trainer.engine.load_state(os.path.join(path, "engine"), same_world)
        load_head_checkpoint(os.path.join(path, "head"), trainer.head, trainer.head_optimizer)
        trainer.step, trainer.skipped = state["step"], state["skipped"]
        self.saved_step = trainer.step
        self.best, self.best_folder = state["best"], state["best_folder"]
        trainer.data.load_state_dict(state["data"], state["batch_size"])
        rng_file = os.path.join(path, "rng", f"rank-{self.env.rank:05d}.pt")
        if same_world:
            set_rng_state(load_weights_only(rng_file))
        else:
            reseed(self.cfg.seed, trainer.step, self.env.rank)
        if self.env.is_main:
            log.info("resumed from %s: step %d (written by %d ranks, now %d)%s", path, trainer.step,
                     state["world_size"], self.env.world_size,
                     "" if same_world else "; RNG states re-seeded from (seed, step, rank)")


def step_folders(root: str) -> list[str]:
    """The complete-looking step folders under a checkpoint root, oldest first (``.tmp`` ones are unfinished)."""
    if not os.path.isdir(root):
        return []
    return sorted(n for n in os.listdir(root) if n.startswith(STEP_PREFIX) and not n.endswith(".tmp")
                  and os.path.isdir(os.path.join(root, n)))


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


def _improves_on(value: float, best: float | None) -> bool:
    return best is None or value > best


def _plain_state(module) -> dict:
    """The backbone's state dict as CPU fp32 tensors (the same for DDP and DeepSpeed)."""
    return {k: (v.detach().float() if v.is_floating_point() else v.detach()).cpu().clone()
            for k, v in module.state_dict().items()}
