"""The trainer's data: endless batches over epochs, a checkpointable position, the sample-key log.

    data = TrainData(cfg.data, env, keys_dir=None, group=gloo_group)   # keys_dir: logging.sample_keys' folder
    images, labels = next(data)
    state = data.state_dict()                        # collective on group: the done masks are OR-ed over ranks
    data.load_state_dict(state)                      # on the same or another world size (or batch size)

The position is world-size independent (``dsoft_dist.data.position``): on the same world and
batch size a resume replays the epoch's pipeline to the saved batch (the exact batches the run
had left); on others the samples the epoch has left are cut afresh over the new ranks, so the
epoch's samples are each trained on once, across the interrupted and the resumed run.

Bad data (``data.bad_data=skip``) is skipped and counted; a shard that becomes unreadable while the
run goes on counts the samples it lost (``dsoft_dist.data.pipeline``). ``data.max_bad_samples`` > 0
stops the run on every rank together when the bad samples of the run, summed over the ranks (the
metrics' ``bad_samples``), pass it: the trainer sums the counts in its step boundary's all-reduce and
calls ``stop_if_too_bad`` (no collective of its own until the limit is passed).
"""
from __future__ import annotations

import os

from dsoft_dist.data import build_train_loader
from dsoft_dist.data.position import count_done, from_tensor, to_tensor, union_over_ranks
from dsoft_dist.errors import BadDataError
from dsoft_dist.observability import get_logger
from dsoft_dist.parallel.comm import gather_objects
from dsoft_dist.registry import DATA_SOURCES

log = get_logger(__name__)


