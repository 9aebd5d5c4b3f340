"""Hung-rank detection (dsoft_dist/parallel/watchdog.py): the rule on marks and a clock, two watchdog threads of
one process on a shared in-memory store, the trainer's marks, the config key; and a real hang: rank 1 of two
gloo ranks under torchrun --max-restarts 1 blocks forever in its data, both ranks exit naming it, the restart
resumes from the checkpoint and the run ends with the weights of an undisturbed run."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch.distributed as dist
import yaml

from dsoft_dist.config import config_from_dict, load_config
from dsoft_dist.errors import HUNG_EXIT_CODE, ConfigError
from dsoft_dist.parallel import watchdog
from dsoft_dist.parallel.watchdog import PHASES, Watchdog, describe_hang, where
from tests.test_train_dist import assert_same_params, results, run, tiny

DATA, HEAD, SAVE, START = (list(PHASES).index(p) for p in ("data", "head", "save", "start"))


def test_the_rank_behind_is_named_with_its_last_step_and_phase():
    text = describe_hang([(4, 0, HEAD), (3, 0, DATA), (4, 0, HEAD)])
    assert text.startswith("rank 1 is behind, with step 3 finished, in 'data' (waiting for its next batch) of step 4")
    assert "ranks 0, 2 with step 4 finished, in 'head'" in text and "waiting for it:" in text
    several = describe_hang([(5, 0, DATA), (4, 1, SAVE), (4, 1, SAVE), (5, 0, DATA), (4, 1, SAVE)])
    assert several.startswith("ranks 1-2, 4 are behind, with step 4 finished, in 'save' (a checkpoint save) after it")
    assert "waiting for them: ranks 0, 3" in several


def test_equal_marks_mean_no_single_rank_is_behind_and_a_missing_mark_is_behind():
    assert describe_hang([(7, 0, SAVE)] * 3).startswith("no single rank is behind: every rank is at the same place, "
                                                        "with step 7 finished, in 'save'")
    text = describe_hang([(2, 0, HEAD), None])
    assert text.startswith("rank 1 is behind, without a mark: it stopped before its watchdog started")


def test_marks_order_by_step_micro_batch_and_phase():
    w = Watchdog(0, 1, 0.0)
    seen = [w._mark]
    w.mark("verify", 0)
    seen.append(w._mark)
    for step in (0, 1):
        w.mark("save", step)
        seen.append(w._mark)
        for micro in (0, 1):
            for phase in ("data", "forward", "head", "backward"):
                w.mark(phase, micro=micro)
                seen.append(w._mark)
        w.mark("update", micro=1)
        seen.append(w._mark)
    assert seen == sorted(seen) and len(set(seen)) == len(seen)  # each mark is further along than the last
    assert where(seen[0]) == "in 'start' (building the run or loading its checkpoint)"
    assert where((3, 1, DATA)).endswith("of step 4, micro-batch 2")


def test_a_hang_is_no_change_of_own_mark_or_counter_for_the_timeout():
    w = Watchdog(0, 1, 0.1)  # 6 s on the fake clock below
    assert not w.stalled(1, 0.0) and not w.stalled(1, 5.9)
    assert w.stalled(1, 6.0)
    assert not w.stalled(2, 7.0) and not w.stalled(None, 12.9)  # another rank moved; None: the count stands
    w.mark("data", 1)
    assert not w.stalled(None, 13.5) and not w.stalled(2, 19.4)  # this rank moved
    assert w.stalled(None, 19.5)


TIMEOUT_S = 0.8  # the thread tests' hang timeout: well above a busy machine's scheduling delays


def _progress(watchdogs, seconds: float) -> int:
    """Every watchdog's rank goes through steps for ``seconds`` (longer than the timeout); the last step."""
    deadline, step = time.monotonic() + seconds, 0
    while time.monotonic() < deadline:
        step += 1
        for w in watchdogs:
            w.mark("data", step)
            w.mark("head")
        time.sleep(0.01)
    return step


