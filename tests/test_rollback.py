"""Divergence roll-back (dsoft_dist.train.rollback): a loss made to explode on chosen batches of the data rolls
every rank back to the newest checkpoint before the explosion; the run finishes and equals, bit for bit, a run
that skipped the same batches; the roll-backs are counted, the learning rate scaled, and the run stops when
they are used up or no checkpoint is old enough.

The explosion is keyed to the data, not to the step: a forward hook multiplies the backbone's output by
1000 while the trainer's data position (epoch, batch) is in the window, on one rank or on all, so the loss
(the plain linear softmax, whose logits grow with the embedding) jumps far past its running median and the
huge update damages the weights. The reference run trains to the checkpoint's step, pulls the window's
batches without training on them, and goes on.
"""
from __future__ import annotations

import json
import os

import pytest
import torch

from dsoft_dist.config import config_from_dict
from dsoft_dist.parallel.processes import distributed, spawn_local
from dsoft_dist.train.rollback import DivergenceGuard
from dsoft_dist.train.state import TrainState
from tests.test_train_dist import assert_same_params, results, tiny

SLOW = pytest.mark.slow(reason="spawns 2 gloo ranks")


def rollback_cfg(out, **sections) -> dict:
    """TINY with the linear softmax, a checkpoint every step and a guard that acts within 2 steps."""
    base = {"head__loss": "softmax", "schedule__steps": 14, "checkpoint__every_steps": 1,
            "checkpoint__every_minutes": 0.0, "checkpoint__keep_last": 20, "checkpoint__async_save": False,
            "divergence__steps": 2, "divergence__factor": 4.0, "divergence__window": 3}
    return tiny(out, **{**base, **sections})


def explode_on(trainer, batches: set, ranks: set | None = None) -> None:
    """The backbone's output x1000 while the data position (epoch, batch: the batch just pulled) is in
    ``batches``, on ``ranks`` (None: every rank)."""
    rank = trainer.env.rank

    def hook(module, inputs, output):
        position = (trainer.data.epoch, trainer.data.loader.batch)
        return output * 1000.0 if position in batches and (ranks is None or rank in ranks) else output

    trainer.engine.module.register_forward_hook(hook)


def _diverging_and_reference(cfg_roll: dict, cfg_ref: dict, batches: set, ranks: set | None,
                             ref_stop: int, ref_skip: int) -> None:
    """Every rank: the reference run (to ``ref_stop``, ``ref_skip`` batches pulled untrained, to the end), then
    the run that diverges on ``batches`` and rolls back."""
    from dsoft_dist.train.trainer import Trainer

    with distributed("gloo") as env:
        t = Trainer(config_from_dict(cfg_ref), env)
        try:
            t.run_steps(ref_stop)
            for _ in range(ref_skip):
                next(t.data)
            t.train()
        finally:
            t.close()
        t = Trainer(config_from_dict(cfg_roll), env)
        explode_on(t, batches, ranks)
        try:
            t.train()
        finally:
            t.close()


def losses_by_step(out) -> dict[int, list[float]]:
    """Every logged loss of each step, in the order they were logged (a rolled-back step appears twice)."""
    seen: dict[int, list[float]] = {}
    for line in open(os.path.join(out, "metrics.jsonl")):
        row = json.loads(line)
        if "loss" in row:
            seen.setdefault(row["step"], []).append(row["loss"])
    return seen


@SLOW
def test_a_loss_exploding_on_one_rank_rolls_back_and_equals_a_run_that_skipped_the_window(tmp_path):
    # batches 7 and 8 of epoch 0 are steps 7 and 8: step 7's checkpoint is written mid-streak and must not be
    # the target; the roll-back at step 8 goes to step 6 and the data goes on at batch 9
    roll, ref = rollback_cfg(tmp_path / "roll"), rollback_cfg(tmp_path / "ref")
    spawn_local(_diverging_and_reference, 2, (roll, ref, {(0, 7), (0, 8)}, {1}, 6, 2))
    a, b = results(roll), results(ref)
    assert_same_params(a, b, atol=0.0, rtol=0.0)
    rolled, reference = losses_by_step(roll["logging"]["output_dir"]), losses_by_step(ref["logging"]["output_dir"])
    assert [len(rolled[s]) for s in range(1, 15)] == [1] * 6 + [2, 2] + [1] * 6  # steps 7-8 were done twice
    assert all(rolled[s][-1] == reference[s][0] for s in range(1, 15))
    assert min(rolled[7][0], rolled[8][0]) > 4 * max(reference[s][0] for s in range(4, 7))  # the explosion
    assert a["report"]["rollbacks"] == 1 and b["report"]["rollbacks"] == 0
    root = tmp_path / "roll" / "checkpoints"
    assert (root / "latest").read_text().strip() == "step-00000014"


