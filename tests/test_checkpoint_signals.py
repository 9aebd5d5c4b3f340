"""A killed worker under torchrun --max-restarts=1 (one node, and two elastic nodes) and a SIGTERM'd run:
each ends with the uninterrupted run's weights. Real processes: `dsoft train` / torchrun agents in
subprocesses, signals sent to one worker."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from dsoft_dist.errors import PREEMPTED_EXIT_CODE
from dsoft_dist.observability.procs import children, cmdline, live
from tests.terminal import DSOFT
from tests.test_train_dist import assert_same_params, run, tiny

pytestmark = pytest.mark.dist
# each case runs the 2-rank uninterrupted run and then launchers, agents and restarts in real processes
SLOW = pytest.mark.slow(reason="another launcher path of the restart (~15 s of real processes); the torchrun kill "
                        "is the default tier's case")
STEPS = 300
LAUNCH = Path(__file__).resolve().parents[1] / "launch"


def long_cfg(out) -> dict:
    return tiny(out, schedule__steps=STEPS, schedule__decay="cosine", checkpoint__every_steps=40,
                logging__log_every=1, model__dropout=0.1, data__samples_per_class=40)


def _workers(pid: int) -> list[int]:
    """The training ranks below ``pid`` (torchrun's workers, or spawn_local's children), at any depth:
    launch/multinode.sh is a shell whose child is torchrun, whose children are the workers."""
    found, todo = [], children(pid)
    while todo:
        child = todo.pop()
        cmd = cmdline(child).replace(b"\0", b" ")
        if b"torch.distributed.run" in cmd:
            todo += children(child)
        elif b"dsoft_dist.train" in cmd or b"multiprocessing.spawn" in cmd:
            found.append(child)
    return sorted(found)


def _wait_for_step(out: Path, step: int, proc, timeout: float = 300) -> int:
    """Polls metrics.jsonl until a training row reaches ``step``; returns the last logged step."""
    path, deadline = out / "metrics.jsonl", time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if path.exists():
            steps = [json.loads(x).get("step", 0) for x in path.read_text().splitlines() if '"loss"' in x]
            if steps and steps[-1] >= step:
                return steps[-1]
        time.sleep(0.02)
    raise AssertionError(f"the run never reached step {step} (rc={proc.poll()})")


def _running(pids: list[int], grace: float = 5.0) -> list[int]:
    """The pids still running (neither gone nor a zombie) after up to ``grace`` seconds: a worker that closed
    its pipes may still be tearing down for a moment; one that trains on is still there when the time is up."""
    deadline = time.time() + grace
    while True:
        alive = live(pids)
        if not alive or time.time() >= deadline:
            return alive
        time.sleep(0.05)


def node_env(**values) -> dict:
    """launch/multinode.sh's environment for a "node" of this machine: one worker on one thread (as each
    of spawn_local's two ranks gets), the rendezvous on a free loopback port."""
    from dsoft_dist.parallel import free_port

    return {"NPROC_PER_NODE": "1", "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
            "PYTHON": sys.executable, "RDZV_ID": "test", **values}


def _launch(cmd, tmp_path, extra_env: dict | None = None):
    env = {**os.environ, "WANDB_MODE": "disabled", **(extra_env or {})}
    return subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _final(out: Path, cfg: dict) -> dict:
    from dsoft_dist.head import ShardedClassifier, load_head_checkpoint
    from dsoft_dist.models.checkpoint import read_backbone_file

    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    head = ShardedClassifier(cfg["data"]["num_classes"], cfg["model"]["embedding_size"])
    load_head_checkpoint(str(out / "head"), head)
    return {"loss": [r["loss"] for r in rows if "loss" in r], "steps": [r["step"] for r in rows if "loss" in r],
            "backbone": read_backbone_file(str(out / "backbone.pt"))["state_dict"], "head": head.weight.detach()}