class TrainData:
    """Endless training batches over epochs of ``build_train_loader``, with bad-sample counters kept
    over every epoch (a finished epoch's counters are added to the running total).

    keys_dir: where each rank appends the keys of every batch it hands out, a line per batch,
    ``<step> <epoch> <key> <key> ...``, to ``rank-NNNNN.txt`` (``write_keys(step)`` after each
    optimizer step). After a restart the steps after the resumed checkpoint appear again; the
    later lines are the ones that were trained on.

    group: the gloo group ``state_dict`` ORs the done masks on (NCCL has no bitwise OR; the trainer
    passes the checkpointer's); None = the default group, which must then be gloo.
    """

    def __init__(self, data_cfg, env, keys_dir: str | None = None, group=None):
        self.cfg, self.env, self.epoch, self.group = data_cfg, env, 0, group
        self.keys_dir = keys_dir
        self._keys: list[tuple[int, list[str]]] = []  # (epoch, keys) of the batches not written yet
        self.bad_done = 0  # bad samples of finished epochs (this rank)
        self.shards_done: dict[str, int] = {}  # damaged shards of finished epochs: samples lost (this process)
        # the start-up check (every local shard exists); later epochs skip a shard that vanished, as bad data
        DATA_SOURCES.get(data_cfg.source).check(data_cfg)
        self.loader = self._build(0)
        self._it = self._batches()

    def _build(self, epoch: int, start_batch: int = 0, done=None):
        loader = build_train_loader(self.cfg, self.env.rank, self.env.world_size, epoch, start_batch=start_batch,
                                    done=done, keys=self.keys_dir is not None)
        loader.bad_before = self.bad_done
        return loader

    def _batches(self):
        while True:
            yield from self.loader
            counters = self.loader.counters
            self.bad_done += counters["bad_total"]
            for url, lost in counters["bad_shards"].items():
                self.shards_done[url] = self.shards_done.get(url, 0) + lost
            self.epoch += 1
            self.loader = self._build(self.epoch)

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self._it)
        if self.keys_dir is not None:
            self._keys.append((self.epoch, self.loader.batch_keys.pop()))
        return batch

    def stop_if_too_bad(self, total: int) -> None:
        """Every rank at the same step, with ``total`` the run's bad samples summed over the ranks: raises
        BadDataError on every rank when it passes data.max_bad_samples (0 = no limit); the message names the
        damaged shards (a gather, only then)."""
        limit = self.cfg.max_bad_samples
        if not limit or total <= limit:
            return
        shards = {url: lost for part in gather_objects(self._damaged_shards()) for url, lost in part.items()}
        named = ", ".join(f"{url} ({lost} samples lost)" for url, lost in sorted(shards.items())[:5])
        named += f" and {len(shards) - 5} more" if len(shards) > 5 else ""
        raise BadDataError(
            f"data.max_bad_samples={limit}: {total} samples of this run were skipped as bad data (summed over "
            f"{self.env.world_size} rank(s); the metrics' bad_samples), more than the limit, so the run stops in "
            f"epoch {self.epoch}. Damaged shards: {named or 'none (single bad samples: see the warnings above)'}. "
            "Restore or replace them (dsoft data verify DIR checks shards against their manifest) and run the same "
            "command to resume from the last checkpoint, or raise data.max_bad_samples (0 = no limit)")

    def _damaged_shards(self) -> dict[str, int]:
        """{url: samples lost} of the shards this process found damaged, over the epochs it ran."""
        shards = dict(self.shards_done)
        for url, lost in self.loader.counters["bad_shards"].items():
            shards[url] = shards.get(url, 0) + lost
        return shards

    def write_keys(self, step: int) -> None:
        """Appends the keys of the batches handed out since the last call (logging.sample_keys)."""
        if self.keys_dir is None or not self._keys:
            return
        os.makedirs(self.keys_dir, exist_ok=True)
        with open(os.path.join(self.keys_dir, f"rank-{self.env.rank:05d}.txt"), "a", encoding="utf-8") as fh:
            fh.writelines(f"{step} {epoch} {' '.join(keys)}\n" for epoch, keys in self._keys)
        self._keys.clear()

    def close(self) -> None:
        """Ends the epoch in progress: its DataLoader workers exit now, not when the iterator is collected
        (an interrupted epoch's workers otherwise outlive the run, and at interpreter exit torch waits
        up to 5 s for each before it kills it)."""
        self._it.close()
        self._it = self._batches()

    @property
    def bad_total(self) -> int:
        """Bad samples this rank skipped so far, over every epoch."""
        return self.bad_done + self.loader.counters["bad_total"]

    def state_dict(self) -> dict:
        """Collective on ``group``: the position (the loader's, with its batch size and world size), with the
        epoch's consumed mask OR-ed over ranks and every rank's bad samples of finished epochs
        (``bad_done_by_rank``; ``bad_done`` is this rank's, as checkpoints before it had)."""
        state = {**self.loader.state_dict(), "epoch": self.epoch, "bad_done": self.bad_done,
                 "bad_done_by_rank": gather_objects(int(self.bad_done), self.group)}
        if self.loader.consumed is not None:
            state["consumed"] = to_tensor(union_over_ranks(self.loader.consumed, self.group))
        return state

    def load_state_dict(self, state: dict) -> None:
        """Continues at a saved position: the same world and batch size replay the epoch to the saved
        batch; others read exactly the samples the epoch has left (see the module doc). A position
        without a consumed mask (shards without a manifest) continues only approximately, and says so."""
        # the saved key "step" is the loader's batch (TrainLoader.state_dict keeps it for old checkpoints)
        epoch, batches, saved_batch_size = state["epoch"], state["step"], state["batch_size"]
        same = state["world_size"] == self.env.world_size and saved_batch_size == self.cfg.batch_size
        self.epoch, self.bad_done = epoch, self._restored_bad_done(state, state["world_size"] == self.env.world_size)
        num_samples = self._build(epoch).num_samples
        if same:
            done = None if state.get("done") is None else from_tensor(state["done"], num_samples)
            self.loader = self._build(epoch, start_batch=min(batches, len(self._build(epoch, done=done))), done=done)
        elif state.get("consumed") is not None and num_samples is not None:
            done = from_tensor(state["consumed"], num_samples)
            self.loader = self._build(epoch, done=done)
            if self.env.is_main:
                log.info("data position: epoch %d has %d of %d samples left after %d ranks x %d; they are cut over "
                         "%d ranks x %d: %d batches to the end of the epoch", epoch, num_samples - count_done(done),
                         num_samples, state["world_size"], saved_batch_size, self.env.world_size,
                         self.cfg.batch_size, len(self.loader))
        else:
            self.loader = self._approximate(state, saved_batch_size)
        self._it = self._batches()

    def _restored_bad_done(self, state: dict, same_world: bool) -> int:
        """This rank's bad samples of the finished epochs: its own count on the world size that saved them;
        on another, their sum on rank 0 (and 0 elsewhere), so the run's total, summed over ranks, holds. The
        epoch in progress is not carried: its bad samples are read again (they are never marked done)."""
        by_rank = state.get("bad_done_by_rank")
        if by_rank is None:  # a checkpoint before the per-rank counts: rank 0's count was saved for every rank
            return int(state.get("bad_done", 0))
        if same_world:
            return int(by_rank[self.env.rank])
        return int(sum(by_rank)) if self.env.rank == 0 else 0

    def _approximate(self, state: dict, saved_batch_size: int):
        """The same number of samples per rank's new share, in each rank's own part of the epoch (the saved
        position's ``step`` key is the loader's ``batch``: the batches it handed out in the epoch)."""
        epoch, consumed = state["epoch"], state["step"] * saved_batch_size * state["world_size"]
        start = consumed // (self.cfg.batch_size * self.env.world_size)
        if self.env.is_main:
            log.warning("data position: %d samples of epoch %d were consumed by %d ranks x %d; continuing at batch "
                        "%d of %d ranks x %d. The rest of this epoch is approximate: these shards have no manifest, "
                        "so their samples have no ids and which ones repeat or are skipped depends on the layouts "
                        "(set data.manifest for an exact resume)", consumed, epoch, state["world_size"],
                        saved_batch_size, start, self.env.world_size, self.cfg.batch_size)
        return self._build(epoch, start_batch=min(start, len(self._build(epoch))))

