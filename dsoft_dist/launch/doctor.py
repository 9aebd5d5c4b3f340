"""``dsoft doctor``: a pre-flight check to run on every node before a long (multi-node) job.

    dsoft doctor --set checkpoint.dir=/shared/run1/checkpoints        # this node, a one-node job
    dsoft doctor --config my.yaml --nnodes 4 --node-rank 0 --master-addr 10.0.0.1 --master-port 29500
    srun --ntasks-per-node 1 dsoft doctor --config my.yaml             # every node of a Slurm allocation

Checks, one line each (``ok`` | ``warn`` | ``FAIL``, the check, what was found, the fix for a problem):
versions (python, torch, CUDA, NCCL, Triton, dsoft_dist), GPUs against ``parallel.backend``, network
interfaces against NCCL_SOCKET_IFNAME / GLOO_SOCKET_IFNAME, the rendezvous address (MASTER_ADDR: it
resolves, and is not a loopback address when several nodes are expected), the rendezvous port
(MASTER_PORT is free on node rank 0), the training data (the manifest loads and agrees with the
config, every local shard exists), the run folder (a new run, the run it holds continued, or a
start that would mix two runs), the checkpoint folder (created, writable, seen by every node) and
the free disk for the checkpoints kept. Exit code 1 when a check failed, 2 for a config that does
not load, else 0. Nothing is trained and no process group is started.

The folder check leaves a small marker file ``.dsoft-doctor-<hostname>`` (a few hundred bytes) in
the checkpoint folder: the run on the next node lists the markers to tell whether the folder is
shared. Checkpoints ignore them; delete them whenever you like.

This module reads the job's layout and runs the checks; each check is in ``dsoft_dist.launch.doctor_checks``.
"""
from __future__ import annotations

import os
import socket
import sys

from dsoft_dist.launch.doctor_checks import (
    FAIL,
    OK,
    Check,
    Site,
    backend_of,
    check_checkpoint_folder,
    check_data,
    check_disk,
    check_gpus,
    check_hostname,
    check_master_addr,
    check_network,
    check_port,
    check_run_folder,
    check_versions,
    checkpoint_root,
    interfaces,
)

DEFAULT_MASTER_ADDR, DEFAULT_MASTER_PORT = "127.0.0.1", 29500


# ---------------------------------------------------------------- the job's layout (arguments, environment)


def _first_env(names: tuple[str, ...]) -> tuple[str, str] | None:
    """(name, value) of the first variable in ``names`` that is set and not empty."""
    for name in names:
        if os.environ.get(name, "").strip():
            return name, os.environ[name].strip()
    return None


def parse_nnodes(raw: str, source: str) -> int:
    """The most nodes ``raw`` allows: ``N`` or torchrun's elastic ``MIN:MAX`` (the MAX)."""
    try:
        counts = [int(part) for part in raw.split(":")]
    except ValueError:
        counts = []
    if not 1 <= len(counts) <= 2 or min(counts) < 1:
        raise ValueError(f"{source}={raw!r} is invalid: give a node count >= 1, e.g. 4, or MIN:MAX, e.g. 2:4")
    return max(counts)


def resolve_site(args) -> Site:
    """The job layout from the options, else the launcher's environment, else one node on 127.0.0.1:29500.

    Raises ValueError naming the option or variable when a value is not a number.
    """
    if args.nnodes is not None:
        nnodes, nnodes_source = parse_nnodes(args.nnodes, "--nnodes"), "--nnodes"
    else:
        found = _first_env(("NNODES", "SLURM_NNODES", "SLURM_JOB_NUM_NODES"))
        nnodes, nnodes_source = (parse_nnodes(found[1], found[0]), found[0]) if found else (1, "default")
    rank_env = _first_env(("NODE_RANK", "SLURM_NODEID"))
    node_rank = args.node_rank if args.node_rank is not None else _as_int(rank_env, 0)
    if node_rank < 0:
        raise ValueError(f"node rank {node_rank} is invalid: give --node-rank 0 .. nnodes-1")
    addr_env = _first_env(("MASTER_ADDR",))
    master_addr = args.master_addr or (addr_env[1] if addr_env else DEFAULT_MASTER_ADDR)
    port = args.master_port if args.master_port is not None else _as_int(_first_env(("MASTER_PORT",)),
                                                                          DEFAULT_MASTER_PORT)
    return Site(nnodes, nnodes_source, node_rank, master_addr, port, socket.gethostname())


