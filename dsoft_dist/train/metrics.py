"""What a run reports while it trains: one JSONL row per logged step, wandb, TensorBoard, the progress bar.

Rank 0 speaks; the other ranks only join the one small all-reduce that sums the bad-sample
counters at each logged step. Rows (``metrics.jsonl``, mirrored to wandb):

    {"step", "time", "loss", "intra", "inter", "target_cos", "hardest_neg_cos", "lr",
     "samples_per_s", "time_data", "time_backbone", "time_head", "time_optimizer",
     "memory_mb", "bad_samples", "skipped_steps"}                   # training rows
    {"step", "time", "eval": true, "<set>/accuracy", "<set>/val_at_far", ...}   # verification rows

wandb: ``WANDB_MODE`` (disabled | offline | online) wins over ``logging.wandb``; online
without an API key falls back to offline with a warning. ``logging.tensorboard`` writes the
same rows to ``<output_dir>/tensorboard/``; a resumed run drops the events past its checkpoint
there too. The progress bar is ``observability.progress``'s: drawn only when stderr is a
terminal (a redirected log gets a log line per logged step instead, and no bar lines).
"""
from __future__ import annotations

import json
import os

import torch
import torch.distributed as dist

from dsoft_dist.observability import get_logger
from dsoft_dist.observability.metrics import MetricsSink, require_tensorboard
from dsoft_dist.observability.progress import progress_bar
from dsoft_dist.utils import write_text_atomic

log = get_logger(__name__)


def resolve_wandb_mode(configured: str) -> str:
    """WANDB_MODE if set (disabled | offline | online; "dryrun" = offline), else ``configured``; online
    without WANDB_API_KEY (or a ~/.netrc login) becomes offline."""
    mode = os.environ.get("WANDB_MODE", "").strip().lower() or configured
    mode = {"dryrun": "offline", "run": "online"}.get(mode, mode)
    if mode not in ("disabled", "offline", "online"):
        raise ValueError(f"WANDB_MODE={mode!r} is invalid: use disabled, offline or online")
    if mode == "online" and not os.environ.get("WANDB_API_KEY") and not os.path.exists(os.path.expanduser("~/.netrc")):
        log.warning("wandb online needs a login (WANDB_API_KEY or `wandb login`): logging offline instead; "
                    "upload later with `wandb sync`")
        mode = "offline"
    return mode


def memory_mb(device: torch.device) -> float:
    """Peak accelerator memory allocated (CUDA) or this process's peak resident set (CPU), in MiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def sum_over_ranks(values: list[float] | torch.Tensor, device: torch.device) -> list[float]:
    """Element-wise sum of small per-rank counters, a list or a float64 tensor on ``device`` (collective: every
    rank calls it at the same step)."""
    t = values if torch.is_tensor(values) else torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t.tolist()


class RunMetrics:
    """The JSONL sink, wandb, TensorBoard and the progress bar of one run (live on rank 0 only)."""

    def __init__(self, cfg, env, config_dict: dict, total_steps: int, start_step: int = 0):
        self.cfg, self.env, self.rows, self.evals = cfg, env, [], []
        self.sink = None
        if cfg.logging.tensorboard:
            require_tensorboard()  # on every rank: all of them stop, not only rank 0
        if env.is_main:
            self._keep_history(os.path.join(cfg.logging.output_dir, "metrics.jsonl"), start_step)
            # TensorBoard drops what metrics.jsonl dropped: a resumed run's events past its checkpoint, and
            # all of an earlier run's events when this run starts afresh in the same folder
            self.sink = MetricsSink(cfg.logging.output_dir, resolve_wandb_mode(cfg.logging.wandb),
                                    cfg.logging.wandb_project, cfg.name, config_dict,
                                    tensorboard=cfg.logging.tensorboard,
                                    purge_step=start_step + 1 if start_step > 0 else 0)
        self.bar = progress_bar(total=total_steps, desc=cfg.name, unit="step",
                                enabled=env.is_main and cfg.logging.progress, initial=start_step)

    def _keep_history(self, path: str, start_step: int) -> None:
        """metrics.jsonl keeps the rows of steps <= start_step (a resumed run's history; none for a fresh
        run), rewritten atomically: rows an interrupted attempt logged past its checkpoint go."""
        kept = []
        if start_step > 0 and os.path.isfile(path):
            with open(path, encoding="utf-8") as fh:
                kept = [row for row in map(json.loads, filter(str.strip, fh)) if row.get("step", 0) <= start_step]
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        write_text_atomic(path, "".join(json.dumps(row) + "\n" for row in kept))
        self.rows = [{k: v for k, v in r.items() if k != "time"} for r in kept if not r.get("eval")]
        self.evals = [{k: v for k, v in r.items() if k not in ("time", "eval")} for r in kept if r.get("eval")]

    def advance(self) -> None:
        """One optimizer step more on the progress bar."""
        self.bar.update(1)

    def rewind(self, step: int) -> None:
        """The progress bar back at ``step`` (a roll-back redoes the steps after it)."""
        self.bar.n = step
        self.bar.refresh()

    def log_train(self, step: int, row: dict) -> None:
        """Rank 0: writes a training row and shows the loss on the bar."""
        if self.sink is None:
            return
        self.sink.log(step, row)
        self.rows.append({"step": step, **row})
        self.bar.set_postfix(loss=f"{row['loss']:.3f}", lr=f"{row['lr']:.3g}")
        if self.bar.disable:  # a log line stands in for the bar
            terms = ", ".join(f"{k} {row[k]:.4f}" for k in ("intra", "inter") if k in row)  # D-Softmax's terms
            terms = f" ({terms})" if terms else ""
            log.info("step %d/%d: loss %.4f%s, lr %.4g, %.0f samples/s", step, self.cfg.schedule.steps,
                     row["loss"], terms, row["lr"], row["samples_per_s"])

    def log_eval(self, step: int, metrics: dict) -> None:
        """Rank 0: writes a verification row (``"eval": true``) for optimizer step ``step``."""
        if self.sink is None or not metrics:
            return
        self.sink.log(step, {"eval": True, **metrics})
        self.evals.append({"step": step, **metrics})

    def close(self) -> None:
        """Closes the bar and the sinks (idempotent)."""
        self.bar.close()
        if self.sink is not None:
            self.sink.close()
            self.sink = None
