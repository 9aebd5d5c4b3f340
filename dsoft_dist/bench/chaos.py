"""The chaos soak: a tiny run trained once undisturbed, then again under torchrun while a seeded schedule of faults
hits it at random moments; the disturbed run must end as the undisturbed one did.

    dsoft bench chaos --faults 20 --seed 0                          # 2 ranks throughout: exact to the bit
    dsoft bench chaos --faults 20 --seed 0 --world-sizes 2,1,3,2    # relaunched on 1, then 3, then 2 ranks
    dsoft bench chaos --faults 5 --out /tmp/soak                    # keeps the run folders and launcher logs

The run: an MLP on 240 synthetic vectors (40 identities), global batch 12 (20 steps an epoch on any of 1, 2, 3,
4 or 6 ranks), dropout (the RNG states must resume too), a checkpoint every 2 steps, a metrics row every step
and logging.sample_keys on; --epochs epochs (by default enough for the faults). It runs as launch/torchrun.sh
runs it (``torchrun --standalone --max-restarts``), in a process group of its own. Each fault fires once an
attempt started after the previous fault has logged the fault's step, after a random delay of up to 30 ms:

    kill-worker    SIGKILL one worker: torchrun restarts every worker, they resume from ``latest``
    kill-workers   SIGKILL every worker at once: torchrun restarts them
    kill-node      SIGKILL the launcher and its workers (a lost node): the soak starts it again, as a requeue does
    sigterm        SIGTERM to the launcher (Slurm's preemption): torchrun passes it on, the workers write a
                   checkpoint and exit 75; the soak starts it again
    sigusr1        SIGUSR1 to one worker: the ranks agree at the step boundary, checkpoint, exit 75; torchrun
                   restarts them
    ckpt-write     rank 0 SIGKILLed in the next save, its files and manifest written into step-N.tmp, before the
                   rename (DSOFT_FAILPOINT, ``dsoft_dist.utils.failpoint``)
    ckpt-rename    rank 0 SIGKILLed in the next save after step-N.tmp became step-N, before ``latest`` moves
    resize         (--world-sizes A,B,...) SIGTERM to the launcher, started again on the next world size

A schedule takes each fault once, in a seeded order, then at random; the resizes come in order at seeded
places among them. Checks (``dsoft_dist.bench.chaos_checks``): every loss any attempt logged (redone steps
included) equals the undisturbed run's at its step, where the world size has not changed yet; metrics.jsonl
ends with one row per step; the final backbone.pt and head equal the undisturbed run's bit for bit (a fixed
world size); the sample keys show every sample of every epoch trained exactly once (the later lines after a
restart count). It ends with one line, ``chaos: faults N, restarts R, lost L, repeated P, final weights equal:
yes|no``, with ``(world size changed)`` after it when it did; the exit code is 1 when a sample was lost or
repeated, a loss or (on a fixed world size) a weight differed, or a fault could not be injected.
"""
from __future__ import annotations

import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import yaml

from dsoft_dist.bench.chaos_checks import MetricsTail, file_sizes, findings
from dsoft_dist.bench.cli import bench_parser
from dsoft_dist.observability.procs import children, cmdline
from dsoft_dist.utils import FAILPOINT_ENV, int_list, write_text_atomic

KINDS = ("kill-worker", "kill-workers", "kill-node", "sigterm", "sigusr1", "ckpt-write", "ckpt-rename")
RELAUNCHED = ("kill-node", "sigterm", "resize")  # the launcher ends: the soak starts it again, as a requeue would
SAMPLES, GLOBAL_BATCH = 240, 12  # 12 = 1 x 12 = 2 x 6 = 3 x 4 = 4 x 3 = 6 x 2: 20 steps an epoch on each
STEPS_PER_EPOCH = SAMPLES // GLOBAL_BATCH
SAVE_EVERY = 2
WAIT_S = 300.0  # the longest wait for a run's next step, a launcher's exit or a failpoint


class SoakError(RuntimeError):
    """The soak could not go on: a launch ended by itself, or a step, an exit or a failpoint never came."""


