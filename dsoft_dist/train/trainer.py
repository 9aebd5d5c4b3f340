"""The Trainer: builds the run from the config, trains ``schedule.steps`` optimizer steps, reports.

    with distributed(cfg.parallel.backend) as env:
        trainer = Trainer(cfg, env)
        summary = trainer.train()       # collective; rank 0 writes the outputs
        trainer.close()

Outputs under ``logging.output_dir``: metrics.jsonl, report.md, report.json, curves.png,
backbone.pt (``dsoft eval --checkpoint``) and head/ (the re-shardable head checkpoint).
The run's state is the map ``trainer.states`` of checkpoint parts (``dsoft_dist.train.state``):
the trainer's own counters (``TrainState``), the backbone's weights, the engine (backbone optimizer
and loss scale), the head with its optimizer, the data position and the RNG states; the
checkpointer saves and loads the map and never looks into the trainer.
"""
from __future__ import annotations

import copy
import os
import time

import torch

from dsoft_dist.config import config_to_dict
from dsoft_dist.config.schema import Config
from dsoft_dist.errors import PREEMPTED_EXIT_CODE
from dsoft_dist.head import build_head_optimizer, save_head_checkpoint
from dsoft_dist.head.state import HeadState
from dsoft_dist.observability import get_logger
from dsoft_dist.parallel.comm import broadcast_object
from dsoft_dist.parallel.watchdog import Watchdog
from dsoft_dist.registry import ENGINES
from dsoft_dist.train.build import build_backbone, build_backbone_optimizer, build_head, resolve_head_step
from dsoft_dist.train.checkpoint import Checkpointer, step_folder
from dsoft_dist.train.data import TrainData
from dsoft_dist.train.metrics import RunMetrics, memory_mb, sum_over_ranks
from dsoft_dist.train.preempt import Preempted, Preemption
from dsoft_dist.train.report import write_report
from dsoft_dist.train.rollback import DivergenceGuard
from dsoft_dist.train.runfolder import prepare_run_folder
from dsoft_dist.train.schedule import inter_weight_at, lr_factor
from dsoft_dist.train.state import BackboneWeights, PerRank, Replicated, RngStates, TrainState
from dsoft_dist.train.update import Updater
from dsoft_dist.train.verify import Verifier

log = get_logger(__name__)


