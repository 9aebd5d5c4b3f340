"""Metrics sinks: one JSON object per line in ``metrics.jsonl`` and, optionally, wandb.

    sink = MetricsSink("runs/demo", wandb_mode="offline", project="dsoft-dist", config=cfg_dict)
    sink.log(step, {"loss": 3.2, "intra": 1.1, "inter": 2.1})
    sink.close()

wandb is imported only when wandb_mode is "offline" or "online"; offline runs write
under ``<output_dir>/wandb`` and need no network. Create the sink on one rank only.
"""
from __future__ import annotations

import json
import os
import time


class MetricsSink:
    """Appends ``{"step": s, "time": t, **metrics}`` lines; mirrors them to wandb when enabled."""

    def __init__(self, output_dir: str, wandb_mode: str = "disabled", project: str = "dsoft-dist",
                 run_name: str | None = None, config: dict | None = None):
        if wandb_mode not in ("disabled", "offline", "online"):
            raise ValueError(f"wandb_mode={wandb_mode!r} is invalid; use disabled, offline or online")
        os.makedirs(output_dir, exist_ok=True)
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self._file = open(self.path, "a", encoding="utf-8")
        self._wandb = None
        if wandb_mode != "disabled":
            import wandb

            self._wandb = wandb.init(project=project, name=run_name, config=config, mode=wandb_mode, dir=output_dir)

    def log(self, step: int, metrics: dict) -> None:
        """Writes one line (floats only; tensors must be converted by the caller)."""
        row = {"step": int(step), "time": round(time.time(), 3), **metrics}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self._wandb is not None:
            self._wandb.log(metrics, step=int(step))

    def close(self) -> None:
        self._file.close()
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