@pytest.fixture(scope="module")
def whole(tmp_path_factory) -> dict:
    """The uninterrupted run every interrupted one must end like (2 ranks of spawn_local)."""
    return run(long_cfg(tmp_path_factory.mktemp("whole") / "run"))


def test_killed_worker_under_torchrun_restarts_and_ends_like_the_uninterrupted_run(tmp_path, whole):
    cfg = long_cfg(tmp_path / "killed")
    (tmp_path / "killed.yaml").write_text(yaml.safe_dump(cfg))
    proc = _launch([str(LAUNCH / "torchrun.sh"), "--config", str(tmp_path / "killed.yaml")], tmp_path,
                   {"NPROC_PER_NODE": "2", "MAX_RESTARTS": "1", "PYTHON": sys.executable})
    killed_at = _wait_for_step(tmp_path / "killed", 100, proc)
    victim = _workers(proc.pid)[1]
    os.kill(victim, signal.SIGKILL)
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]
    assert "resumed from" in stderr, stderr[-3000:]  # the restarted workers found `latest` themselves
    got = _final(tmp_path / "killed", cfg)
    assert got["steps"] == list(range(1, STEPS + 1))  # one history: the killed attempt's extra rows are gone
    assert got["loss"] == whole["loss"]  # every step, the ones after the kill included: bit-identical
    assert_same_params(got, whole, atol=0.0, rtol=0.0)
    assert killed_at >= 100


@SLOW
def test_killed_worker_on_one_of_two_elastic_nodes_restarts_both_and_ends_like_the_uninterrupted_run(tmp_path, whole):
    """Two launch/multinode.sh agents (two nodes on one machine, one worker each) meet in an elastic c10d
    rendezvous (NNODES=1:2); the second node's worker is SIGKILLed. Both agents start a new round, the
    workers resume from `latest`, and the run ends with the uninterrupted run's losses and weights.
    (The script sets TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1: with torchrun's shared store the two agents'
    restart counts can differ after the kill, and the restarted workers then hung here; docs/train.md.)"""
    cfg = long_cfg(tmp_path / "elastic")
    (tmp_path / "elastic.yaml").write_text(yaml.safe_dump(cfg))
    env = node_env(NNODES="1:2", MAX_RESTARTS="1")
    agent = [str(LAUNCH / "multinode.sh"), "--config", str(tmp_path / "elastic.yaml")]
    first, second = _launch(agent, tmp_path, env), _launch(agent, tmp_path, env)
    _wait_for_step(tmp_path / "elastic", 100, first)
    os.kill(_workers(second.pid)[0], signal.SIGKILL)
    (_, err1), (_, err2) = first.communicate(timeout=600), second.communicate(timeout=600)
    assert (first.returncode, second.returncode) == (0, 0), (err1[-3000:], err2[-3000:])
    assert "resumed from" in err1 + err2
    got = _final(tmp_path / "elastic", cfg)
    assert got["steps"] == list(range(1, STEPS + 1))
    assert got["loss"] == whole["loss"]
    assert_same_params(got, whole, atol=0.0, rtol=0.0)