def _as_int(found: tuple[str, str] | None, default: int) -> int:
    if found is None:
        return default
    try:
        return int(found[1])
    except ValueError:
        raise ValueError(f"environment variable {found[0]}={found[1]!r} is not an integer: "
                         f"unset it or pass the value as an option") from None


# ---------------------------------------------------------------- the command


def run_checks(cfg, site: Site) -> list[Check]:
    """Every check, in order; none raises for a problem it finds (that is a FAIL result)."""
    backend = backend_of(cfg.parallel.backend)
    root = checkpoint_root(cfg)
    checks = [check_versions(), check_gpus(cfg.parallel.backend)]
    checks += check_network(interfaces(), backend, site.nnodes)
    checks += [check_master_addr(site), check_hostname(site), check_port(site)]
    checks += [check_data(cfg.data), check_run_folder(cfg)]
    checks += check_checkpoint_folder(root, site)
    checks.append(check_disk(cfg, root))
    return checks


def summary(checks: list[Check]) -> str:
    """``dsoft doctor: all checks passed`` or ``dsoft doctor: N problems (M blocking)``."""
    problems = [c for c in checks if c.status != OK]
    if not problems:
        return "dsoft doctor: all checks passed"
    blocking = sum(c.status == FAIL for c in problems)
    return f"dsoft doctor: {len(problems)} problem{'s' if len(problems) != 1 else ''} ({blocking} blocking)"


def _load(args):
    """The config as ``dsoft demo`` builds it: --config FILE, else the embedded demo; --set on top."""
    import copy

    from dsoft_dist.config import apply_overrides, config_from_dict, load_config
    from dsoft_dist.config.demo import DEMO_CONFIG
    from dsoft_dist.train.cli import overrides

    if args.config:
        return load_config(args.config, overrides(args))
    return config_from_dict(apply_overrides(copy.deepcopy(DEMO_CONFIG), overrides(args)))


def _main(args) -> int:
    from dsoft_dist.errors import USER_ERROR_EXIT, ConfigError, report_user_error

    try:
        cfg = _load(args)
        site = resolve_site(args)
    except (ConfigError, ValueError) as err:
        report_user_error("dsoft doctor", err)  # one line; DSOFT_TRACEBACK=1 re-raises
        return USER_ERROR_EXIT
    checks = run_checks(cfg, site)
    sys.stdout.write("\n".join(c.line() for c in checks) + "\n" + summary(checks) + "\n")
    return 1 if any(c.status == FAIL for c in checks) else 0


def register(subparsers) -> None:
    """Adds ``dsoft doctor``."""
    from dsoft_dist.train.cli import add_run_arguments

    parser = subparsers.add_parser("doctor", help="pre-flight check of this node for a (multi-node) job",
                                   description=__doc__.split("\n\n")[0])
    add_run_arguments(parser, config_required=False)
    parser.add_argument("--nnodes", default=None, metavar="N|MIN:MAX",
                        help="nodes in the job (default: NNODES, SLURM_NNODES or SLURM_JOB_NUM_NODES, else 1)")
    parser.add_argument("--node-rank", type=int, default=None,
                        help="this node's rank (default: NODE_RANK or SLURM_NODEID, else 0); only 0 binds the port")
    parser.add_argument("--master-addr", default=None, help="rendezvous host (default: MASTER_ADDR, else 127.0.0.1)")
    parser.add_argument("--master-port", type=int, default=None,
                        help="rendezvous port (default: MASTER_PORT, else 29500)")
    parser.set_defaults(func=_main)
