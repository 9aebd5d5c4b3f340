"""The one distributed start-up: from torchrun's environment, or local ranks spawned by this process.

Every multi-process entry (``dsoft train``, ``dsoft demo``, the benchmarks, the tests) starts
its ranks the same way:

    def worker(cfg):                        # runs in every rank
        with distributed("auto") as env:    # env.rank, env.world_size, env.local_rank, env.device
            ...
    spawn_local(worker, nproc=2, args=(cfg,))  # or: torchrun --nproc-per-node 2 ... (same worker)

``spawn_local`` sets the same variables torchrun sets (RANK, LOCAL_RANK, WORLD_SIZE,
LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT) in each child, so a worker cannot tell the
two apart. ``init_distributed`` reads them; without them it starts a one-rank group on a
free local port, so single-process runs take the same code path. The backend is nccl on
CUDA and gloo on CPU ("auto"); ``init_process_group`` is only ever called from here.
"""
from __future__ import annotations

import datetime
import gc
import multiprocessing
import os
import signal
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.distributed as dist

from dsoft_dist.errors import USER_ERROR_EXIT, error_line, traceback_wanted, user_errors
from dsoft_dist.observability import get_logger
from dsoft_dist.parallel.ports import free_port

log = get_logger(__name__)


@dataclass(frozen=True)
class DistEnv:
    """Where this process runs: global rank of world_size, local rank on its node, device, backend."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        """Rank 0: the rank that logs, writes reports and speaks to wandb."""
        return self.rank == 0


def under_launcher() -> bool:
    """True when torchrun (or spawn_local, Slurm with the same variables) set RANK and WORLD_SIZE."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def resolve_backend(backend: str = "auto") -> str:
    """auto -> nccl when CUDA is available, else gloo; nccl without CUDA is an error naming the fix."""
    if backend not in ("auto", "gloo", "nccl"):
        raise ValueError(f"parallel.backend={backend!r} is invalid: use auto, gloo or nccl")
    if backend == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl" and not torch.cuda.is_available():
        raise ValueError("parallel.backend='nccl' needs CUDA GPUs and none is available: use parallel.backend=gloo "
                         "(or auto)")
    return backend


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "")
    try:
        return int(raw) if raw else default
    except ValueError as err:
        raise ValueError(f"environment variable {name}={raw!r} is not an integer (set by the launcher?)") from err


def die_with_parent() -> None:
    """Has Linux send this process SIGTERM when its parent dies (PR_SET_PDEATHSIG). torchrun starts each worker
    in a session of its own, so a SIGKILLed launcher (a lost node's agent, ``kill -9``) would leave its workers
    training beside the job that replaces it, both writing one run folder; with this they take the preemption
    path instead (a checkpoint at the next step, exit 75). Elsewhere than Linux: nothing."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes  # noqa: PLC0415

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM), 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError) as err:  # no prctl in this libc: the launcher's own cleanup stands
        log.debug("PR_SET_PDEATHSIG is not available: %s", err)


def init_distributed(backend: str = "auto", timeout_s: float = 1800.0) -> DistEnv:
    """Initializes the default process group from the launcher's environment (or as one rank).

    CUDA ranks use device cuda:LOCAL_RANK; CPU ranks get cores // LOCAL_WORLD_SIZE threads
    each (OMP_NUM_THREADS, when set, wins), so local ranks do not oversubscribe the machine.
    """
    backend = resolve_backend(backend)
    launched = under_launcher()  # else a single process: a one-rank group, so every path is the same
    if os.environ.get("TORCHELASTIC_RUN_ID"):  # a torchrun worker: it ends with its launcher
        die_with_parent()
    init = {} if launched else {"init_method": f"tcp://127.0.0.1:{free_port()}"}
    rank, world = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1)
    local_rank, local_world = _env_int("LOCAL_RANK", 0), _env_int("LOCAL_WORLD_SIZE", 1)
    if backend == "nccl":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        if not os.environ.get("OMP_NUM_THREADS"):
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local_world)))
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=timeout_s)
        if backend == "nccl":
            init["device_id"] = device
        if launched and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            _warn_if_restarts_can_hang(rank)
            init = {**init, "store": _attempt_store(rank, world, timeout)}
        with explain_timeouts("the rendezvous", timeout_s):
            dist.init_process_group(backend, rank=rank, world_size=world, timeout=timeout, **init)
    log.debug("rank %d/%d (local %d) on %s with %s", rank, world, local_rank, device, backend)
    return DistEnv(rank=rank, world_size=world, local_rank=local_rank, device=device, backend=backend)


def _is_timeout(err: BaseException) -> bool:
    text = str(err).lower()
    return isinstance(err, TimeoutError) or "timed out" in text or "timeout" in text


@contextmanager
def explain_timeouts(what: str, timeout_s: float):
    """Re-raises a rendezvous or collective timeout with what to check (the cause stays chained)."""
    try:
        yield
    except (RuntimeError, TimeoutError) as err:
        if not _is_timeout(err):
            raise
        addr, port = os.environ.get("MASTER_ADDR", "?"), os.environ.get("MASTER_PORT", "?")
        raise RuntimeError(
            f"{what} timed out (parallel.timeout_s={timeout_s:g}): a rank is missing, stuck or unreachable. "
            f"Check that every node reaches MASTER_ADDR={addr}:{port}; on machines with several network "
            "interfaces set NCCL_SOCKET_IFNAME (nccl) / GLOO_SOCKET_IFNAME (gloo) to the one the nodes share "
            "(e.g. eth0, ib0); look for a rank that failed earlier in the logs; raise parallel.timeout_s if a "
            f"rank legitimately takes longer. The error was: {err}") from err


def _attempt_store(rank: int, world: int, timeout: datetime.timedelta):
    """The launcher's store under a prefix per torchrun restart.

    After a restart the new workers reach the same agent store as the failed attempt (torch 2.13,
    --standalone and c10d rendezvous sharing the agent's store, the default), where gloo finds the
    dead workers' addresses under the default keys and fails to connect ("Connection refused" to a
    port of the old attempt) or hangs. A prefix with TORCHELASTIC_RESTART_COUNT gives each attempt
    its own keys. That count is per agent, and agents restarted by a change of membership do not
    count it up, so on several nodes agents can disagree: there, TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
    (set for torchrun) gives every rendezvous round a fresh store on a new port, and no prefix is used.
    """
    store, _, _ = next(dist.rendezvous("env://", rank, world, timeout=timeout))
    return dist.PrefixStore(attempt_prefix(), store)


def attempt_prefix() -> str:
    """The key prefix of this torchrun attempt in the launcher's store: per restart when the workers share the
    agent's store (``_attempt_store``), else one (every rendezvous round then has a fresh store)."""
    shared = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    return f"dsoft/attempt-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0') if shared else '0'}"