@SLOW
def test_sigterm_writes_a_checkpoint_within_a_step_exits_75_and_resumes_to_the_same_weights(tmp_path, whole):
    cfg = long_cfg(tmp_path / "term")
    (tmp_path / "term.yaml").write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, "-m", "dsoft_dist.train", "--config", str(tmp_path / "term.yaml"), "--nproc", "2"]
    proc = _launch(cmd, tmp_path)
    seen = _wait_for_step(tmp_path / "term", 50, proc)
    os.kill(_workers(proc.pid)[0], signal.SIGTERM)  # one rank only: the others learn it at the step boundary
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == PREEMPTED_EXIT_CODE, stderr[-3000:]
    latest = (tmp_path / "term" / "checkpoints" / "latest").read_text().strip()
    step = int(latest.split("-")[1])
    rows = [json.loads(x) for x in (tmp_path / "term" / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert seen <= step <= rows[-1]["step"] + 1 and step < STEPS  # written at the first boundary after the signal
    assert f"preempted (SIGTERM) after step {step}" in stderr
    resumed = _launch(cmd, tmp_path)
    _, stderr = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, stderr[-3000:]
    got = _final(tmp_path / "term", cfg)
    assert got["loss"] == whole["loss"]
    assert_same_params(got, whole, atol=0.0, rtol=0.0)


@SLOW
def test_the_workers_of_a_sigkilled_torchrun_checkpoint_exit_and_the_relaunch_ends_like_the_uninterrupted_run(
        tmp_path, whole):
    """torchrun starts each worker in a session of its own: SIGKILL of the launcher alone (a lost node's
    agent) once left them training on beside the relaunched job. They now get SIGTERM when it dies
    (PR_SET_PDEATHSIG): a checkpoint at the next step, exit; the relaunch resumes from it."""
    cfg = long_cfg(tmp_path / "orphans")
    (tmp_path / "orphans.yaml").write_text(yaml.safe_dump(cfg))
    cmd = [str(LAUNCH / "torchrun.sh"), "--config", str(tmp_path / "orphans.yaml")]
    env = {"NPROC_PER_NODE": "2", "MAX_RESTARTS": "1", "PYTHON": sys.executable}
    proc = _launch(cmd, tmp_path, env)  # torchrun.sh execs torchrun: proc is the launcher
    seen = _wait_for_step(tmp_path / "orphans", 20, proc)
    workers = _workers(proc.pid)
    assert len(workers) == 2
    os.kill(proc.pid, signal.SIGKILL)
    _, stderr = proc.communicate(timeout=120)  # the pipes close when the workers have exited too
    assert not _running(workers), stderr[-3000:]
    step = int((tmp_path / "orphans" / "checkpoints" / "latest").read_text().strip().split("-")[1])
    assert seen <= step < STEPS and f"preempted (SIGTERM) after step {step}" in stderr, stderr[-3000:]
    relaunched = _launch(cmd, tmp_path, env)
    _, stderr = relaunched.communicate(timeout=600)
    assert relaunched.returncode == 0 and "resumed from" in stderr, stderr[-3000:]
    got = _final(tmp_path / "orphans", cfg)
    assert got["loss"] == whole["loss"]
    assert_same_params(got, whole, atol=0.0, rtol=0.0)


# ------------------------------------------------------------------ stopping `dsoft train` from a terminal

def _in_own_group(cmd, tmp_path):
    """``cmd`` as the leader of a new process group, as a shell starts a job: a terminal's Ctrl-C and
    ``kill -- -PGID`` reach the leader and every rank together."""
    env = {**os.environ, "WANDB_MODE": "disabled"}
    return subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _stopped(tmp_path, name: str, nproc: int, send) -> tuple[int, str, int, int]:
    """Starts `dsoft train --nproc N` on the long run, calls send(proc) once step 20 is logged; returns
    (exit code, stderr, the step seen before the signal, the step of the latest checkpoint)."""
    cfg = long_cfg(tmp_path / name)
    cfg["checkpoint"] = {"every_steps": 0, "every_minutes": 0}  # only the signal's checkpoint
    (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
    proc = _in_own_group([DSOFT, "train", "--config", str(tmp_path / f"{name}.yaml"), "--nproc", str(nproc)],
                         tmp_path)
    seen = _wait_for_step(tmp_path / name, 20, proc)
    send(proc)
    _, stderr = proc.communicate(timeout=120)
    latest = tmp_path / name / "checkpoints" / "latest"
    step = int(latest.read_text().strip().split("-")[1]) if latest.exists() else -1
    return proc.returncode, stderr, seen, step


def test_sigterm_to_the_process_group_of_local_ranks_checkpoints_and_exits_75(tmp_path):
    rc, stderr, seen, step = _stopped(tmp_path, "group", 2, lambda p: os.killpg(p.pid, signal.SIGTERM))
    assert rc == PREEMPTED_EXIT_CODE, stderr[-3000:]
    assert seen <= step < STEPS, (seen, step)
    assert f"after step {step}: checkpoint" in stderr and "Traceback" not in stderr, stderr[-3000:]


@SLOW
def test_ctrl_c_on_local_ranks_checkpoints_and_exits_75(tmp_path):
    rc, stderr, seen, step = _stopped(tmp_path, "ctrl_c", 2, lambda p: os.killpg(p.pid, signal.SIGINT))
    assert rc == PREEMPTED_EXIT_CODE, stderr[-3000:]
    assert seen <= step < STEPS and "Ctrl-C" in stderr and "Traceback" not in stderr, stderr[-3000:]


@SLOW
def test_sigint_to_the_parent_of_local_ranks_alone_checkpoints_and_exits_75(tmp_path):
    rc, stderr, seen, step = _stopped(tmp_path, "parent", 2, lambda p: os.kill(p.pid, signal.SIGINT))
    assert rc == PREEMPTED_EXIT_CODE, stderr[-3000:]
    assert seen <= step < STEPS and "asking the 2 local ranks" in stderr and "Traceback" not in stderr, stderr


@SLOW
def test_ctrl_c_on_a_single_process_run_checkpoints_and_exits_75(tmp_path):
    rc, stderr, seen, step = _stopped(tmp_path, "single", 1, lambda p: os.killpg(p.pid, signal.SIGINT))
    assert rc == PREEMPTED_EXIT_CODE, stderr[-3000:]
    assert seen <= step < STEPS and "Traceback" not in stderr, stderr[-3000:]


def test_a_second_ctrl_c_stops_the_run_at_once():
    """The first Ctrl-C asks for a checkpoint, the second stops at once; restore() puts back the handler found
    (Python's default_int_handler, or SIG_IGN in a process a shell without job control started with &)."""
    from dsoft_dist.train.preempt import Preemption

    before = signal.getsignal(signal.SIGINT)
    preemption = Preemption(["SIGTERM"])
    try:
        try:
            os.kill(os.getpid(), signal.SIGINT)  # handled before os.kill returns (the main thread signals itself)
        except KeyboardInterrupt:
            pytest.fail("the first Ctrl-C stopped the run at once, without its checkpoint")
        assert preemption.received == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        preemption.restore()
    assert signal.getsignal(signal.SIGINT) is before


def ignore_sigterm_and_wait(ready_dir: str) -> None:
    """A rank that will not stop on SIGTERM (as one stuck in a step); it says when it is up."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    Path(ready_dir, os.environ["RANK"]).touch()
    time.sleep(300)


def test_a_second_signal_to_the_parent_of_local_ranks_kills_them_at_once(tmp_path):
    code = ("import sys; from dsoft_dist.parallel.processes import spawn_local; "
            "from tests.test_checkpoint_signals import ignore_sigterm_and_wait as f; "
            f"spawn_local(f, 2, ({str(tmp_path)!r},))")
    root = str(Path(__file__).resolve().parents[1])
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=root, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while len(list(tmp_path.iterdir())) < 2 and time.time() < deadline:
        time.sleep(0.05)
    ranks = [pid for pid in children(proc.pid) if b"spawn_main" in cmdline(pid)]
    assert len(ranks) == 2
    os.kill(proc.pid, signal.SIGINT)  # passed on as SIGTERM, which these ranks ignore
    time.sleep(0.5)
    assert proc.poll() is None
    t0 = time.time()
    os.kill(proc.pid, signal.SIGINT)
    _, stderr = proc.communicate(timeout=30)
    assert time.time() - t0 < 5 and "KeyboardInterrupt" in stderr, stderr[-2000:]
    assert not [pid for pid in ranks if os.path.exists(f"/proc/{pid}")]