def _wait_for(exits: list, n: int, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while len(exits) < n and time.monotonic() < deadline:
        time.sleep(0.02)


@pytest.fixture
def two_ranks(monkeypatch):
    """Two watchdogs of 'ranks' 0 and 1 in this process, on one in-memory store under the same prefix
    (two processes would each count their first watchdog as run 1), with a recorded exit."""
    store, exits = dist.HashStore(), []
    made = []
    for rank in (0, 1):
        monkeypatch.setattr(watchdog, "_INSTANCES", [0])
        made.append(Watchdog(rank, 2, TIMEOUT_S / 60, interval_s=0.02, connect=lambda: store, exit=exits.append))
    yield made, exits
    for w in made:
        w.stop()


def test_two_watchdog_threads_see_progress_then_name_the_blocked_rank(two_ranks, caplog):
    (w0, w1), exits = two_ranks
    with caplog.at_level(logging.ERROR, logger="dsoft_dist"):
        step = _progress([w0, w1], 2 * TIMEOUT_S)
        assert exits == []  # progress all along: no hang
        w0.mark("data", step)
        w0.mark("head")  # rank 0 goes on to the head's collective; rank 1 stays in its data of the step
        w1.mark("data", step)
        _wait_for(exits, 2)
    assert exits == [HUNG_EXIT_CODE, HUNG_EXIT_CODE]
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 2
    for text in errors:
        assert text.startswith(f"no rank made progress for {TIMEOUT_S:g} s (parallel.hang_timeout_minutes="
                               f"{TIMEOUT_S / 60:g}): rank 1 is behind, with step {step} finished, in 'data'")
        assert f"exits with code {HUNG_EXIT_CODE}" in text and "resumes the run from its newest checkpoint" in text


def test_an_unreachable_store_warns_once_and_fires_only_when_this_rank_stops_too(caplog):
    exits = []

    def refused():
        raise RuntimeError("connection refused")

    with caplog.at_level(logging.WARNING, logger="dsoft_dist"):
        w = Watchdog(0, 2, TIMEOUT_S / 60, interval_s=0.02, connect=refused, exit=exits.append)
        try:
            _progress([w], 2 * TIMEOUT_S)
            assert exits == []  # its own progress holds it back
            _wait_for(exits, 1)
        finally:
            w.stop()
    assert exits == [HUNG_EXIT_CODE]
    texts = [r.getMessage() for r in caplog.records]
    assert sum("cannot reach the store" in t and "connection refused" in t for t in texts) == 1
    assert any("the store cannot be reached; this rank with step" in t for t in texts)


def test_one_rank_or_timeout_0_starts_no_thread():
    assert not Watchdog(0, 1, 5.0).enabled and not Watchdog(0, 4, 0.0).enabled
    assert Watchdog(0, 4, 0.0)._thread is None


def test_the_trainer_marks_each_phase_of_a_step(tmp_path, monkeypatch):
    from dsoft_dist.parallel.processes import distributed
    from dsoft_dist.train.trainer import Trainer

    seen = []
    real = Watchdog.mark
    monkeypatch.setattr(Watchdog, "mark", lambda self, phase, step=None, micro=0: seen.append(
        (phase, step, micro)) or real(self, phase, step, micro))
    cfg = config_from_dict(tiny(tmp_path / "run", parallel__nproc=1, schedule__steps=2,
                                optimizer__grad_accum_steps=2, checkpoint__every_steps=1))
    with distributed("gloo") as env:
        t = Trainer(cfg, env)
        t.verifier = lambda module: {"set/accuracy": 0.5}  # stands in for a verification at the end
        t.verifier.enabled = True
        try:
            assert t.updater.watchdog is t.watchdog and not t.watchdog.enabled
            t.train()
        finally:
            t.close()
    step = [("data", 0, 0), ("data", None, 0), ("forward", None, 0), ("head", None, 0), ("backward", None, 0),
            ("data", None, 1), ("forward", None, 1), ("head", None, 1), ("backward", None, 1), ("update", None, 1)]
    # the end: verification, the last checkpoint, then the outputs (the head's re-shardable checkpoint, collective)
    assert seen == step + [("save", 1, 0), ("data", 1, 0)] + step[1:] + [("verify", 2, 0), ("save", 2, 0),
                                                                          ("save", 2, 0)]


def test_the_config_key_is_checked_against_the_collective_timeout():
    assert load_config(None, []).parallel.hang_timeout_minutes == 20.0
    assert load_config(None, ["parallel.hang_timeout_minutes=0"]).parallel.hang_timeout_minutes == 0.0
    with pytest.raises(ConfigError, match=r"parallel.hang_timeout_minutes=-1.0 is invalid: must be >= 0"):
        load_config(None, ["parallel.hang_timeout_minutes=-1"])
    with pytest.raises(ConfigError, match=r"parallel.hang_timeout_minutes=20.0 is invalid: use 0 \(off\) or less "
                                          r"than parallel.timeout_s=600 s \(10 minutes\)"):
        load_config(None, ["parallel.timeout_s=600"])


# ----------------------------------------------------------------------------- a real hang under torchrun

HANG_AT = 5  # rank 1 blocks when it takes batch 5: step 4 finished and checkpointed
HANG_SOURCE = '''
"""data.source=hang_once: the synthetic data, where rank 1 blocks forever when it takes batch {batch} of epoch 0,
the first time only (the marker file decides), as a rank stuck on a dead mount would."""
import os
import threading

from dsoft_dist.data.pipeline import TrainLoader
from dsoft_dist.data.sources import DataSource, synthetic_identity, synthetic_loader
from dsoft_dist.registry import DATA_SOURCES

MARKER = {marker!r}


class HangOnce(TrainLoader):
    def __iter__(self):
        for batch in super().__iter__():
            if self.rank == 1 and self.epoch == 0 and self.batch == {batch} and not os.path.exists(MARKER):
                open(MARKER, "w").close()
                threading.Event().wait()  # blocked, not dead: the process lives, its main thread never returns
            yield batch


def hang_once_loader(cfg, rank, world_size, epoch, start_batch=0, done=None, keys=False):
    loader = synthetic_loader(cfg, rank, world_size, epoch, start_batch, done, keys)
    loader.__class__ = HangOnce  # the synthetic loader, with the hang added
    return loader


DATA_SOURCES.register("hang_once", DataSource(hang_once_loader, lambda cfg: None, synthetic_identity))
'''


def hang_cfg(out, **sections) -> dict:
    return tiny(out, schedule__steps=8, checkpoint__every_steps=1, parallel__hang_timeout_minutes=0.15,
                **sections)


@pytest.mark.dist
@pytest.mark.slow(reason="torchrun's two attempts with a 9 s hang timeout between them, beside an undisturbed "
                  "2-rank run (~50 s on a busy 2-core machine)")
def test_a_blocked_rank_is_named_and_the_restart_resumes_to_the_undisturbed_weights(tmp_path):
    module = f"hang_once_{tmp_path.name}"
    (tmp_path / f"{module}.py").write_text(textwrap.dedent(HANG_SOURCE.format(
        batch=HANG_AT, marker=str(tmp_path / "hung-once"))))
    cfg = {**hang_cfg(tmp_path / "hung", data__source="hang_once"), "extra_modules": [module]}
    (tmp_path / "hung.yaml").write_text(yaml.safe_dump(cfg))
    env = {k: v for k, v in os.environ.items() if k != "TORCHELASTIC_ERROR_FILE"}
    env.update(WANDB_MODE="disabled", PYTHONPATH=os.pathsep.join([str(tmp_path), env.get("PYTHONPATH", "")]))
    t0 = time.monotonic()
    with open(tmp_path / "torchrun.err", "w") as err:  # a file: nothing reads a pipe while the other run trains
        proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                                 "--max-restarts", "1", "-m", "dsoft_dist.train", "--config",
                                 str(tmp_path / "hung.yaml")], stdout=subprocess.DEVNULL, stderr=err, cwd=tmp_path,
                                env=env)
        try:
            undisturbed = run(hang_cfg(tmp_path / "undisturbed"))  # meanwhile: the hung job mostly waits
            proc.wait(timeout=300)
        finally:
            proc.kill()
    seconds, stderr = time.monotonic() - t0, (tmp_path / "torchrun.err").read_text()
    assert proc.returncode == 0, stderr[-4000:]
    assert (tmp_path / "hung-once").exists()  # it did block
    # each rank's thread fires at about the same moment; the one that exits first may end the other's collective
    # (gloo: "Connection closed by peer") before its own thread fires, so one message or two
    errors = [line for line in stderr.splitlines() if "no rank made progress" in line]
    assert 1 <= len(errors) <= 2 and f"(exitcode: {HUNG_EXIT_CODE})" in stderr, stderr[-4000:]
    for line in errors:
        assert "(parallel.hang_timeout_minutes=0.15): rank 1 is behind, with step 4 finished, in 'data' (waiting " \
               "for its next batch) of step 5; the other ranks are further along, waiting for it: rank 0 with " \
               "step 4 finished" in line and f"exits with code {HUNG_EXIT_CODE}" in line
    assert "resumed from" in stderr and "step-00000004" in stderr
    got = results(cfg)
    assert [r["step"] for r in got["rows"] if "loss" in r] == list(range(1, 9))
    assert got["loss"] == undisturbed["loss"]
    assert_same_params(got, undisturbed, atol=0.0, rtol=0.0)
    assert seconds < 120


