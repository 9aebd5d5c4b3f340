"""The chaos soak (``dsoft bench chaos``): its schedule, its checks on planted input, the failpoint it arms, and
two short soaks of real torchrun runs (slow tier).

    python -m pytest tests/test_bench_chaos.py -m "slow or not slow"
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from dsoft_dist.bench.chaos import KINDS, fault_schedule, main
from dsoft_dist.bench.chaos_checks import (
    MetricsTail,
    epoch_keys,
    loss_mismatches,
    sample_counts,
    trained_history,
)
from dsoft_dist.utils import FAILPOINT_ENV, failpoint, write_text_atomic
from tests.terminal import DSOFT

SLOW = pytest.mark.slow(reason="a soak of real torchrun launches: every fault costs a restart of the workers (~5-10 s)")


# ------------------------------------------------------------------ the schedule

def test_the_schedule_is_seeded_takes_every_kind_and_keeps_its_steps_in_range():
    first = fault_schedule(20, 7, 100, [2])
    assert first == fault_schedule(20, 7, 100, [2])
    assert first != fault_schedule(20, 8, 100, [2])
    steps = [f.step for f in first]
    assert steps == sorted(set(steps)) and 3 <= steps[0] and steps[-1] <= 100 - 4
    assert set(KINDS) <= {f.kind for f in first[:len(KINDS)]}  # each kind once before any repeats
    assert all(f.world_size == f.next_world_size == 2 and 0 <= f.rank < 2 and 0 <= f.delay <= 0.03 for f in first)


def test_resizes_come_in_order_and_each_fault_meets_the_world_size_of_its_moment():
    schedule = fault_schedule(6, 1, 60, [2, 1, 3, 2])
    assert [(f.world_size, f.next_world_size) for f in schedule if f.kind == "resize"] == [(2, 1), (1, 3), (3, 2)]
    size = 2
    for fault in schedule:
        assert fault.world_size == size and fault.rank < size
        size = fault.next_world_size
    assert size == 2


@pytest.mark.parametrize("faults,steps,sizes,message", [
    (2, 60, [2, 1, 3, 2], "--faults 2 is too few: give at least 3"),
    (0, 60, [2], "--faults 0 is too few"),
    (40, 40, [2], "do not fit in 40 steps (at most 34): raise --epochs"),
])
def test_a_schedule_that_cannot_fit_is_refused_naming_the_fix(faults, steps, sizes, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        fault_schedule(faults, 0, steps, sizes)


@pytest.mark.parametrize("argv,message", [
    (["--world-sizes", "2,5"], "5 does not divide the global batch 12"),
    (["--world-sizes", "2,2"], "repeats a size in a row"),
    (["--world-sizes", "two"], "--world-sizes 'two' is invalid"),
    (["--epochs", "-1"], "--epochs -1 is invalid"),
])
def test_bad_options_are_refused_before_anything_runs(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


# ------------------------------------------------------------------ the checks, on planted input

def _keys(step: int, ranks: int = 2, per_rank: int = 2, epoch: int = 0, tag: str = "") -> dict[int, str]:
    """One step's sample-key lines by rank: keys s-r-i (distinct per step and rank)."""
    return {r: f"{step} {epoch} " + " ".join(f"{step}-{r}-{i}{tag}" for i in range(per_rank)) for r in range(ranks)}


def _segment(*steps, ranks: int = 2, **kw) -> dict[int, list[str]]:
    lines: dict[int, list[str]] = {r: [] for r in range(ranks)}
    for step in steps:
        for r, line in _keys(step, ranks, **kw).items():
            lines[r].append(line)
    return lines


def _expected(steps: int, ranks: int = 2) -> dict[int, set[str]]:
    return epoch_keys(trained_history([_segment(*range(1, steps + 1), ranks=ranks)])[0])


def test_a_restart_inside_a_launch_keeps_the_later_lines_and_counts_the_redone_steps():
    # steps 1-4, a kill after step 4 with the checkpoint at 2: 3 and 4 again (their later lines win)
    lines = _segment(1, 2, 3, 4)
    again = _segment(3, 4, 5, tag="")
    history, redone = trained_history([{r: lines[r] + again[r] for r in lines}])
    assert sorted(history) == [1, 2, 3, 4, 5] and redone == 2
    assert sample_counts(history, _expected(5)) == {"lost": 0, "repeated": 0, "unexpected": 0}


def test_a_planted_repeat_and_a_planted_loss_are_counted():
    segment = _segment(1, 2, 3)
    segment[1][2] = segment[1][2].replace("3-1-1", "2-1-0")  # step 3 of rank 1 trains a sample of step 2 again
    history, _ = trained_history([segment])
    assert sample_counts(history, _expected(3)) == {"lost": 1, "repeated": 1, "unexpected": 0}
    history, _ = trained_history([_segment(1, 2, 3, tag="x")])
    assert sample_counts(history, _expected(3)) == {"lost": 12, "repeated": 0, "unexpected": 12}


def test_a_new_launch_forgets_every_ranks_steps_from_its_first_line_on_a_gone_rank_too():
    """3 ranks train steps 1-3 (the checkpoint at 2); the run goes on on 2 ranks from step 3, cutting what
    is left. Rank 2's line for step 3 is stale: counting it would repeat its samples."""
    first = _segment(1, 2, 3, ranks=3, per_rank=2)
    second = _segment(3, 4, ranks=2, per_rank=3, tag="")
    history, redone = trained_history([first, second])
    assert sorted(history) == [1, 2, 3, 4] and sorted(history[3]) == [0, 1] and redone == 1
    # the same lines read as one launch keep rank 2's stale step 3
    merged = {r: first.get(r, []) + second.get(r, []) for r in range(3)}
    assert sorted(trained_history([merged])[0][3]) == [0, 1, 2]


