"""``dsoft train``: the trainer's entry point, single process, local ranks or under torchrun.

    dsoft train --config configs/demo.yaml                      # parallel.nproc local ranks (spawned here)
    dsoft train --config configs/demo.yaml --nproc 1 --set schedule.steps=50
    torchrun --nproc-per-node 8 -m dsoft_dist.train --config configs/ms1m_r50_dsoftmax_k64.yaml

Under torchrun (RANK/WORLD_SIZE set) the launcher's ranks are used and ``--nproc`` /
``parallel.nproc`` are ignored. ``init_process_group`` happens only inside ``run_rank``.
"""
from __future__ import annotations

import argparse
import sys

from torch.distributed.elastic.multiprocessing.errors import record

from dsoft_dist.config import config_from_dict, config_to_dict, load_config
from dsoft_dist.config.schema import Config, ConfigError
from dsoft_dist.observability import get_logger

log = get_logger(__name__)


@record
def run_rank(cfg_dict: dict) -> None:
    """One rank of a run: start-up, train, report (rank 0 prints it), teardown."""
    from dsoft_dist.train.distributed import distributed, release_collected
    from dsoft_dist.train.trainer import Trainer

    cfg = config_from_dict(cfg_dict)
    with distributed(cfg.parallel.backend, cfg.parallel.timeout_s) as env:
        trainer = Trainer(cfg, env)
        try:
            summary = trainer.train()
        except BaseException:
            # keep the preemption handlers: a launcher's SIGTERM (torchrun stopping the other workers after
            # one failed) must not end this process while @record writes its error file
            trainer.close(restore_signals=False)
            raise
        trainer.close()
    if env.is_main:
        sys.stdout.write(summary["report"] + f"Written to {cfg.logging.output_dir}/ (report.md, report.json, "
                         "curves.png, metrics.jsonl, backbone.pt, head/); checkpoints in "
                         f"{trainer.checkpointer.root}\n")
    del trainer
    release_collected()


def launch(cfg: Config) -> int:
    """Runs ``cfg``: in this process under a launcher or for nproc=1, else in parallel.nproc local ranks.

    Returns 0, or PREEMPTED_EXIT_CODE when a preemption signal stopped the run after its checkpoint.
    """
    import torch.multiprocessing as mp

    from dsoft_dist.train.distributed import spawn_local, under_launcher
    from dsoft_dist.train.preempt import PREEMPTED_EXIT_CODE, Preempted

    cfg_dict = config_to_dict(cfg)
    try:
        if under_launcher():
            if cfg.parallel.nproc > 1:
                log.info("under a launcher: its world size is used, parallel.nproc=%d is ignored", cfg.parallel.nproc)
            run_rank(cfg_dict)
        elif cfg.parallel.nproc > 1:
            spawn_local(run_rank, cfg.parallel.nproc, (cfg_dict,))
        else:
            run_rank(cfg_dict)
    except Preempted:
        return PREEMPTED_EXIT_CODE
    except mp.ProcessExitedException as err:
        if err.exit_code == PREEMPTED_EXIT_CODE:
            return PREEMPTED_EXIT_CODE
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
                        help="= --set checkpoint.init_from=PATH: start from a checkpoint's weights (fine-tuning)")


def overrides(args) -> list[str]:
    """The --set list with --nproc, --resume and --init-from folded in."""
    extra = [(f"parallel.nproc={args.nproc}", args.nproc), (f"checkpoint.resume={args.resume}", args.resume),
             (f"checkpoint.init_from={args.init_from}", args.init_from)]
    return list(args.set) + [item for item, given in extra if given is not None]


def _main(args) -> int:
    from dsoft_dist.train.distributed import resolve_backend

    try:
        cfg = load_config(args.config, overrides(args))
    except ConfigError as err:
        sys.stderr.write(f"dsoft train: {err}\n")
        return 1
    try:
        resolve_backend(cfg.parallel.backend)  # refused here, before any rank starts
    except ValueError as err:
        sys.stderr.write(f"dsoft train: {err}\n")
        return 2
    return launch(cfg)


def build_parser() -> argparse.ArgumentParser:
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
    """``python -m dsoft_dist.train``."""
    return _main(build_parser().parse_args(argv))
