"""``dsoft demo``: the embedded default job, a thin client of the trainer (``dsoft train``).

Trains a tiny IResNet with the class-sharded D-Softmax head on procedural synthetic
identities in ``parallel.nproc`` real gloo processes (DDP backbone, model-parallel head),
verifying on identities never seen in training (10-fold protocol on a .bin built from the
synthetic evaluation range) before and after training, and prints the report.

    dsoft demo                                            # the embedded default (= configs/demo.yaml)
    dsoft demo --set head.negatives=random --set head.sample_rate=0.25
    dsoft demo --config configs/demo.yaml --nproc 1 --set schedule.steps=50
    dsoft demo --set schedule.steps=10                    # fewer steps than the warmup: warmup 10 // 10 = 1

It is ``dsoft train --config configs/demo.yaml --overwrite``: a rerun replaces the previous demo
run (``--resume auto`` continues it instead). Outputs under
``logging.output_dir``: metrics.jsonl, report.md, report.json, curves.png, backbone.pt, head/.
"""
from __future__ import annotations

from dsoft_dist.config import config_from_dict, load_config
from dsoft_dist.config.demo import demo_config
from dsoft_dist.errors import USER_ERROR_EXIT, ConfigError, report_user_error
from dsoft_dist.observability import get_logger
from dsoft_dist.train.cli import add_run_arguments, launch, overrides

log = get_logger(__name__)

# what `dsoft demo` adds (before the user's --set, which may change it): a rerun replaces the previous demo
# run. Not in the config itself, which `dsoft train` users start their own runs from (and resume).
DEMO_RERUN = ["logging.overwrite=true"]


def _main(args) -> int:
    sets = ([] if args.resume else DEMO_RERUN) + overrides(args)  # --resume: the user continues a demo run
    try:
        if args.config:
            cfg = load_config(args.config, sets)
        else:
            cfg = config_from_dict(demo_config(sets))
        if cfg.parallel.backend == "nccl":
            raise ConfigError("parallel.backend='nccl' is invalid for dsoft demo: it runs on CPU with gloo; "
                              "use dsoft train for GPU runs")
    except ConfigError as err:
        report_user_error("dsoft demo", err)  # one line; DSOFT_TRACEBACK=1 re-raises
        return USER_ERROR_EXIT
    return launch(cfg)


def register(subparsers) -> None:
    """Adds ``dsoft demo``."""
    parser = subparsers.add_parser("demo", help="train D-Softmax on synthetic identities on CPU ranks, verify, report",
                                   description=" ".join(__doc__.split("\n\n")[1].split()) + " The same job as "
                                   "dsoft train --config configs/demo.yaml --overwrite (a rerun replaces the previous "
                                   "demo run); dsoft config show demo prints its config.")
    add_run_arguments(parser, config_required=False)
    parser.set_defaults(func=_main)