@dataclass
class Fault:
    """One fault of the schedule: fired ``delay`` s after an attempt started after the previous fault logged
    ``step``; ``rank`` is the worker that kill-worker and sigusr1 hit; the run meets it on ``world_size`` ranks
    and goes on on ``next_world_size`` (another only for a resize)."""

    step: int
    kind: str
    rank: int
    world_size: int
    next_world_size: int
    delay: float


def fault_schedule(faults: int, seed: int, steps: int, world_sizes: list[int]) -> list[Fault]:
    """``faults`` faults at distinct steps in [3, steps - 4] (a checkpoint exists before the first; a save and
    room to recover after the last), increasing; each kind of KINDS once in a seeded order, then drawn at
    random; ``len(world_sizes) - 1`` of them are resizes, in order, at seeded places. ValueError naming the
    fix when they do not fit."""
    resizes = len(world_sizes) - 1
    if faults < max(resizes, 1):
        raise ValueError(f"--faults {faults} is too few: give at least {max(resizes, 1)} (one per world-size change "
                         f"of --world-sizes {','.join(map(str, world_sizes))}, and at least one)")
    span = range(3, steps - 3)
    if faults > len(span):
        raise ValueError(f"--faults {faults} do not fit in {steps} steps (at most {len(span)}): raise --epochs")
    rng = random.Random(seed)
    at = sorted(rng.sample(span, faults))
    order = list(KINDS)
    rng.shuffle(order)
    kinds = iter(order[i] if i < len(order) else rng.choice(KINDS) for i in range(faults - resizes))
    resize_at = set(rng.sample(range(faults), resizes))
    schedule, size = [], 0
    for i, step in enumerate(at):
        kind = "resize" if i in resize_at else next(kinds)
        nxt = size + (kind == "resize")
        schedule.append(Fault(step, kind, rng.randrange(world_sizes[size]), world_sizes[size], world_sizes[nxt],
                              round(rng.uniform(0.0, 0.03), 3)))
        size = nxt
    return schedule