@pytest.mark.dist
@pytest.mark.slow(reason="2 local ranks and a 9 s hang timeout")
def test_local_ranks_of_dsoft_train_end_with_the_hung_exit_code_and_one_message_each(tmp_path):
    """``dsoft train --nproc 2`` (no launcher to restart it): the ranks' watchdogs end the run with code 76 and
    their message, not a traceback of the exited process; the same command then resumes and finishes."""
    module = f"hang_once_{tmp_path.name}"
    (tmp_path / f"{module}.py").write_text(textwrap.dedent(HANG_SOURCE.format(
        batch=HANG_AT, marker=str(tmp_path / "hung-once"))))
    cfg = {**hang_cfg(tmp_path / "hung", data__source="hang_once"), "extra_modules": [module]}
    (tmp_path / "hung.yaml").write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "WANDB_MODE": "disabled",
           "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "dsoft_dist.train", "--config", str(tmp_path / "hung.yaml"), "--nproc", "2"]
    hung = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert hung.returncode == HUNG_EXIT_CODE, hung.stderr[-4000:]
    assert "no rank made progress" in hung.stderr and "Traceback" not in hung.stderr, hung.stderr[-4000:]
    resumed = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0 and "resumed from" in resumed.stderr, resumed.stderr[-4000:]
