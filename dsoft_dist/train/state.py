"""The run state as named parts: what each part must implement to be checkpointed, and the trainer's own parts.

    states = {"trainer": Replicated(TrainState(config)),         # -> trainer.pt (rank 0 writes)
              "backbone": BackboneWeights(module, "mlp"),         # -> backbone.pt
              "engine": engine,                                   # -> engine/ (the engine's own layout)
              "head": HeadState(head, head_optimizer),            # -> head/ (a piece per class range)
              "data": Replicated(data),                           # -> data.pt
              "rng": PerRank(RngStates(seed, rank, train_state))} # -> rng/rank-NNNNN.pt
    checkpointer.save(states, step)                               # dsoft_dist.train.checkpoint

A part is **Stateful** when it has ``state_dict()`` / ``load_state_dict(state)``. The checkpointer
does not take a Stateful as it is: how its state lies on disk is declared by one of the two
wrappers here (the layouts every simple part needs), or by the part itself:

- ``Replicated(part)``: every rank holds the same state. Every rank calls ``state_dict()`` (so it
  may hold a collective: the data's done masks are OR-ed over the ranks), rank 0 writes
  ``<name>.pt``, every rank loads it, on any world size.
- ``PerRank(part)``: each rank holds its own. Each writes ``<name>/rank-NNNNN.pt``; on the world
  size that wrote it each rank loads its own file, on another ``load_state_dict(None)`` (the
  part starts afresh its own way: the RNG states re-seed from (seed, step, rank)).
- a part that lays out its own files is a **SnapshotPart** (``snapshot`` / ``write`` / ``load``:
  the head's piece per class range, ``BackboneWeights``, the DDP engine) or a **SelfSavingPart**
  (``save`` / ``load``: DeepSpeed, whose partitions only DeepSpeed's collective save can write).

``path`` below is ``step-N/<name>``: a part writes ``path + ".pt"``, or files under the folder
``path``. A SnapshotPart's state is taken in the training thread (``snapshot(copy=True)`` copies
it to CPU memory), and written later, possibly by the checkpointer's background thread, so
``write`` must not use the training's process group. A SelfSavingPart writes at once, in the
training thread; a save that holds one is synchronous. A part may also take the weights of
``checkpoint.init_from``: ``init_from(kind, path) -> str`` (what it took, for the log).
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn

from dsoft_dist.errors import CheckpointError
from dsoft_dist.parallel import group_rank_size
from dsoft_dist.utils import atomic_save, cpu_copy, load_weights_only


@runtime_checkable
class Stateful(Protocol):
    """A part whose state is a plain dict (tensors, numbers, strings, containers of them)."""

    def state_dict(self) -> dict:
        """The state, safe to torch.save and to load weights-only."""

    def load_state_dict(self, state) -> None:
        """Restores a state ``state_dict`` returned."""


@runtime_checkable
class SnapshotPart(Protocol):
    """A part that hands its state over for the checkpointer to write, now or in the background."""

    def snapshot(self, copy: bool) -> Any:
        """What this rank writes, taken in the training thread on every rank (collectives allowed);
        copy=True: CPU copies that training cannot change (a background save)."""

    def write(self, path: str, snapshot: Any) -> None:
        """Writes this rank's files of ``snapshot`` at ``path`` (no collective: it may run in the background)."""

    def load(self, path: str, saved_world_size: int) -> str | None:
        """Collective: restores the state written at ``path`` by ``saved_world_size`` ranks; returns a
        note for the resume's log line, or None."""


@runtime_checkable
class SelfSavingPart(Protocol):
    """A part that writes its own files, collectively, in the training thread (DeepSpeed's partitions)."""

    def save(self, path: str) -> None:
        """Collective: writes every rank's files under the folder ``path``."""

    def load(self, path: str, saved_world_size: int) -> str | None:
        """Collective: restores the state written at ``path`` (see SnapshotPart.load)."""


class Replicated:
    """A Stateful every rank holds the same state of: rank 0 writes ``<name>.pt``; every rank loads it."""

    def __init__(self, part: Stateful):
        self.part = part

    def snapshot(self, copy: bool) -> Any:
        """Rank 0's ``state_dict()`` (a CPU copy with copy=True), None on the others, which call it too."""
        state = self.part.state_dict()  # on every rank: it may be collective
        if group_rank_size()[0] != 0:
            return None
        return cpu_copy(state) if copy else state

    def write(self, path: str, snapshot: Any) -> None:
        """Rank 0 writes ``path.pt``."""
        if snapshot is not None:
            atomic_save(snapshot, path + ".pt")

    def load(self, path: str, saved_world_size: int) -> str | None:
        """Every rank loads ``path.pt``, whatever the world size that wrote it; passes on the part's note."""
        return self.part.load_state_dict(load_weights_only(path + ".pt"))