def _warn_if_restarts_can_hang(rank: int) -> None:
    """Several nodes sharing the agents' store with restarts allowed: a restart can hang (_attempt_store)."""
    if rank == 0 and _env_int("GROUP_WORLD_SIZE", 1) > 1 and _env_int("TORCHELASTIC_MAX_RESTARTS", 0) > 0:
        log.warning("torchrun on %s nodes with --max-restarts and the agents' shared store: after a failure the "
                    "nodes' restart counts can differ and the restarted workers wait for each other forever. "
                    "Export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 for torchrun (launch/multinode.sh does)",
                    os.environ["GROUP_WORLD_SIZE"])


def shutdown_distributed() -> None:
    """Barrier (no rank tears the group down while another still has a collective in flight), then destroy."""
    if dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()


@contextmanager
def distributed(backend: str = "auto", timeout_s: float = 1800.0) -> Iterator[DistEnv]:
    """``init_distributed`` on entry; on a clean exit a barrier and the group's teardown. A collective
    timeout inside is re-raised with what to check (``explain_timeouts``).

    On an exception the group is destroyed without the barrier (the other ranks may never
    reach it), and the exception propagates so the launcher reports this rank's traceback.
    """
    env = init_distributed(backend, timeout_s)
    try:
        with explain_timeouts("a collective", timeout_s):
            yield env
    except BaseException:
        if dist.is_initialized():
            dist.destroy_process_group()
        raise
    shutdown_distributed()


def release_collected() -> None:
    """Collects garbage cycles now, while the interpreter is whole.

    A process group still referenced from a cycle (a DDP wrapper, a trainer) would otherwise be
    freed during interpreter shutdown, when gloo's worker threads can no longer take the GIL
    and the process aborts ("terminate called without an active exception").
    """
    gc.collect()