def soak_config(out_dir: str, steps: int) -> dict:
    """The soak's run (see the module doc); data.batch_size is set per launch (GLOBAL_BATCH / world size)."""
    return {
        "name": "chaos", "seed": 0,
        "model": {"name": "mlp", "embedding_size": 16, "in_features": 24, "dropout": 0.1},
        "head": {"loss": "d_softmax", "negatives": "all", "scale": 16.0},
        "data": {"source": "synthetic", "synthetic_mode": "vectors", "vector_dim": 24, "num_classes": 40,
                 "samples_per_class": SAMPLES // 40, "batch_size": GLOBAL_BATCH, "num_workers": 0},
        "optimizer": {"name": "sgd", "lr": 0.2, "momentum": 0.9, "weight_decay": 5e-4},
        "schedule": {"steps": steps, "warmup_steps": 2, "decay": "cosine"},
        "parallel": {"backend": "gloo"},
        "checkpoint": {"every_steps": SAVE_EVERY},
        "logging": {"output_dir": out_dir, "log_every": 1, "progress": False, "sample_keys": True},
    }


def _rank_of(pid: int) -> int | None:
    """A torchrun worker's RANK, from its environment (None when it has ended)."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as fh:
            env = dict(v.split(b"=", 1) for v in fh.read().split(b"\0") if b"=" in v)
    except OSError:
        return None
    return int(env[b"RANK"]) if b"RANK" in env else None


def _alive(pids, within: float) -> list[int]:
    """The workers among ``pids`` still running after ``within`` seconds (a SIGKILL takes a moment to land)."""
    deadline = time.monotonic() + within
    while True:
        alive = [pid for pid in pids if b"dsoft_dist.train" in cmdline(pid)]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.02)


class Launch:
    """The run under torchrun on ``world_size`` ranks, as launch/torchrun.sh starts it, in its own process group;
    its output goes to ``log_path``."""

    def __init__(self, cfg_path: str, world_size: int, restarts: int, log_path: str, env: dict):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(world_size),
               "--max-restarts", str(restarts), "-m", "dsoft_dist.train", "--config", cfg_path,
               "--set", f"data.batch_size={GLOBAL_BATCH // world_size}"]
        self.world_size, self.log_path, self.started = world_size, log_path, time.time()
        with open(log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def workers(self) -> dict[int, int]:
        """{rank: pid} of the live workers."""
        found = {}
        for pid in children(self.proc.pid):
            rank = _rank_of(pid) if b"dsoft_dist.train" in cmdline(pid) else None
            if rank is not None:
                found[rank] = pid
        return found

    def log_tail(self, chars: int = 3000) -> str:
        """The end of the launch's output."""
        with open(self.log_path, encoding="utf-8", errors="replace") as fh:
            return fh.read()[-chars:]

    def kill(self) -> None:
        """SIGKILL to the launcher and every worker at once, as a lost node; torchrun starts each worker in a
        session of its own, so the launcher's process group alone would leave them training on."""
        if self.proc.poll() is None:
            workers = self.workers().values()
            os.killpg(self.proc.pid, signal.SIGKILL)  # first: a launcher that saw its workers die would restart them
            for pid in workers:
                os.kill(pid, signal.SIGKILL)
            self.proc.wait()


class Soak:
    """One run under faults (or none): its launches, every metrics row any attempt logged (with ``launch``),
    the sample files' sizes at each launch, and what each fault hit."""

    def __init__(self, out: str, steps: int, restarts: int):
        self.out, self.run_dir, self.restarts = out, os.path.join(out, "run"), restarts
        os.makedirs(self.run_dir)
        self.cfg_path = os.path.join(out, "run.yaml")
        with open(self.cfg_path, "w", encoding="utf-8") as fh:
            yaml.safe_dump(soak_config(self.run_dir, steps), fh)
        self.failpoint = os.path.join(out, "failpoint")
        self.env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", FAILPOINT_ENV: self.failpoint}
        self.tail = MetricsTail(os.path.join(self.run_dir, "metrics.jsonl"))
        self.launches: list[Launch] = []
        self.offsets: list[dict[str, int]] = []  # the sample files' sizes when each launch started
        self.rows: list[dict] = []
        self.hits: list[dict] = []  # per fault: what it hit and when

    def launch(self, world_size: int) -> None:
        """Starts the run (again) on ``world_size`` ranks; it resumes from ``latest`` by itself."""
        self.offsets.append(file_sizes(os.path.join(self.run_dir, "samples")))
        log_path = os.path.join(self.out, f"launch-{len(self.launches) + 1}.log")
        self.launches.append(Launch(self.cfg_path, world_size, self.restarts, log_path, self.env))

    def collect(self) -> None:
        """Reads the rows logged since the last call."""
        self.rows += [{**row, "launch": len(self.launches)} for row in self.tail.poll()]

    def _wait(self, done, what: str) -> None:
        """Collects rows until ``done()``; SoakError when the launch ends first or WAIT_S pass."""
        deadline = time.monotonic() + WAIT_S
        while True:
            self.collect()
            if done():
                return
            launch = self.launches[-1]
            if launch.proc.poll() is not None:
                raise SoakError(f"launch {len(self.launches)} ended with exit code {launch.proc.returncode} before "
                                f"{what}; its output ends:\n{launch.log_tail()}")
            if time.monotonic() > deadline:
                raise SoakError(f"{what} did not happen within {WAIT_S:.0f} s; launch {len(self.launches)}'s output "
                                f"ends:\n{launch.log_tail()}")
            time.sleep(0.005)

    def wait_for_step(self, step: int) -> None:
        """Until an attempt started after the previous fault has logged ``step``."""
        attempt = len(self.hits) + 1
        self._wait(lambda: bool(self.rows) and self.rows[-1]["attempt"] >= attempt and self.rows[-1]["step"] >= step,
                   f"step {step} (attempt {attempt})")

    def wait_for_exit(self) -> int:
        """Until the last launch ends; its exit code."""
        launch = self.launches[-1]
        deadline = time.monotonic() + WAIT_S
        while launch.proc.poll() is None and time.monotonic() < deadline:
            self.collect()
            time.sleep(0.02)
        if launch.proc.poll() is None:
            raise SoakError(f"launch {len(self.launches)} did not end within {WAIT_S:.0f} s; its output ends:\n"
                            f"{launch.log_tail()}")
        self.collect()
        return launch.proc.returncode

    def inject(self, fault: Fault) -> None:
        """Fires ``fault`` (see the module doc) and records what it hit."""
        self.collect()
        launch, hit = self.launches[-1], {"time": time.time(), "seen": self.rows[-1]["step"]}
        workers = launch.workers()
        if fault.kind in ("kill-worker", "sigusr1"):
            pid = workers.get(fault.rank)
            if pid is None:
                raise SoakError(f"{fault.kind}: no live worker of rank {fault.rank} in launch {len(self.launches)}")
            os.kill(pid, signal.SIGKILL if fault.kind == "kill-worker" else signal.SIGUSR1)
            hit["target"] = f"rank {fault.rank}"
        elif fault.kind == "kill-workers":
            pids = sorted(workers.values())
            for pid in pids:
                os.kill(pid, signal.SIGKILL)
            hit["target"] = f"{len(pids)} workers"
        elif fault.kind in RELAUNCHED:
            if fault.kind == "kill-node":
                launch.kill()
            else:
                os.kill(launch.proc.pid, signal.SIGTERM)
            self.wait_for_exit()
            alive = _alive(workers.values(), within=10.0)
            if alive:  # they would train on beside the relaunched run, into the same folders
                raise SoakError(f"{fault.kind}: workers {alive} of launch {len(self.launches)} outlived their "
                                "launcher")
            hit["target"] = "launcher" + (" and workers" if fault.kind == "kill-node" else "") + \
                            (f"; relaunched on {fault.next_world_size}" if fault.kind == "resize" else "; relaunched")
            self.launch(fault.next_world_size)
        else:  # ckpt-write, ckpt-rename: armed now, fired by rank 0's next save
            write_text_atomic(self.failpoint, fault.kind + "\n")
            self._wait(lambda: not os.path.exists(self.failpoint), f"the failpoint {fault.kind}")
            fired = re.compile(rf"failpoint {fault.kind} at step (\d+)")
            self._wait(lambda: fired.search(launch.log_tail(1000)), f"the failpoint {fault.kind}'s line")
            hit["target"] = f"rank 0 in the save of step {fired.findall(launch.log_tail(1000))[-1]}"
        self.hits.append(hit)

    def close(self) -> None:
        """Kills what still runs (after an error) and closes the metrics file."""
        for launch in self.launches:
            launch.kill()
        self.tail.close()


def run_soak(out: str, steps: int, schedule: list[Fault], world_size: int, progress) -> tuple[Soak, float]:
    """Starts the run on ``world_size`` ranks and fires ``schedule``; returns the soak and its wall seconds.
    ``progress(text)`` is told each fault as it fires."""
    soak = Soak(out, steps, restarts=len(schedule) + 1)
    t0 = time.perf_counter()
    try:
        soak.launch(world_size)
        for n, fault in enumerate(schedule, 1):
            soak.wait_for_step(fault.step)
            time.sleep(fault.delay)
            soak.inject(fault)
            progress(f"fault {n}/{len(schedule)} at step {soak.hits[-1]['seen']}: {fault.kind} "
                     f"({soak.hits[-1]['target']})")
        code = soak.wait_for_exit()
        if code != 0:
            raise SoakError(f"the last launch ended with exit code {code}; its output ends:\n"
                            f"{soak.launches[-1].log_tail()}")
    finally:
        soak.close()
    return soak, time.perf_counter() - t0


def _fault_rows(schedule: list[Fault], soak: Soak, found: dict) -> list[str]:
    """A table row per fault: its step, kind, what it hit, the step the restart resumed from, the steps redone
    (the last step the hit attempt logged minus that) and the seconds until the next attempt logged a new step."""
    lines = [f"{'#':>3} {'step':>5}  {'fault':<13} {'hit':<36} {'resumed':>7} {'redone':>6} {'recovered':>9}"]
    resumed = found["resumed"] if len(found["resumed"]) == len(schedule) else [None] * len(schedule)
    for n, (fault, hit, back) in enumerate(zip(schedule, soak.hits, resumed), 1):
        seen = max(r["step"] for r in soak.rows if r["attempt"] == n)
        after = [r["time"] for r in soak.rows if r["attempt"] == n + 1 and back is not None and r["step"] > back]
        lines.append(f"{n:>3} {hit['seen']:>5}  {fault.kind:<13} {hit['target']:<36} "
                     f"{'?' if back is None else back:>7} {'?' if back is None else seen - back:>6} "
                     f"{'%.1f s' % (after[0] - hit['time']) if after else '?':>9}")
    return lines


def _check_lines(found: dict, steps: int) -> list[str]:
    """The report's lines on the losses, metrics.jsonl, the samples and the final weights."""
    resized = " (world size changed)" if found["resized"] else ""
    scope = " (the launches before the first resize)" if found["resized"] else ""
    mismatches = found["mismatches"]
    losses = f"{len(mismatches)} differ, first {mismatches[0]}" if mismatches else "all equal to the undisturbed run's"
    differ = found["differ"]
    weights = f"{len(differ)} differ ({', '.join(differ[:3])})" if differ else "equal bit for bit"
    return [f"losses:          {len(found['checked'])} rows logged by the attempts{scope}, redone steps "
            f"included: {losses}",
            f"metrics.jsonl:   {'one row per step' if found['metrics_whole'] else 'NOT one row per step'}, 1-{steps}",
            f"samples:         {found['epochs']} epochs x {SAMPLES}: lost {found['lost']}, repeated {found['repeated']}"
            f", unexpected {found['unexpected']}; every step trained once: {'yes' if found['history_whole'] else 'NO'}",
            f"final weights:   {found['tensors']} tensors (backbone.pt and the head): {weights}{resized}"]


def passed(found: dict, faults: int) -> bool:
    """Whether the soak ended as the undisturbed run did: nothing lost, repeated or unexpected, every loss
    equal, one history, one restart per fault, and (on a fixed world size) the same weights."""
    return (found["lost"] == found["repeated"] == found["unexpected"] == 0 and not found["mismatches"]
            and found["metrics_whole"] and found["history_whole"] and found["restarts"] == faults
            and (found["resized"] or not found["differ"]))


def report(args, steps: int, schedule: list[Fault], reference: tuple[Soak, float],
           soak: tuple[Soak, float]) -> tuple[str, bool]:
    """The soak's report (see the module doc) and whether it passed."""
    (ref, ref_s), (run, run_s) = reference, soak
    cfg = soak_config(run.run_dir, steps)
    found = findings(ref, run, steps, cfg["data"]["num_classes"], cfg["model"]["embedding_size"])
    kinds = ", ".join(f"{k} {sum(f.kind == k for f in schedule)}" for k in sorted({f.kind for f in schedule}))
    extra = found["restarts"] - len(schedule)
    lines = [f"run: {steps} steps ({steps // STEPS_PER_EPOCH} epochs of {SAMPLES} samples, global batch "
             f"{GLOBAL_BATCH}), a checkpoint every {SAVE_EVERY} steps, world sizes {args.world_sizes}, torchrun",
             *_fault_rows(schedule, run, found),
             f"faults injected: {len(run.hits)} of {len(schedule)} ({kinds})",
             f"restarts:        {found['restarts']} ({found['restarts'] - found['relaunches']} by torchrun, "
             f"{found['relaunches']} relaunches by the soak)"
             + (f"; {extra} not caused by a fault (see the launcher logs)" if extra else ""),
             f"steps redone:    {found['redone']}",
             f"wall time:       {run_s:.1f} s, undisturbed {ref_s:.1f} s: overhead {run_s - ref_s:.1f} s "
             f"({run_s / ref_s:.1f}x)",
             *_check_lines(found, steps),
             f"chaos: faults {len(run.hits)}, restarts {found['restarts']}, lost {found['lost']}, repeated "
             f"{found['repeated']}, final weights equal: {'no' if found['differ'] else 'yes'}"
             + (" (world size changed)" if found["resized"] else "")]
    return "\n".join(lines) + "\n", passed(found, len(schedule))


def default_epochs(faults: int) -> int:
    """Enough epochs for ``faults`` faults about 4 steps apart, at least 2."""
    return max(2, math.ceil((4 * faults + 10) / STEPS_PER_EPOCH))


def build_parser():
    """``dsoft bench chaos``'s arguments."""
    p = bench_parser("chaos", __doc__.split("\n")[0])
    p.add_argument("--faults", type=int, default=20, help="faults to inject (default 20)")
    p.add_argument("--seed", type=int, default=0, help="the schedule's seed: the faults, their steps, ranks, delays")
    p.add_argument("--world-sizes", default="2", metavar="N[,N...]",
                   help="ranks at the start, then after each resize (default 2: no resize; e.g. 2,1,3,2); each "
                        f"must divide the global batch {GLOBAL_BATCH}")
    p.add_argument("--epochs", type=int, default=0,
                   help=f"epochs of {STEPS_PER_EPOCH} steps (default 0: enough for the faults, at least 2)")
    p.add_argument("--out", default=None,
                   help="a new or empty folder for the runs and launcher logs, kept (default: a temporary one)")
    return p


def _plan(args) -> tuple[list[int], int, list[Fault]]:
    """The world sizes, steps and schedule of ``args``; ValueError naming the option and the fix."""
    sizes = int_list(args.world_sizes, "--world-sizes", 1)
    bad = [n for n in sizes if GLOBAL_BATCH % n]
    if bad:
        raise ValueError(f"--world-sizes {args.world_sizes}: {bad[0]} does not divide the global batch "
                         f"{GLOBAL_BATCH}: use 1, 2, 3, 4 or 6")
    if any(a == b for a, b in zip(sizes, sizes[1:])):
        raise ValueError(f"--world-sizes {args.world_sizes} repeats a size in a row: list each change once")
    if args.epochs < 0:
        raise ValueError(f"--epochs {args.epochs} is invalid: give a number of epochs >= 1, or 0 for enough")
    if args.out and os.path.isdir(args.out) and os.listdir(args.out):
        raise ValueError(f"--out {args.out} is not empty: name a new or empty folder")
    steps = (args.epochs or default_epochs(args.faults)) * STEPS_PER_EPOCH
    return sizes, steps, fault_schedule(args.faults, args.seed, steps, sizes)


def main(argv=None) -> int:
    """Runs the undisturbed run and the soak, prints the report; 0 when the soak ended as the undisturbed run
    did, 1 when not, 2 for bad arguments."""
    args = build_parser().parse_args(argv)
    try:
        sizes, steps, schedule = _plan(args)
    except ValueError as err:
        sys.stderr.write(f"dsoft bench chaos: error: {err}\n")
        return 2
    out = args.out or tempfile.mkdtemp(prefix="dsoft-chaos-")
    progress = lambda text: (sys.stderr.write(f"chaos: {text}\n"), sys.stderr.flush())  # noqa: E731
    try:
        progress(f"the undisturbed run: {steps} steps on {sizes[0]} ranks")
        reference, reference_s = run_soak(os.path.join(out, "reference"), steps, [], sizes[0], progress)
        progress(f"the soak: {len(schedule)} faults (seed {args.seed})")
        try:
            soak, soak_s = run_soak(os.path.join(out, "chaos"), steps, schedule, sizes[0], progress)
        except SoakError as err:
            sys.stdout.write(f"chaos: the soak stopped: {err}\nchaos: faults {len(schedule)}, not finished\n")
            return 1
        text, ok = report(args, steps, schedule, (reference, reference_s), (soak, soak_s))
        sys.stdout.write(text)
        return 0 if ok else 1
    finally:
        if not args.out:
            shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
