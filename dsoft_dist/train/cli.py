"""``dsoft train``: the trainer's entry point, single process, local ranks or under torchrun.

    dsoft train --config configs/demo.yaml                      # parallel.nproc local ranks (spawned here)
    dsoft train --config configs/demo.yaml --nproc 1 --set schedule.steps=50
    torchrun --nproc-per-node 8 -m dsoft_dist.train --config configs/ms1m_r50_dsoftmax_k64.yaml

Under torchrun (RANK/WORLD_SIZE set) the launcher's ranks are used and ``--nproc`` /
``parallel.nproc`` are ignored. ``init_process_group`` happens only inside ``run_rank``.
User errors are reported on one line (``dsoft train: error: ...``, exit 2): a bad config, a
missing manifest or shard, or a run folder holding another run (``preflight``) before any rank
starts (by rank 0 alone under torchrun, which then adds its own failure summary); a bad path or
value found inside the ranks ``dsoft train`` spawns, once, by the parent. ``DSOFT_TRACEBACK=1``
shows the tracebacks. Ctrl-C or SIGTERM checkpoints after the current step and exits 75 (on local
ranks too: their parent passes the signal on); a second Ctrl-C stops at once.
"""
from __future__ import annotations

import argparse
import os
import sys

from torch.distributed.elastic.multiprocessing.errors import record

from dsoft_dist.config import config_from_dict, config_to_dict, load_config
from dsoft_dist.config.schema import Config
from dsoft_dist.errors import ConfigError
from dsoft_dist.observability import get_logger

log = get_logger(__name__)


@record
def run_rank(cfg_dict: dict) -> None:
    """One rank of a run: start-up, train, report (rank 0 prints it), teardown."""
    from dsoft_dist.parallel.processes import distributed, release_collected
    from dsoft_dist.train.trainer import Trainer

    cfg = config_from_dict(cfg_dict)
    with distributed(cfg.parallel.backend, cfg.parallel.timeout_s) as env:
        trainer = Trainer(cfg, env)
        try:
            summary = trainer.train()
        except BaseException as err:
            if isinstance(err, KeyboardInterrupt) and env.is_main:  # a second Ctrl-C
                saved = trainer.checkpointer.written_step
                log.warning("stopped at once after step %d, without a checkpoint; %s", trainer.state.step,
                            f"the newest is step {saved} in {trainer.checkpointer.root} (the same command resumes "
                            "it)" if saved is not None else "none was written: the next run starts afresh")
            # keep the preemption handlers: a launcher's SIGTERM (torchrun stopping the other workers after
            # one failed) must not end this process while @record writes its error file
            trainer.close(restore_signals=False)
            del trainer  # the traceback keeps this frame: drop the run (its process group) for release_collected
            raise
        trainer.close()
    if env.is_main:
        sys.stdout.write(summary["report"] + f"Written to {cfg.logging.output_dir}/ (report.md, report.json, "
                         "curves.png, metrics.jsonl, backbone.pt, head/); checkpoints in "
                         f"{trainer.checkpointer.root}\n")
    del trainer
    release_collected()


def _spawn(cfg_dict: dict, nproc: int) -> int:
    """``nproc`` local ranks of ``run_rank``; 0, or 2 after printing the first failing rank's user error once."""
    from dsoft_dist.parallel.processes import spawn_ranks

    return spawn_ranks("dsoft train", run_rank, nproc, (cfg_dict,),
                       stopped_note="before it could checkpoint; the same command starts again from the newest "
                                    "checkpoint, if there is one")


def preflight(cfg: Config) -> None:
    """What can be checked before any rank starts, in a second instead of after the ranks' start-up: the
    data's manifest and local shards, TensorBoard when asked for, checkpoint.init_from, and whether
    logging.output_dir may take this run (``runfolder``). Raises ValueError / OSError naming the fix."""
    from dsoft_dist.data.pipeline import check_shards
    from dsoft_dist.errors import CheckpointError
    from dsoft_dist.train.checkpoint import init_source
    from dsoft_dist.train.runfolder import check_run_folder

    if cfg.data.source == "webdataset":
        check_shards(cfg.data)
    if cfg.logging.tensorboard:
        from dsoft_dist.observability.metrics import require_tensorboard

        require_tensorboard()
    if cfg.checkpoint.init_from:
        try:
            init_source(cfg.checkpoint.init_from)
        except CheckpointError as err:
            raise ValueError(str(err)) from err
    problem = check_run_folder(cfg)
    if problem is not None:
        raise ValueError(problem)


