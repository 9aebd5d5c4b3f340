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

import copy

from dsoft_dist.cli import USER_ERROR_EXIT, report_user_error
from dsoft_dist.config import apply_overrides, config_from_dict, load_config
from dsoft_dist.config.schema import ConfigError
from dsoft_dist.observability import get_logger
from dsoft_dist.train.cli import add_run_arguments, launch, overrides

log = get_logger(__name__)

DEMO_CONFIG = {  # configs/demo.yaml holds the same values (a test checks it)
    "name": "demo", "seed": 0,
    "model": {"name": "iresnet_tiny", "embedding_size": 128, "input_size": 32},
    "head": {"loss": "d_softmax", "negatives": "all", "scale": 32.0, "end_point": 0.9},
    "data": {"source": "synthetic", "synthetic_mode": "images", "num_classes": 500, "samples_per_class": 16,
             "image_size": 32, "batch_size": 64, "num_workers": 0},
    "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 5.0e-4},
    "schedule": {"steps": 300, "warmup_steps": 20, "decay": "cosine"},
    "parallel": {"nproc": 2, "backend": "gloo"},
    "logging": {"output_dir": "runs/demo", "log_every": 30},
    "eval": {"at_start": True, "every_steps": 100, "synthetic_identities": 100, "synthetic_pairs": 600},
}
# what `dsoft demo` adds (before the user's --set, which may change it): a rerun replaces the previous demo
# run. Not in the config itself, which `dsoft train` users start their own runs from (and resume).
DEMO_RERUN = ["logging.overwrite=true"]


def demo_config(sets: list[str]) -> dict:
    """The embedded demo config with ``--set`` overrides applied, as a dict (validated by config_from_dict).

    A ``schedule.steps`` shrunk below the demo's warmup (20 steps) takes a warmup of steps // 10 instead
    (one log line says so), unless ``schedule.warmup_steps`` is set too: then that value stands.
    """
    data = apply_overrides(copy.deepcopy(DEMO_CONFIG), sets)
    schedule = data.get("schedule")
    warmup_given = any(s.split("=", 1)[0].strip() == "schedule.warmup_steps" for s in sets)
    if isinstance(schedule, dict) and not warmup_given:
        steps, warmup = schedule.get("steps"), schedule.get("warmup_steps")
        if isinstance(steps, int) and not isinstance(steps, bool) and 0 < steps < warmup:
            schedule["warmup_steps"] = steps // 10
            log.info("schedule.steps=%d is below the demo's warmup of %d steps: warmup scaled to %d "
                     "(--set schedule.warmup_steps=N to choose)", steps, warmup, steps // 10)
    return data


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