def _child(local_rank: int, nproc: int, port: int, start_method: str, fn: Callable, args: tuple) -> None:
    os.environ.update(RANK=str(local_rank), LOCAL_RANK=str(local_rank), WORLD_SIZE=str(nproc),
                      LOCAL_WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # a spawned child inherits "spawn" as its default start method; a torchrun worker has the platform's
    # default (fork on Linux). Restore the parent's, so DataLoader workers start as under torchrun (each
    # spawned worker would re-import torch and the pipeline: seconds per worker per epoch).
    multiprocessing.set_start_method(start_method, force=True)
    die_with_parent()  # a local rank ends with the process that spawned it, as a torchrun worker does
    try:
        fn(*args)
    finally:  # also when fn ends the rank with SystemExit (a preempted rank's 75): the exit is the same shutdown
        release_collected()


def spawn_local(fn: Callable, nproc: int, args: tuple = ()) -> None:
    """Runs ``fn(*args)`` in ``nproc`` fresh processes on this machine with torchrun's variables set.

    ``fn`` must be importable (spawn pickles it by name) and calls ``init_distributed`` /
    ``distributed`` itself. A failing rank makes this raise (torch's ProcessRaisedException,
    with that rank's traceback); the other ranks are terminated.
    """
    if nproc < 1:
        raise ValueError(f"nproc={nproc} is invalid: must be >= 1")
    if under_launcher():
        raise RuntimeError("spawn_local was called inside a launched rank (RANK and WORLD_SIZE are set): "
                           "run the worker directly, the launcher already started the ranks")
    import torch.multiprocessing as mp

    parent_method = multiprocessing.get_start_method()
    context = mp.start_processes(_child, args=(nproc, free_port(), parent_method, fn, args), nprocs=nproc,
                                 start_method="spawn", join=False)
    with _ForwardSignals(context.processes):
        try:
            # a rank that exits first (a preemption's exit 75) leaves the others time to finish theirs
            while not context.join(grace_period=RANK_EXIT_GRACE_S):
                pass
        except KeyboardInterrupt:  # the second signal: the ranks are killed, none is left behind
            for process in context.processes:
                if process.is_alive():
                    process.kill()
                process.join()
            raise


RANK_EXIT_GRACE_S = 10.0


class _ForwardSignals:
    """While local ranks run, SIGINT and SIGTERM to their parent reach them as SIGTERM (a trainer rank then
    checkpoints at the next step and exits 75, as under torchrun, which forwards the same way); a second
    signal kills them and raises KeyboardInterrupt here. A Ctrl-C in a terminal reaches the ranks directly
    too (one process group): SIGTERM, not SIGINT, is forwarded so that it does not count as their second."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, processes):
        self.processes, self.received, self._previous = processes, 0, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, _frame) -> None:
        self.received += 1
        if self.received > 1:
            raise KeyboardInterrupt
        log.warning("%s: asking the %d local ranks to checkpoint after their current step and exit (send it "
                    "again to stop them at once)", signal.Signals(signum).name, len(self.processes))
        for process in self.processes:
            if process.is_alive():
                os.kill(process.pid, signal.SIGTERM)


def _rank_with_user_errors(command: str, error_dir: str, fn, *args) -> None:
    """``fn(*args)`` in a rank ``spawn_ranks`` started: a user error is written as one line to
    ``error_dir/rank<R>.txt`` for the parent to print once, and the rank exits 2 (so the parent does not
    re-raise every rank's traceback); a non-zero return code becomes the rank's exit code."""
    try:
        code = fn(*args)
    except user_errors() as err:
        if traceback_wanted():
            raise
        with open(os.path.join(error_dir, f"rank{os.environ['RANK']}.txt"), "w", encoding="utf-8") as fh:
            fh.write(error_line(command, err))
        code = USER_ERROR_EXIT
    if code:
        raise SystemExit(code)


def spawn_ranks(command: str, fn, nproc: int, args: tuple = (), stopped_note: str = "") -> int:
    """Runs ``fn(*args)`` (importable: spawn pickles it by name) in ``nproc`` local ranks
    (``spawn_local``). Returns 0; or 2 after printing once, as ``command: error: ...``, the
    user error of the failing rank, or of the first rank that wrote one (a rank that met a user error inside a
    collective makes the others fail too, and any of them may be seen first); or 128 + N with a message when a
    rank was stopped by SIGINT/SIGTERM (signal N) before it could install handlers of its own (``stopped_note``
    says what to do then). Any other failure is re-raised."""
    import tempfile  # noqa: PLC0415

    from torch.multiprocessing.spawn import ProcessException  # noqa: PLC0415

    from dsoft_dist.parallel.processes import spawn_local  # noqa: PLC0415

    with tempfile.TemporaryDirectory(prefix="dsoft-rank-errors-") as error_dir:
        try:
            spawn_local(_rank_with_user_errors, nproc, (command, error_dir, fn, *args))
        except ProcessException as err:  # a rank exited (ProcessExitedException) or raised
            if getattr(err, "exit_code", 0) < 0 and err.signal_name in ("SIGINT", "SIGTERM"):
                sys.stderr.write(f"{command}: local rank {err.error_index} was stopped by {err.signal_name} while "
                                 f"starting{'; ' + stopped_note if stopped_note else ''}\n")
                return 128 - err.exit_code
            reports = [f"rank{err.error_index}.txt"] + sorted(os.listdir(error_dir))
            report = next((os.path.join(error_dir, r) for r in reports if os.path.isfile(os.path.join(error_dir, r))),
                          None)
            if report is None:  # no rank met a user error: a bug, re-raised with its traceback
                raise
            with open(report, encoding="utf-8") as fh:
                sys.stderr.write(fh.read() + "\n")
            return USER_ERROR_EXIT
    return 0