class PerRank:
    """A Stateful each rank holds its own state of: ``<name>/rank-NNNNN.pt``; on another world size the part's
    ``load_state_dict(None)`` (it starts afresh its own way), whose return value, a note for the resume's log
    line or None, ``load`` passes on."""

    def __init__(self, part: Stateful):
        self.part = part

    def snapshot(self, copy: bool) -> Any:
        """This rank's ``state_dict()`` (a CPU copy with copy=True)."""
        state = self.part.state_dict()
        return cpu_copy(state) if copy else state

    def write(self, path: str, snapshot: Any) -> None:
        """This rank writes ``path/rank-NNNNN.pt``."""
        atomic_save(snapshot, os.path.join(path, f"rank-{group_rank_size()[0]:05d}.pt"))

    def load(self, path: str, saved_world_size: int) -> str | None:
        """This rank's own file on the world size that wrote them, else ``load_state_dict(None)``."""
        rank, world = group_rank_size()
        if saved_world_size != world:
            return self.part.load_state_dict(None)
        return self.part.load_state_dict(load_weights_only(os.path.join(path, f"rank-{rank:05d}.pt")))


@dataclass
class TrainState:
    """The trainer's own counters: ``step`` (optimizer steps done) and ``skipped`` (those that changed nothing:
    non-finite gradients). ``skipped_in_a_row`` is not saved: a resumed run starts a new streak. The divergence
    guard's record (``dsoft_dist.train.rollback``) is saved: the running window of losses, the streak of
    diverged steps, the roll-backs done and the learning-rate factor they left. ``config`` (the run's config as
    a dict) is written beside the counters, the record of what the run was (``dsoft ckpt export`` builds the
    backbone from it; the run-folder check compares it); a load keeps the run's own."""

    config: dict
    step: int = 0
    skipped: int = 0
    skipped_in_a_row: int = 0
    losses: list = field(default_factory=list)  # mean losses of the last divergence.window good steps
    diverged_in_a_row: int = 0
    rollbacks: int = 0
    lr_scale: float = 1.0

    def count(self, applied: bool) -> None:
        """One more optimizer step; ``applied`` False when it was skipped."""
        self.step += 1
        self.skipped += not applied
        self.skipped_in_a_row = 0 if applied else self.skipped_in_a_row + 1

    def state_dict(self) -> dict:
        """{"step", "skipped", "config"} and the divergence guard's record."""
        return {"step": self.step, "skipped": self.skipped, "config": self.config, "losses": list(self.losses),
                "diverged_in_a_row": self.diverged_in_a_row, "rollbacks": self.rollbacks, "lr_scale": self.lr_scale}

    def load_state_dict(self, state: dict) -> str | None:
        """The saved counters (a checkpoint from before roll-backs existed: an empty record); the streak of
        skipped steps starts afresh. Returns the note of the config keys that changed since (or None)."""
        from dsoft_dist.train.runfolder import config_changes

        self.step, self.skipped, self.skipped_in_a_row = int(state["step"]), int(state["skipped"]), 0
        self.losses = [float(v) for v in state.get("losses", [])]
        self.diverged_in_a_row = int(state.get("diverged_in_a_row", 0))
        self.rollbacks, self.lr_scale = int(state.get("rollbacks", 0)), float(state.get("lr_scale", 1.0))
        return config_changes(state["config"], self.config) if "config" in state else None


class BackboneWeights:
    """The backbone's weights as a SnapshotPart: rank 0 writes ``backbone.pt``, its plain state dict in CPU fp32
    (the same under DDP and DeepSpeed, whose bf16 weights are widened); every rank loads it."""

    def __init__(self, module: nn.Module, model_name: str):
        self.module, self.model_name = module, model_name

    def snapshot(self, copy: bool) -> dict | None:
        """Rank 0's CPU fp32 copy (always a copy: the file's form), None on the other ranks."""
        if group_rank_size()[0] != 0:
            return None
        return {k: (v.detach().float() if v.is_floating_point() else v.detach()).cpu().clone()
                for k, v in self.module.state_dict().items()}

    def write(self, path: str, snapshot: dict | None) -> None:
        """Rank 0 writes ``path.pt`` (backbone.pt)."""
        if snapshot is not None:
            atomic_save(snapshot, path + ".pt")

    def load(self, path: str, saved_world_size: int) -> None:
        """Every rank loads ``path.pt`` into the module (DeepSpeed's bf16 weights narrow it again)."""
        self.module.load_state_dict(load_weights_only(path + ".pt"))

    def init_from(self, kind: str, path: str) -> str:
        """checkpoint.init_from: the weights of a backbone.pt file (kind "backbone") or of a checkpoint."""
        if kind == "checkpoint":
            self.load(path, 0)
            return "backbone weights"
        from dsoft_dist.models import read_backbone_file

        try:
            self.module.load_state_dict(read_backbone_file(path)["state_dict"])
        except RuntimeError as err:
            raise CheckpointError(f"checkpoint.init_from={path!r}: its weights do not fit model {self.model_name} "
                                  f"of this config ({err})") from err
        return "backbone weights"


# ----------------------------------------------------------------------------- RNG states

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
    """Restores what ``rng_state`` returned."""
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


class RngStates:
    """This rank's RNG states (wrap it in PerRank); without states of its own (another world size) it re-seeds
    from (seed, the loaded step of ``train``, rank), so ``train`` must load before it."""

    def __init__(self, seed: int, rank: int, train: TrainState):
        self.seed, self.rank, self.train = seed, rank, train

    def state_dict(self) -> dict:
        """``rng_state()``."""
        return rng_state()

    def load_state_dict(self, state: dict | None) -> str | None:
        """Restores ``state``; None (another world size) re-seeds and says so, for the resume's log line."""
        if state is not None:
            set_rng_state(state)
            return None
        reseed(self.seed, self.train.step, self.rank)
        return "RNG states re-seeded from (seed, step, rank)"