def _train(cfg_dict: dict, batches: set) -> dict:
    from dsoft_dist.train.trainer import Trainer

    with distributed("gloo") as env:
        t = Trainer(config_from_dict(cfg_dict), env)
        explode_on(t, batches)
        try:
            return t.train()
        finally:
            t.close()


def test_the_roll_back_discards_the_checkpoints_after_its_target_and_scales_the_learning_rate(tmp_path, caplog):
    cfg = rollback_cfg(tmp_path / "run", parallel__nproc=1, schedule__steps=10, divergence__lr_scale=0.5,
                       checkpoint__every_steps=1)
    seen = {}

    def at_roll_back(trainer_cls):
        original = trainer_cls._roll_back

        def spy(self):
            original(self)
            seen["folders"] = sorted(os.listdir(self.checkpointer.root))
        return spy

    from dsoft_dist.train.trainer import Trainer

    original = Trainer._roll_back
    Trainer._roll_back = at_roll_back(Trainer)
    try:
        with caplog.at_level("WARNING"):
            summary = _train(cfg, {(0, 5), (0, 6)})
    finally:
        Trainer._roll_back = original
    # steps 5 and 6 diverged: back to step 4; step 5's checkpoint (mid-streak) was removed
    assert seen["folders"] == ["latest"] + [f"step-{s:08d}" for s in range(1, 5)]
    assert "the loss diverged at steps 5-6" in caplog.text and "rolled back to the checkpoint of step 4" in \
        caplog.text and "the data of steps 5-6 is skipped; the learning rate is now x0.5" in caplog.text
    lrs = {r["step"]: r["lr"] for r in summary["log"]}  # the later row of a step wins
    assert lrs[4] == pytest.approx(0.2) and lrs[5] == lrs[10] == pytest.approx(0.1)
    assert summary["rollbacks"] == 1


def test_the_run_stops_when_the_roll_backs_are_used_up(tmp_path):
    cfg = rollback_cfg(tmp_path / "run", parallel__nproc=1, divergence__max_rollbacks=1)
    with pytest.raises(RuntimeError, match=r"the loss diverged at steps 5-6 .* after 1 roll-back\(s\), "
                                           r"divergence.max_rollbacks=1: the run stops"):
        _train(cfg, {(0, b) for b in range(5, 40)})  # every batch from 5 on: back to step 4, then steps 5-6 again


def test_a_divergence_before_any_checkpoint_stops_the_run(tmp_path):
    cfg = rollback_cfg(tmp_path / "run", parallel__nproc=1, checkpoint__every_steps=0)
    with pytest.raises(RuntimeError, match="diverged at steps 5-6 and no checkpoint from before step 5"):
        _train(cfg, {(0, 5), (0, 6)})


def test_off_the_loss_is_not_watched(tmp_path):
    cfg = rollback_cfg(tmp_path / "run", parallel__nproc=1, divergence__max_rollbacks=0, schedule__steps=8)
    summary = _train(cfg, {(0, 5), (0, 6)})
    assert summary["rollbacks"] == 0 and len(summary["log"]) == 8


def guard(state: TrainState, **cfg) -> DivergenceGuard:
    return DivergenceGuard(config_from_dict({"divergence": cfg}).divergence, state)


def test_the_guard_counts_a_streak_and_keeps_a_window_of_good_steps():
    state = TrainState({})
    g = guard(state, steps=2, factor=3.0, window=3)
    assert g.threshold() == float("inf")  # the factor waits for a full window
    for loss in (1.0, 2.0, 1.5):
        assert g.local(torch.tensor(loss)).tolist() == [0.0, loss] and not g.observe(0.0, loss)
    assert g.threshold() == pytest.approx(4.5)  # 3 x median(1, 2, 1.5)
    assert g.local(torch.tensor(5.0)).tolist() == [1.0, 5.0]
    assert g.local(torch.tensor(float("nan"))).tolist() == [1.0, 0.0]
    assert not g.observe(1.0, 5.0) and state.losses == [1.0, 2.0, 1.5]  # a diverged step stays out of the window
    state.step = 9
    assert g.observe(1.0, 5.0) and g.first_diverged_step() == 8
    assert not g.observe(0.0, 1.0) and state.diverged_in_a_row == 0 and state.losses == [2.0, 1.5, 1.0]
    restored = TrainState({})
    restored.load_state_dict(state.state_dict())  # the record is part of the checkpoint
    assert (restored.losses, restored.rollbacks, restored.lr_scale) == ([2.0, 1.5, 1.0], 0, 1.0)
    old = TrainState({})
    old.load_state_dict({"step": 3, "skipped": 0, "config": {}})  # a checkpoint from before the guard
    assert (old.losses, old.diverged_in_a_row, old.rollbacks, old.lr_scale) == ([], 0, 0, 1.0)