def test_a_line_that_is_not_a_sample_key_line_is_refused_by_launch_and_rank():
    with pytest.raises(ValueError, match="launch 1, rank 0: 'oops'"):
        trained_history([{0: ["oops"]}])


def test_loss_mismatches_name_the_step_and_both_values():
    rows = [{"step": 1, "loss": 2.5}, {"step": 2, "loss": 1.0}, {"step": 2, "eval": True}]
    assert loss_mismatches(rows, {1: 2.5, 2: 1.0}) == []
    assert loss_mismatches(rows, {1: 2.5, 2: 1.0000001}) == ["step 2: got 1.0, want 1.0000001"]


def test_the_metrics_tail_reads_what_a_killed_attempt_wrote_after_the_restart_replaced_the_file(tmp_path):
    path = tmp_path / "metrics.jsonl"
    row = lambda step, loss: json.dumps({"step": step, "loss": loss}) + "\n"  # noqa: E731
    path.write_text(row(1, 3.0) + row(2, 2.0))
    tail = MetricsTail(str(path))
    assert [r["step"] for r in tail.poll()] == [1, 2] and tail.attempts == 1
    with open(path, "a") as fh:  # the attempt logs steps 3 and 4, then is killed in the middle of a row
        fh.write(row(3, 1.5) + row(4, 1.0) + '{"step": 5, "lo')
    write_text_atomic(str(path), row(1, 3.0) + row(2, 2.0))  # the restart keeps its checkpoint's history
    with open(path, "a") as fh:
        fh.write(row(3, 1.5))
    rows = tail.poll()
    assert [(r["step"], r["attempt"]) for r in rows] == [(3, 1), (4, 1), (1, 2), (2, 2), (3, 2)]
    assert tail.attempts == 2
    tail.close()


# ------------------------------------------------------------------ the failpoint

def _arm(tmp_path, monkeypatch, armed: str | None):
    arm = tmp_path / "failpoint"
    if armed is not None:
        arm.write_text(armed)
    monkeypatch.setenv(FAILPOINT_ENV, str(arm))
    return arm


@pytest.mark.parametrize("armed", [None, "ckpt-rename", "ckpt-write 8"])
def test_a_failpoint_that_is_not_armed_for_this_point_and_step_does_nothing(tmp_path, monkeypatch, armed):
    arm = _arm(tmp_path, monkeypatch, armed)
    failpoint("ckpt-write", 7)  # returns: this process lives on
    assert arm.exists() == (armed is not None)


@pytest.mark.parametrize("armed", ["ckpt-write", "ckpt-write 7\n"])
def test_an_armed_failpoint_kills_its_process_once_and_disarms(tmp_path, monkeypatch, armed):
    arm = _arm(tmp_path, monkeypatch, armed)
    err = tmp_path / "stderr"
    pid = os.fork()
    if pid == 0:  # the child: stderr to a file, then the point twice; it must die at the first
        sys.stderr = open(err, "w")  # noqa: SIM115 - the child never returns to close it
        failpoint("ckpt-write", 7)
        failpoint("ckpt-write", 7)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    assert "failpoint ckpt-write at step 7: SIGKILL" in err.read_text() and not arm.exists()
    failpoint("ckpt-write", 7)  # disarmed: fires once


def test_a_failpoint_file_of_another_form_is_refused_naming_the_form(tmp_path, monkeypatch):
    _arm(tmp_path, monkeypatch, "ckpt-write seven")
    with pytest.raises(ValueError, match="write a point's name, or a name and a step"):
        failpoint("ckpt-write", 7)


# ------------------------------------------------------------------ short soaks (real torchrun runs)

def _soak(tmp_path, *argv) -> tuple[int, str]:
    env = {**os.environ, "WANDB_MODE": "disabled"}
    proc = subprocess.run([DSOFT, "bench", "chaos", *argv, "--epochs", "1", "--out", str(tmp_path / "soak")],
                          capture_output=True, text=True, env=env, timeout=600)
    return proc.returncode, proc.stdout + proc.stderr


@SLOW
def test_a_short_soak_on_a_fixed_world_size_ends_with_the_undisturbed_runs_losses_and_weights(tmp_path):
    """6 faults on 2 ranks in 20 steps: sigusr1, kill-workers, kill-node, sigterm, ckpt-write, ckpt-rename."""
    rc, out = _soak(tmp_path, "--faults", "6", "--seed", "4")
    assert rc == 0, out[-4000:]
    assert "chaos: faults 6, restarts 6, lost 0, repeated 0, final weights equal: yes\n" in out, out[-4000:]
    assert "all equal to the undisturbed run's" in out and "every step trained once: yes" in out
    for kind in ("sigusr1", "kill-workers", "kill-node", "sigterm", "ckpt-write", "ckpt-rename"):
        assert f"  {kind} " in out, kind
    root = tmp_path / "soak" / "chaos" / "run" / "checkpoints"
    assert not [n for n in os.listdir(root) if n.endswith(".tmp")], os.listdir(root)  # no torn save left


@SLOW
def test_a_short_soak_on_1_then_3_then_2_ranks_trains_every_sample_of_the_epoch_once(tmp_path):
    """A resize to 1 rank, to 3 (where all its workers are killed), back to 2, in the one epoch of 20 steps."""
    rc, out = _soak(tmp_path, "--faults", "4", "--seed", "3", "--world-sizes", "2,1,3,2")
    assert rc == 0, out[-4000:]
    assert "chaos: faults 4, restarts 4, lost 0, repeated 0, final weights equal: no (world size changed)\n" in out
    assert "1 epochs x 240: lost 0, repeated 0, unexpected 0; every step trained once: yes" in out, out[-4000:]