class Trainer:
    """One run (see the module doc). Collective: every rank constructs it and calls ``train``."""

    def __init__(self, cfg: Config, env):
        self.cfg, self.env = cfg, env
        self.out = cfg.logging.output_dir
        # first: a signal during the build (seconds) is then a request to stop at the first step boundary
        self.preemption = Preemption(cfg.checkpoint.signals)
        try:
            self._build()
        except BaseException:
            if getattr(self, "watchdog", None) is not None:
                self.watchdog.stop()
            self.preemption.restore()  # a failed start leaves the process's handlers as it found them
            raise
        self.metrics = RunMetrics(cfg, env, config_to_dict(cfg), cfg.schedule.steps, self.state.step)
        self.last_output = None  # the last UpdateOutput (timings, diagnostics)
        (log.info if env.is_main else log.debug)(
            "%s: %d ranks (%s), engine %s, precision %s, head %s with %s negatives, head step in backward: %s",
            cfg.name, env.world_size, env.backend, self.engine.describe(), cfg.parallel.precision, cfg.head.loss,
            cfg.head.negatives, self.head_config.head_step_in_backward)

    def _build(self) -> None:
        """The run folder, head, engine, checkpointer, data and verifier, the states map; then the start
        (resume or init)."""
        cfg, env = self.cfg, self.env
        self._prepare_folder()
        self.head = build_head(cfg, env.device)
        self.head_config = resolve_head_step(cfg)
        self.head_optimizer = build_head_optimizer(self.head, self.head_config)
        model = build_backbone(cfg)
        engine_class = ENGINES.get(cfg.parallel.engine)
        self.engine = engine_class(model, build_backbone_optimizer(model, cfg.optimizer), self.head_optimizer, env, cfg)
        self.watchdog = Watchdog(env.rank, env.world_size, cfg.parallel.hang_timeout_minutes)
        self.updater = Updater(self.engine, self.head, env, cfg.optimizer.grad_accum_steps, self.watchdog)
        self.checkpointer = Checkpointer(cfg, env)
        keys_dir = os.path.join(self.out, "samples") if cfg.logging.sample_keys else None
        self.data = TrainData(cfg.data, env, keys_dir, group=self.checkpointer.group)
        self.verifier = Verifier(cfg, env, self.out)
        self.state = TrainState(config_to_dict(cfg))
        self.guard = DivergenceGuard(cfg.divergence, self.state)
        self.states = {"trainer": Replicated(self.state),  # the map's order is the load order: trainer before rng
                       "backbone": BackboneWeights(self.engine.module, cfg.model.name), "engine": self.engine,
                       "head": HeadState(self.head, self.head_optimizer), "data": Replicated(self.data),
                       "rng": PerRank(RngStates(cfg.seed, env.rank, self.state))}
        self._start()
        self.start_step = self.state.step
        if os.environ.get("SLURM_RESTART_COUNT") and env.is_main:
            log.info("Slurm restart count: %s", os.environ["SLURM_RESTART_COUNT"])

    def _prepare_folder(self) -> None:
        """Collective: rank 0 checks that this run may start in logging.output_dir (``runfolder``) and
        records it; every rank raises the same error when it may not."""
        problem = None
        if self.env.is_main:
            try:
                problem = prepare_run_folder(self.cfg)
            except (OSError, ValueError) as err:  # told to every rank: none may wait in the broadcast
                problem = str(err)
        problem = broadcast_object(problem)
        if problem is not None:
            raise ValueError(problem)

    def _start(self) -> None:
        """checkpoint.resume: auto = the newest checkpoint that verifies (the normal start path, also after
        torchrun restarts every worker), never, or a folder; else checkpoint.init_from's weights."""
        c = self.cfg.checkpoint
        path = None
        if c.resume == "auto":
            path = self.checkpointer.find_resume()
        elif c.resume != "never":
            path = c.resume
        if path is not None:
            self.checkpointer.load(self.states, path)
        elif c.init_from:
            self.checkpointer.init_weights(self.states, c.init_from)

    def save_checkpoint(self, best_metric: float | None = None) -> str:
        """Collective: a checkpoint of ``states`` at this step (``Checkpointer.save``); returns its folder."""
        self.watchdog.mark("save", self.state.step)
        return self.checkpointer.save(self.states, self.state.step, best_metric)

    def _lr(self) -> float:
        return self.cfg.optimizer.lr * lr_factor(self.state.step, self.cfg.schedule) * self.state.lr_scale

    def _is_log_step(self, n: int) -> bool:
        """Steps are logged at 1, every logging.log_every, and the last."""
        return n == 1 or n % self.cfg.logging.log_every == 0 or n == self.cfg.schedule.steps

    def _should(self, every: int) -> bool:
        return every > 0 and self.state.step % every == 0

    def evaluate(self) -> dict:
        """Collective verification of the backbone; rank 0 logs the metrics. A new best of
        checkpoint.keep_best writes a checkpoint and points ``best`` at it."""
        if not self.verifier.enabled:
            return {}
        self.watchdog.mark("verify", self.state.step)
        metrics = self.verifier(self.engine.module)
        self.metrics.log_eval(self.state.step, metrics)
        improved = self.checkpointer.improves(metrics)
        if improved is not None:
            self.save_checkpoint(best_metric=improved)
        return metrics

    def _log(self, out, lr: float, since: float, samples: int, bad: int) -> None:
        """Rank 0: the step's metrics row (``bad``: the run's bad samples summed over the ranks)."""
        skipped = self.state.skipped
        if not self.env.is_main:
            return
        row = {"loss": float(out.loss), **out.diagnostics_floats(), "lr": lr,
               "samples_per_s": samples * self.env.world_size / max(time.perf_counter() - since, 1e-9),
               **{f"time_{k}": v for k, v in out.timings.items()}, "memory_mb": memory_mb(self.env.device),
               "bad_samples": int(bad), "skipped_steps": skipped}
        self.metrics.log_train(self.state.step, row)

    def train(self) -> dict:
        """Trains to ``schedule.steps``; verifies per ``eval``; writes the outputs. Returns the summary."""
        t_start, step = time.perf_counter(), self.state.step
        if step >= self.cfg.schedule.steps and self.env.is_main:
            log.info("the run in %s already finished (step %d of %d): nothing to train; raise schedule.steps to "
                     "train longer, or pass --overwrite or another logging.output_dir to train again", self.out,
                     step, self.cfg.schedule.steps)
        if self.cfg.eval.at_start and step == 0:
            self.evaluate()
        self.run_steps(self.cfg.schedule.steps - step)
        seconds = time.perf_counter() - t_start
        # a rerun of a finished run trains nothing: its last verification stands (not logged twice)
        done_before = self.start_step >= self.cfg.schedule.steps and self.metrics.evals and \
            self.metrics.evals[-1]["step"] == self.state.step
        final = {k: v for k, v in self.metrics.evals[-1].items() if k != "step"} if done_before else self.evaluate()
        if self.checkpointer.saved_step != self.state.step:
            self.save_checkpoint()
        return self._finish(seconds, final)

    def run_steps(self, n: int) -> None:
        """Trains to step ``state.step + n``: update, log, verify and save on schedule (``dsoft bench train`` times
        it). A roll-back redoes the steps after its checkpoint: they count once."""
        since, samples, last, until = time.perf_counter(), 0, self.cfg.schedule.steps, self.state.step + n
        while self.state.step < until:
            self.watchdog.mark("data", self.state.step)  # the updater marks its phases of this step
            log_now = self._is_log_step(self.state.step + 1)
            lr = self._lr()
            self.head.inter_weight = inter_weight_at(self.state.step, self.cfg.head, self.cfg.schedule)
            out = self.updater(self.data, lr, timed=log_now)
            self.state.count(out.applied)
            self.data.write_keys(self.state.step)
            self._stop_if_skipping()
            samples += out.samples
            self.metrics.advance()
            self.last_output = out
            stop, due, diverged, bad = self._at_boundary(out.loss)
            if log_now:
                self._log(out, lr, since, samples, bad)
                since, samples = time.perf_counter(), 0
            if diverged:
                self._roll_back()
            else:
                self._on_schedule(due, last)
            if stop:
                self._preempted()

    def _on_schedule(self, due: bool, last: int) -> None:
        """Verification and the checkpoint save when their intervals say so (not at the last step: ``train``
        does both there)."""
        if self._should(self.cfg.eval.every_steps) and self.state.step != last:
            self.evaluate()
        if (due or self._should(self.checkpointer.every)) and self.state.step != last and \
                self.checkpointer.saved_step != self.state.step:  # not twice (a new best was saved already)
            self.save_checkpoint()

    def _at_boundary(self, loss: torch.Tensor) -> tuple[bool, bool, bool, int]:
        """(stop, save, roll back, bad samples) agreed by every rank in one all-reduce: stop when any rank
        received a preemption signal; save when checkpoint.every_minutes has passed since the last save on rank
        0's clock; roll back when the divergence guard's streak is complete (``dsoft_dist.train.rollback``); the
        run's bad samples summed over the ranks (past data.max_bad_samples every rank stops here)."""
        every_s = self.cfg.checkpoint.every_minutes * 60
        due = self.env.is_main and every_s > 0 and time.monotonic() - self.checkpointer.saved_at >= every_s
        values = torch.tensor([float(self.preemption.received is not None), float(due), float(self.data.bad_total)],
                              dtype=torch.float64, device=self.env.device)
        if self.guard.enabled:  # the loss joins the same all-reduce: no host read of its own
            values = torch.cat([values, self.guard.local(loss)])
        stop, save, bad, *verdict = sum_over_ranks(values, self.env.device)
        self.data.stop_if_too_bad(int(bad))  # data.max_bad_samples, on every rank together
        diverged = bool(verdict) and self.guard.observe(verdict[0], verdict[1] / self.env.world_size)
        return stop > 0, save > 0, diverged, int(bad)

    def _roll_back(self) -> None:
        """Every rank: back to the newest checkpoint before the diverged steps, the data going on after them
        (``dsoft_dist.train.rollback``); the run stops when the roll-backs are used up or no checkpoint is old
        enough."""
        step, first, root = self.state.step, self.guard.first_diverged_step(), self.checkpointer.root
        message = self.guard.stop_message(root)
        target = self.checkpointer.roll_back_to(first) if message is None else None
        if target is None:
            raise RuntimeError(message or self.guard.no_target_message(root))
        position = self.data.state_dict()  # collective: the data goes on after the diverged steps
        kept = (self.state.rollbacks, self.state.lr_scale)
        self.watchdog.mark("start", step)
        self.checkpointer.load({k: v for k, v in self.states.items() if k != "data"}, target)
        self.state.rollbacks, self.state.lr_scale = kept
        self.data.close()
        self.data.load_state_dict(position)
        self.metrics.rewind(self.state.step)
        text = self.guard.rolled_back(self.state.step, first, step, root)
        if self.env.is_main:
            log.warning(text)

    def _stop_if_skipping(self) -> None:
        """optimizer.max_skipped_in_a_row non-finite steps in a row stop the run on every rank (the skip
        decision is all-reduced, so they agree); skipped steps changed nothing, and the last checkpoint stays."""
        limit, in_a_row, step = self.cfg.optimizer.max_skipped_in_a_row, self.state.skipped_in_a_row, self.state.step
        if limit and in_a_row >= limit:
            self.checkpointer.wait()
            latest = self.checkpointer.latest_step()
            raise RuntimeError(
                f"{in_a_row} optimizer steps in a row had non-finite gradients (steps "
                f"{step - in_a_row + 1}-{step}): the run stops. The last checkpoint is "
                f"{'step %d' % latest if latest is not None else 'none'} in {self.checkpointer.root}. Lower "
                "optimizer.lr, check the data, use parallel.precision=bf16, or raise optimizer.max_skipped_in_a_row")

    def _preempted(self) -> None:
        """Every rank at the same step boundary: the checkpoint, then exit with PREEMPTED_EXIT_CODE."""
        step = self.state.step
        path = self.save_checkpoint() if self.checkpointer.saved_step != step else \
            os.path.join(self.checkpointer.root, step_folder(step))
        self.checkpointer.wait()  # written before the exit
        written = self.checkpointer.written_step
        saved = f"checkpoint {path} written" if written == step else (
            f"its checkpoint could not be written (see the warning above); the newest is "
            f"{'step %d' % written if written is not None else 'none'}")
        message = (f"preempted ({self.preemption.received or 'a signal on another rank'}) after step {step}: "
                   f"{saved}; exiting with code {PREEMPTED_EXIT_CODE} (resume with the same command)")
        if self.env.is_main:
            log.warning(message)
        # the handlers stay: the same signal sent again (a process group's and its parent's copy) must not
        # kill this rank on its way out with the checkpoint written
        self.close(restore_signals=False)
        raise Preempted(message)

    def _finish(self, seconds: float, final: dict) -> dict:
        self.watchdog.mark("save", self.state.step)
        save_head_checkpoint(os.path.join(self.out, "head"), self.head, self.head_optimizer)  # collective
        bad = sum_over_ranks([self.data.bad_total], self.env.device)[0]
        if not self.env.is_main:
            return {}
        from dsoft_dist.models import save_backbone

        module = self.engine.module
        if any(p.dtype != torch.float32 for p in module.parameters()):  # DeepSpeed bf16 keeps bf16 weights
            module = copy.deepcopy(module).float()
        save_backbone(os.path.join(self.out, "backbone.pt"), module, self.cfg.model)
        summary = {"config": config_to_dict(self.cfg), "world_size": self.env.world_size, "backend": self.env.backend,
                   "engine": self.engine.describe(),
                   "train_seconds": round(seconds, 3), "start_step": self.start_step,
                   "head_step_in_backward": self.head_config.head_step_in_backward,
                   "log": self.metrics.rows, "evals": self.metrics.evals, "final": final, "bad_samples": int(bad),
                   "skipped_steps": self.state.skipped, "rollbacks": self.state.rollbacks}
        self.metrics.close()  # before the report, so wandb's closing lines do not follow it
        summary["report"] = write_report(self.out, summary)
        return summary

    def close(self, restore_signals: bool = True) -> None:
        """Waits for a background checkpoint save, stops the hang watchdog, ends the data loader's workers, closes
        the metrics, restores the signal handlers."""
        self.checkpointer.wait()
        self.watchdog.stop()
        self.data.close()
        self.metrics.close()
        if restore_signals:
            self.preemption.restore()
