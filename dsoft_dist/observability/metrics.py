"""Metrics sinks: one JSON object per line in ``metrics.jsonl`` and, optionally, wandb and TensorBoard.

    sink = MetricsSink("runs/demo", wandb_mode="offline", project="dsoft-dist", config=cfg_dict,
                       tensorboard=True)
    sink.log(step, {"loss": 3.2, "intra": 1.1, "inter": 2.1})
    sink.close()

wandb is imported only when wandb_mode is "offline" or "online"; offline runs write
under ``<output_dir>/wandb`` and need no network. TensorBoard (``tensorboard=True``, an optional
dependency: ``pip install tensorboard``) gets every numeric value of a row as a scalar under the
row's own key, in ``<output_dir>/tensorboard/``: ``tensorboard --logdir <output_dir>/tensorboard``.
``purge_step`` s makes TensorBoard drop the events earlier writers in that folder logged at steps
>= s (a resumed run passes its first step past the checkpoint, a fresh one 0), as the trainer
drops those rows of metrics.jsonl.
Create the sink on one rank only.
"""
from __future__ import annotations

import importlib.util
import json
import os
import time

TENSORBOARD_DIR = "tensorboard"


def require_tensorboard() -> None:
    """Raises ValueError naming the fix when TensorBoard is not installed (call it on every rank, before
    training, so no rank starts a run that one rank cannot log)."""
    if importlib.util.find_spec("tensorboard") is None:
        raise ValueError("logging.tensorboard=true needs TensorBoard, which is not installed: "
                         "pip install tensorboard (or pip install 'dsoft_dist[tensorboard]'), "
                         "or set logging.tensorboard=false")


def _scalars(metrics: dict) -> dict[str, float]:
    """The numbers of a row, NaN included as metrics.jsonl has it (TensorBoard takes scalars only; a flag
    such as "eval" is not a metric)."""
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


class MetricsSink:
    """Appends ``{"step": s, "time": t, **metrics}`` lines; mirrors them to wandb and TensorBoard when enabled."""

    def __init__(self, output_dir: str, wandb_mode: str = "disabled", project: str = "dsoft-dist",
                 run_name: str | None = None, config: dict | None = None, tensorboard: bool = False,
                 purge_step: int | None = None):
        if wandb_mode not in ("disabled", "offline", "online"):
            raise ValueError(f"wandb_mode={wandb_mode!r} is invalid; use disabled, offline or online")
        os.makedirs(output_dir, exist_ok=True)
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self._file = open(self.path, "a", encoding="utf-8")
        self._wandb = None
        if wandb_mode != "disabled":
            import wandb

            self._wandb = wandb.init(project=project, name=run_name, config=config, mode=wandb_mode, dir=output_dir)
        self._tensorboard = None
        if tensorboard:
            require_tensorboard()
            from torch.utils.tensorboard import SummaryWriter

            self._tensorboard = SummaryWriter(os.path.join(output_dir, TENSORBOARD_DIR), purge_step=purge_step)

    def log(self, step: int, metrics: dict) -> None:
        """Writes one line (floats only; tensors must be converted by the caller)."""
        row = {"step": int(step), "time": round(time.time(), 3), **metrics}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self._wandb is not None:
            self._wandb.log(metrics, step=int(step))
        if self._tensorboard is not None:
            for key, value in _scalars(metrics).items():
                self._tensorboard.add_scalar(key, value, global_step=int(step))

    def close(self) -> None:
        self._file.close()
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