def launch(cfg: Config) -> int:
    """Runs ``cfg``: in this process under a launcher or for nproc=1, else in parallel.nproc local ranks.

    Returns 0, PREEMPTED_EXIT_CODE when a preemption signal (or Ctrl-C) stopped the run after its
    checkpoint, HUNG_EXIT_CODE when local ranks stopped on a hung rank (their watchdog logged why), or 2
    for a user error found before the ranks start (``preflight``) or by a spawned rank
    (printed once, on one line).
    """
    import torch.multiprocessing as mp

    from dsoft_dist.errors import HUNG_EXIT_CODE, PREEMPTED_EXIT_CODE, USER_ERROR_EXIT
    from dsoft_dist.parallel.processes import under_launcher
    from dsoft_dist.train.preempt import Preempted

    try:
        preflight(cfg)
    except (OSError, ValueError) as err:
        _refuse(err)
        return USER_ERROR_EXIT
    cfg_dict = config_to_dict(cfg)
    try:
        if under_launcher():
            if cfg.parallel.nproc > 1:
                log.info("under a launcher: its world size is used, parallel.nproc=%d is ignored", cfg.parallel.nproc)
            run_rank(cfg_dict)
        elif cfg.parallel.nproc > 1:
            return _spawn(cfg_dict, cfg.parallel.nproc)
        else:
            run_rank(cfg_dict)
    except Preempted:
        return PREEMPTED_EXIT_CODE
    except mp.ProcessExitedException as err:
        if err.exit_code in (PREEMPTED_EXIT_CODE, HUNG_EXIT_CODE):  # each told the user why, once
            return err.exit_code
        raise
    return 0


def add_run_arguments(parser: argparse.ArgumentParser, config_required: bool) -> None:
    """--config, --set and --nproc (shared by ``dsoft train`` and ``dsoft demo``)."""
    parser.add_argument("--config", required=config_required, default=None,
                        help="YAML config" + ("" if config_required else " (default: the embedded demo)"))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="dotted override, e.g. --set head.negatives=random (repeatable)")
    parser.add_argument("--nproc", type=int, default=None,
                        help="local ranks to spawn (= --set parallel.nproc=N; ignored under torchrun)")
    parser.add_argument("--resume", default=None, metavar="auto|never|PATH",
                        help="= --set checkpoint.resume=...: auto (default) takes the newest checkpoint that verifies")
    parser.add_argument("--init-from", default=None, metavar="PATH",
                        help="= --set checkpoint.init_from=PATH: start from the weights of a checkpoint, a run "
                        "folder or a backbone.pt (fine-tuning)")
    parser.add_argument("--overwrite", action="store_true", default=None,
                        help="= --set logging.overwrite=true: delete the run already in logging.output_dir first")


def overrides(args) -> list[str]:
    """The --set list with --nproc, --resume, --init-from and --overwrite folded in."""
    extra = [(f"parallel.nproc={args.nproc}", args.nproc), (f"checkpoint.resume={args.resume}", args.resume),
             (f"checkpoint.init_from={args.init_from}", args.init_from), ("logging.overwrite=true", args.overwrite)]
    return list(args.set) + [item for item, given in extra if given is not None]


def _refuse(err: Exception) -> None:
    """One ``dsoft train: error: ...`` line, written once: by rank 0 alone under torchrun (every rank loads the
    same config, so the other ranks would only repeat it)."""
    from dsoft_dist.errors import report_user_error, traceback_wanted

    if os.environ.get("RANK", "0") == "0" or traceback_wanted():
        report_user_error("dsoft train", err)


def _main(args) -> int:
    from dsoft_dist.errors import USER_ERROR_EXIT
    from dsoft_dist.parallel.processes import resolve_backend

    try:
        cfg = load_config(args.config, overrides(args))
    except ConfigError as err:
        _refuse(err)
        return USER_ERROR_EXIT
    try:
        resolve_backend(cfg.parallel.backend)  # refused here, before any rank starts
    except ValueError as err:
        _refuse(err)
        return USER_ERROR_EXIT
    return launch(cfg)


def build_parser() -> argparse.ArgumentParser:
    """``python -m dsoft_dist.train``'s parser (the same arguments as ``dsoft train``)."""
    parser = argparse.ArgumentParser(prog="dsoft train", description="train a backbone with the sharded head")
    add_run_arguments(parser, config_required=True)
    return parser


def register(subparsers) -> None:
    """Adds ``dsoft train``."""
    parser = subparsers.add_parser("train", help="train a backbone with the class-sharded head (DDP or DeepSpeed)",
                                   description=__doc__.split("\n\n")[0])
    add_run_arguments(parser, config_required=True)
    parser.set_defaults(func=_main)


def main(argv: list[str] | None = None) -> int:
    """``python -m dsoft_dist.train`` (torchrun's target): user errors become one line, as under ``dsoft train``."""
    from dsoft_dist.errors import run_command

    return run_command("dsoft train", _main, build_parser().parse_args(argv))
