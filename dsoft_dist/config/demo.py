"""The embedded demo config, the one ``dsoft demo`` runs and ``dsoft config show demo`` prints.

    cfg = config_from_dict(demo_config(["head.scale=16"]))   # --set overrides applied, warmup scaled to fit

``configs/demo.yaml`` holds the same values (``tests/test_demo.py`` checks it).
"""
from __future__ import annotations

import copy

from dsoft_dist.config.loader import apply_overrides
from dsoft_dist.observability import get_logger

log = get_logger(__name__)

DEMO_CONFIG = {  # configs/demo.yaml holds the same values (a test checks it)
    "name": "demo", "seed": 0,
    "model": {"name": "iresnet_tiny", "embedding_size": 128, "input_size": 32},
    "head": {"loss": "d_softmax", "negatives": "all", "scale": 32.0, "inter_weight_end": 0.5},
    "data": {"source": "synthetic", "synthetic_mode": "images", "num_classes": 500, "samples_per_class": 16,
             "image_size": 32, "batch_size": 64, "num_workers": 0},
    "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 5.0e-4},
    "schedule": {"steps": 300, "warmup_steps": 20, "decay": "cosine"},
    "parallel": {"nproc": 2, "backend": "gloo"},
    "logging": {"output_dir": "runs/demo", "log_every": 30},
    "eval": {"at_start": True, "every_steps": 100, "synthetic_identities": 100, "synthetic_pairs": 600},
}


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
