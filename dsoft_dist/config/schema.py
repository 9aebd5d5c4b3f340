"""Typed configuration: one kw_only dataclass per section, validated on construction.

Every ``__post_init__`` raises ``ConfigError`` (a ValueError) naming the dotted key,
the bad value and the fix. Type checks (wrong types, unknown keys) are done by the
loader in ``dsoft_dist.config.loader``, which builds these from YAML dicts. The keys that
choose a part by name (model.name, head.loss, data.source, optimizer.name, schedule.decay,
parallel.engine) take their choices from the registries of ``dsoft_dist.registry``: a part of
your own is a choice once its module (named in ``extra_modules``) is imported.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction
from typing import Optional

from dsoft_dist.errors import ConfigError
from dsoft_dist.losses.forms import resolve_margins
from dsoft_dist.losses.negatives import NEAREST_DEFAULTS, NEGATIVES
from dsoft_dist.models.registry import checkpointing_models
from dsoft_dist.registry import DATA_SOURCES, ENGINES, LOSSES, LR_SCHEDULES, MODELS, OPTIMIZERS

PRESET = "preset"  # head.inter_weight_end unset (null is a value there: the constant inter weight)


def _check(ok: bool, key: str, value, fix: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is invalid: {fix}")


def _choice(key: str, value, choices) -> None:
    _check(value in choices, key, value, f"use one of {', '.join(map(str, choices))}")


def _positive(key: str, value) -> None:
    _check(value > 0, key, value, "must be > 0")


def parse_fraction(text: str, key: str) -> float:
    """'1/64' -> 0.015625, '0.25' -> 0.25: a number or a fraction a/b (``dsoft plan --sample-rate`` and
    ``head.sample_rate`` in YAML or --set); ConfigError (a ValueError) naming ``key`` for anything else."""
    try:
        return float(Fraction(str(text).strip()))
    except (ValueError, ZeroDivisionError):
        raise ConfigError(f"{key}={text!r} is invalid: give a number or a fraction a/b, e.g. 1/64 or "
                          "0.015625") from None


def rate_text(rate: float) -> str:
    """A sample rate as text: 1, 1/64 (a unit fraction), else 4 significant digits (``parse_fraction`` reads it)."""
    frac = Fraction(rate).limit_denominator(1 << 16)
    return "1" if rate == 1 else (f"1/{frac.denominator}" if frac.numerator == 1 else f"{rate:.4g}")


@dataclass(kw_only=True)
class ModelConfig:
    """Backbone: name from the MODELS registry, embedding size, input image size (square), activation checkpointing."""

    name: str = "iresnet_tiny"
    embedding_size: int = 512
    input_size: int = 112
    in_features: int = 0  # input vector size for name="mlp" (synthetic vector mode)
    dropout: float = 0.0
    # recompute each block's activations in backward instead of storing them (same loss and gradients)
    activation_checkpointing: bool = False

    def __post_init__(self):
        spec = MODELS.get(self.name)  # ConfigError naming model.name and the registered models
        _positive("model.embedding_size", self.embedding_size)
        _positive("model.input_size", self.input_size)
        _check(self.in_features >= 0, "model.in_features", self.in_features, "must be >= 0 (0 = unused)")
        _check(0.0 <= self.dropout < 1.0, "model.dropout", self.dropout, "must be in [0, 1)")
        _check(not self.activation_checkpointing or spec.checkpointing,
               "model.activation_checkpointing", self.activation_checkpointing,
               f"model {self.name!r} has no blocks to checkpoint; set it false or use one of "
               f"{', '.join(checkpointing_models())}")


@dataclass(kw_only=True)
class HeadConfig:
    """Classifier head and loss (DESIGN.md §1): D-Softmax or a margin softmax.

    loss presets: arcface (m2=0.5), cosface (m3=0.35), sphereface (m1=1.35, a
    multiplicative angular margin), normface (no margin), softmax (unnormalized linear),
    margin (m1, m2, m3 as given). A given m1/m2/m3 replaces the preset's value.
    """

    loss: str = "d_softmax"
    negatives: str = "all"
    sample_rate: float = field(default=1.0, metadata={"fraction": True})  # YAML and --set also take "1/64"
    inter_correction: bool = False
    # negatives=nearest (D-Softmax-KN, dsoft_dist.head.nearest): how many nearest classes of its own class each
    # row adds to the random set (the table keeps that many per class), and the training steps between builds
    # of the table (0: automatic, the builds cost a tenth of the sampled head's GEMMs)
    nearest_per_class: int = NEAREST_DEFAULTS["nearest_per_class"]
    nearest_refresh: int = NEAREST_DEFAULTS["nearest_refresh"]
    scale: float = 64.0
    # D-Softmax's intra end point d; unset (or null): the loss's preset (loss d_softmax 1.0, d_softmax_paper 0.9)
    end_point: Optional[float] = None
    inter_weight: float = 1.0
    # the inter-weight schedule, a half cosine from inter_weight at step 0 to this at the last step
    # (dsoft_dist.train.schedule.inter_weight_at); null: the paper's constant inter weight; unset: the loss's
    # preset (d_softmax 0.0, d_softmax_paper null)
    inter_weight_end: Optional[float] = PRESET
    m1: Optional[float] = None  # None = the preset's value (see margins())
    m2: Optional[float] = None
    m3: Optional[float] = None
    chunk_size: int = 0  # classes per chunk in the torch path; 0 = automatic
    # MiB of the forward's exp'd logit chunks kept for backward, which then skips their GEMM (torch path);
    # a sampled step of up to this size recomputes nothing, a larger one recomputes the rest; 0 = recompute all
    logit_cache_mb: float = 64.0
    seed: int = 0
    backend: str = "auto"  # auto | torch | cpu-c | triton (dsoft_dist.head.backend)
    # GEMM operands of the triton backend (its statistics stay fp32); the torch path computes in fp32
    compute_dtype: str = "fp32"  # fp32 | bf16 | fp16

    def __post_init__(self):
        form = LOSSES.get(self.loss)  # ConfigError naming head.loss and the registered losses
        _choice("head.compute_dtype", self.compute_dtype, ("fp32", "bf16", "fp16"))
        _choice("head.negatives", self.negatives, NEGATIVES)
        _check(0.0 < self.sample_rate <= 1.0, "head.sample_rate", self.sample_rate,
               "must be in (0, 1]; e.g. 0.015625 samples 1/64 of the classes")
        _check(0.0 < self.scale <= 1024.0, "head.scale", self.scale, "must be in (0, 1024]; 32 or 64 are usual")
        _check(self.inter_weight >= 0.0, "head.inter_weight", self.inter_weight, "must be >= 0")
        self._check_nearest()
        self._resolve_presets(form)
        m1, m2, m3 = self.margins()
        _check(m1 >= 1.0, "head.m1", self.m1, "the multiplicative angular margin must be >= 1 (1 = none)")
        _check(0.0 <= m2 < 3.14159, "head.m2", self.m2, "the additive angular margin must be in [0, pi)")
        _check(m3 >= 0.0, "head.m3", self.m3, "the additive cosine margin must be >= 0")
        if not form.takes_margins:
            given = {k: v for k, v in (("m1", self.m1), ("m2", self.m2), ("m3", self.m3)) if v is not None}
            taking = "/".join(n for n in LOSSES.names() if LOSSES.get(n).takes_margins)
            _check(not given, "head." + next(iter(given), "m1"), next(iter(given.values()), None),
                   f"head.loss={self.loss} takes no margin; remove it or use loss={taking}")
        _check(self.chunk_size >= 0, "head.chunk_size", self.chunk_size, "must be >= 0 (0 = automatic)")
        _check(self.logit_cache_mb >= 0, "head.logit_cache_mb", self.logit_cache_mb, "must be >= 0 (0 = recompute)")
        _choice("head.backend", self.backend, ("auto", "torch", "cpu-c", "triton"))

    def _check_nearest(self) -> None:
        """The nearest_* keys: in range, and only set away from their defaults with negatives=nearest (which
        refuses inter_correction)."""
        _check(self.nearest_per_class >= 1, "head.nearest_per_class", self.nearest_per_class, "must be >= 1 (8)")
        _check(self.nearest_refresh >= 0, "head.nearest_refresh", self.nearest_refresh, "must be >= 0 (0 = automatic)")
        if self.negatives != "nearest":
            for key, default in NEAREST_DEFAULTS.items():
                _check(getattr(self, key) == default, "head." + key, getattr(self, key),
                       f"is read only with head.negatives=nearest (it is {self.negatives}); remove it or set "
                       "head.negatives=nearest")
        else:
            _check(not self.inter_correction, "head.inter_correction", self.inter_correction,
                   "is not read with head.negatives=nearest, whose inter sum already weights the random set to "
                   "stand for the classes outside each row's nearest ones; remove it")

    def _resolve_presets(self, form) -> None:
        """Sets an unset end_point / inter_weight_end to the loss's preset; a loss without D-Softmax's two terms
        refuses them (and an inter_weight other than 1), since it would train without reading them."""
        if not form.presets:
            given = {"end_point": self.end_point, "inter_weight_end": self.inter_weight_end,
                     "inter_weight": None if self.inter_weight == 1.0 else self.inter_weight}
            for key, value in given.items():
                fix = "set it to 1" if key == "inter_weight" else "remove it (--set head." + key + "=null)"
                _check(value is None or value is PRESET, "head." + key, value,
                       f"head.loss={self.loss} has no intra and inter term; {fix} or use loss=d_softmax")
            self.end_point = self.inter_weight_end = None
            return
        if self.end_point is None:
            self.end_point = form.presets["end_point"]
        if self.inter_weight_end is PRESET:
            self.inter_weight_end = form.presets["inter_weight_end"]
        _check(-1.0 < self.end_point <= 1.0, "head.end_point", self.end_point,
               "must be a cosine in (-1, 1]; 1.0 (or the paper's 0.9) is usual")
        _check(self.inter_weight_end is None or self.inter_weight_end >= 0.0, "head.inter_weight_end",
               self.inter_weight_end, "must be >= 0, or null for the constant inter_weight")

    def margins(self) -> tuple[float, float, float]:
        """(m1, m2, m3): the loss preset's margins with any explicitly given value replacing it."""
        return resolve_margins(self.loss, self.m1, self.m2, self.m3)


@dataclass(kw_only=True)
class DataConfig:
    """Training data: the procedural synthetic identities or WebDataset shards."""

    source: str = "synthetic"  # synthetic | webdataset (the DATA_SOURCES registry)
    shards: str = ""  # brace pattern, list file or pipe: command (webdataset)
    manifest: str = ""  # manifest.json written by the converters (webdataset)
    num_classes: int = 1000
    synthetic_mode: str = "images"  # images (face-like) | glyphs (characters in bundled fonts) | vectors
    samples_per_class: int = 20
    image_size: int = 112
    batch_size: int = 128  # per rank
    num_workers: int = 2
    shuffle_buffer: int = 1000
    augment_flip: bool = True
    color_jitter: float = 0.0
    bad_data: str = "skip"  # skip | fail
    max_bad_samples: int = 0  # skip: stop the run when the bad samples, summed over ranks, pass this; 0 = no limit
    seed: int = 0
    steps_per_epoch: int = 0  # 0 = from the data: floor(floor(samples / ranks) / batch_size)
    random_crop: bool = False  # pad by image_size/8 and crop back at a random offset
    difficulty: str = "medium"  # synthetic images and vectors: easy | medium | hard (docs/data.md)
    vector_dim: int = 128  # synthetic_mode=vectors: feature size (model.in_features)

    def __post_init__(self):
        DATA_SOURCES.get(self.source)  # ConfigError naming data.source and the registered sources
        for key in ("manifest", "shards"):  # else the run would train on synthetic data without a word
            _check(self.source != "synthetic" or not getattr(self, key), f"data.{key}", getattr(self, key),
                   "data.source=synthetic reads no files: set data.source=webdataset (or the source that reads "
                   "it) too, or leave it empty")
        _choice("data.difficulty", self.difficulty, ("easy", "medium", "hard"))
        _check(self.steps_per_epoch >= 0, "data.steps_per_epoch", self.steps_per_epoch,
               "must be >= 0 (0 = from the data)")
        _positive("data.vector_dim", self.vector_dim)
        _choice("data.synthetic_mode", self.synthetic_mode, ("images", "glyphs", "vectors"))
        _choice("data.bad_data", self.bad_data, ("skip", "fail"))
        _check(self.max_bad_samples >= 0, "data.max_bad_samples", self.max_bad_samples, "must be >= 0 (0 = no limit)")
        _check(self.bad_data == "skip" or not self.max_bad_samples, "data.max_bad_samples", self.max_bad_samples,
               "limits what data.bad_data=skip skips; data.bad_data=fail stops at the first bad sample: set one")
        _positive("data.num_classes", self.num_classes)
        _positive("data.samples_per_class", self.samples_per_class)
        _positive("data.image_size", self.image_size)
        _positive("data.batch_size", self.batch_size)
        _check(self.num_workers >= 0, "data.num_workers", self.num_workers, "must be >= 0")
        _check(self.shuffle_buffer >= 0, "data.shuffle_buffer", self.shuffle_buffer, "must be >= 0")
        _check(0.0 <= self.color_jitter <= 1.0, "data.color_jitter", self.color_jitter, "must be in [0, 1]")
        if self.source == "webdataset":
            _check(bool(self.shards or self.manifest), "data.shards", self.shards,
                   "data.source=webdataset needs a shard pattern, e.g. data.shards=/data/train-{000000..000099}.tar, "
                   "or data.manifest=/data/manifest.json")


@dataclass(kw_only=True)
class OptimizerConfig:
    """Optimizer for the backbone and the head (head_mode: row-sparse or dense)."""

    name: str = "sgd"  # sgd | adamw (the OPTIMIZERS registry)
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    head_mode: str = "sparse"  # sparse | dense
    # apply the head optimizer inside backward (no head gradient kept); None = the trainer decides:
    # on where legal (sparse mode, no accumulation, no head clipping, not fp16), off elsewhere
    head_step_in_backward: Optional[bool] = None
    grad_clip: float = 0.0  # max global grad norm; 0 = off
    clip_scope: str = "backbone"  # backbone | head | both (one norm over both)
    grad_accum_steps: int = 1  # micro-batches of data.batch_size per optimizer step
    decay_norm_and_bias: bool = False  # weight decay also on the backbone's norm weights and biases
    max_skipped_in_a_row: int = 20  # stop the run after this many non-finite steps in a row (0 = never)

    def __post_init__(self):
        OPTIMIZERS.get(self.name)  # ConfigError naming optimizer.name and the registered optimizers
        _positive("optimizer.lr", self.lr)
        _check(0.0 <= self.momentum < 1.0, "optimizer.momentum", self.momentum, "must be in [0, 1)")
        _check(self.weight_decay >= 0.0, "optimizer.weight_decay", self.weight_decay, "must be >= 0")
        _check(len(self.betas) == 2 and all(0.0 <= b < 1.0 for b in self.betas), "optimizer.betas",
               self.betas, "must be two numbers in [0, 1), e.g. [0.9, 0.999]")
        _positive("optimizer.eps", self.eps)
        _choice("optimizer.head_mode", self.head_mode, ("sparse", "dense"))
        _check(self.grad_clip >= 0.0, "optimizer.grad_clip", self.grad_clip, "must be >= 0 (0 = off)")
        _choice("optimizer.clip_scope", self.clip_scope, ("backbone", "head", "both"))
        _positive("optimizer.grad_accum_steps", self.grad_accum_steps)
        _check(self.max_skipped_in_a_row >= 0, "optimizer.max_skipped_in_a_row", self.max_skipped_in_a_row,
               "must be >= 0 (0 = never stop)")
        _check(not (self.head_step_in_backward and self.head_mode != "sparse"), "optimizer.head_step_in_backward",
               self.head_step_in_backward, "needs optimizer.head_mode=sparse (dense mode also steps untouched rows)")
        _check(not (self.head_step_in_backward and self.grad_accum_steps > 1), "optimizer.head_step_in_backward",
               self.head_step_in_backward, f"each backward would be a head step, but optimizer.grad_accum_steps="
               f"{self.grad_accum_steps} accumulates micro-batches: set it to false (or leave it unset)")
        _check(not (self.head_step_in_backward and self.grad_clip > 0 and self.clip_scope != "backbone"),
               "optimizer.head_step_in_backward", self.head_step_in_backward,
               f"clipping the head (optimizer.clip_scope={self.clip_scope}) needs its whole gradient before the step: "
               "set it to false (or leave it unset), or use optimizer.clip_scope=backbone")
        _check(not (self.nesterov and self.momentum == 0.0), "optimizer.nesterov", self.nesterov,
               "nesterov needs optimizer.momentum > 0")


@dataclass(kw_only=True)
class DivergenceConfig:
    """Divergence roll-back (``dsoft_dist.train.rollback``): a loss that is non-finite, or above factor x its
    running median, for ``steps`` steps in a row on any rank rolls every rank back to the newest checkpoint
    before them; the data of the diverged stretch is skipped."""

    max_rollbacks: int = 3  # roll-backs before a divergence stops the run; 0 = off (the loss is not watched)
    steps: int = 3  # diverged steps in a row that trigger a roll-back
    factor: float = 0.0  # > 1: a loss above factor x the running median is diverged too; 0 = non-finite only
    window: int = 100  # good steps in the running median (the factor applies once the window is full)
    lr_scale: float = 1.0  # the learning rate is multiplied by this at each roll-back

    def __post_init__(self):
        _check(self.max_rollbacks >= 0, "divergence.max_rollbacks", self.max_rollbacks, "must be >= 0 (0 = off)")
        _positive("divergence.steps", self.steps)
        _check(self.factor == 0.0 or self.factor > 1.0, "divergence.factor", self.factor,
               "must be 0 (non-finite losses only) or > 1, e.g. 5 (a loss 5x its running median)")
        _positive("divergence.window", self.window)
        _check(0.0 < self.lr_scale <= 1.0, "divergence.lr_scale", self.lr_scale,
               "must be in (0, 1], e.g. 0.5 to halve the learning rate at each roll-back (1 = unchanged)")


@dataclass(kw_only=True)
class ScheduleConfig:
    """Learning-rate schedule: linear warmup then poly, cosine or constant decay."""

    steps: int = 1000
    warmup_steps: int = 0
    decay: str = "cosine"  # cosine | poly | constant (the LR_SCHEDULES registry)
    poly_power: float = 2.0
    min_lr_ratio: float = 0.0

    def __post_init__(self):
        _positive("schedule.steps", self.steps)
        _check(0 <= self.warmup_steps <= self.steps, "schedule.warmup_steps", self.warmup_steps,
               f"must be in [0, schedule.steps={self.steps}]: set it to at most {self.steps}, e.g. "
               f"--set schedule.warmup_steps={self.steps // 10} (a tenth of the steps), or raise schedule.steps")
        LR_SCHEDULES.get(self.decay)  # ConfigError naming schedule.decay and the registered decays
        _positive("schedule.poly_power", self.poly_power)
        _check(0.0 <= self.min_lr_ratio <= 1.0, "schedule.min_lr_ratio", self.min_lr_ratio, "must be in [0, 1]")


@dataclass(kw_only=True)
class ParallelConfig:
    """Process layout: backend, backbone engine and precision."""

    backend: str = "auto"  # auto (nccl on CUDA, else gloo) | gloo | nccl
    engine: str = "ddp"  # ddp | deepspeed (the ENGINES registry)
    zero_stage: int = 0
    precision: str = "fp32"  # fp32 | bf16 | fp16
    nproc: int = 1  # processes for `dsoft demo` / local launches
    timeout_s: float = 1800.0  # rendezvous and collective timeout
    hang_timeout_minutes: float = 20.0  # no rank's progress for this long ends the job, naming the rank; 0 = off

    def __post_init__(self):
        _choice("parallel.backend", self.backend, ("auto", "gloo", "nccl"))
        ENGINES.get(self.engine)  # ConfigError naming parallel.engine and the registered engines
        _check(self.zero_stage in (0, 1, 2), "parallel.zero_stage", self.zero_stage,
               "use 0, 1 or 2 (ZeRO-3 partitions the backbone's parameters, which the trainer does not support yet)")
        _choice("parallel.precision", self.precision, ("fp32", "bf16", "fp16"))
        _positive("parallel.nproc", self.nproc)
        _positive("parallel.timeout_s", self.timeout_s)
        hang = self.hang_timeout_minutes
        _check(hang >= 0, "parallel.hang_timeout_minutes", hang, "must be >= 0 (0 switches hang detection off)")
        _check(hang * 60 < self.timeout_s, "parallel.hang_timeout_minutes", hang,
               f"use 0 (off) or less than parallel.timeout_s={self.timeout_s:g} s ({self.timeout_s / 60:g} minutes), "
               "whose collective timeout otherwise ends a stalled run first, without naming the rank behind; or "
               "raise parallel.timeout_s")
        _check(self.zero_stage == 0 or self.engine == "deepspeed", "parallel.zero_stage", self.zero_stage,
               "ZeRO stages need parallel.engine=deepspeed")


@dataclass(kw_only=True)
class LoggingConfig:
    """Where metrics go: JSONL always, wandb offline/online/disabled, progress bars."""

    output_dir: str = "runs/default"
    overwrite: bool = False  # delete the run already in output_dir (its outputs and checkpoints) and start afresh
    log_every: int = 10
    wandb: str = "disabled"  # disabled | offline | online
    wandb_project: str = "dsoft-dist"
    tensorboard: bool = False  # also write <output_dir>/tensorboard/ event files (pip install tensorboard)
    progress: bool = True
    sample_keys: bool = False  # each rank appends every batch's sample keys to <output_dir>/samples/rank-N.txt

    def __post_init__(self):
        _check(bool(self.output_dir), "logging.output_dir", self.output_dir, "give a directory path")
        _positive("logging.log_every", self.log_every)
        _choice("logging.wandb", self.wandb, ("disabled", "offline", "online"))


@dataclass(kw_only=True)
class EvalConfig:
    """Evaluation during and after training."""

    bins: list[str] = field(default_factory=list)  # InsightFace .bin verification sets
    pairs: list[str] = field(default_factory=list)  # pair lists for TAR@FAR
    every_steps: int = 0  # 0 = only at the end
    flip: bool = True
    batch_size: int = 256
    folds: int = 10
    fars: list[float] = field(default_factory=lambda: [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1])
    at_start: bool = False  # also verify the untrained backbone (step 0), e.g. for an untrained-vs-trained table
    # data.source=synthetic: a .bin of pairs of synthetic identities never seen in training, built in the run
    synthetic_identities: int = 0  # 0 = none
    synthetic_pairs: int = 600

    def __post_init__(self):
        _check(self.every_steps >= 0, "eval.every_steps", self.every_steps, "must be >= 0 (0 = only at the end)")
        _positive("eval.batch_size", self.batch_size)
        _check(self.folds >= 2, "eval.folds", self.folds, "must be >= 2 (10 is the standard protocol)")
        _check(all(0.0 < f < 1.0 for f in self.fars), "eval.fars", self.fars, "each FAR must be in (0, 1)")
        _check(self.synthetic_identities == 0 or self.synthetic_identities >= 2, "eval.synthetic_identities",
               self.synthetic_identities, "must be 0 (none) or >= 2 (pairs need two identities)")
        _positive("eval.synthetic_pairs", self.synthetic_pairs)


@dataclass(kw_only=True)
class CheckpointConfig:
    """Run checkpoints (dsoft_dist.train.checkpoint): when to write them, how many to keep, how to start."""

    dir: str = ""  # "" = <logging.output_dir>/checkpoints; one folder all ranks share
    every_steps: int = 0  # 0 = no step interval (checkpoint.every_minutes still saves)
    every_minutes: float = 30.0  # also save when this long has passed since the last save; 0 = off
    keep_last: int = 3
    keep_best: str = ""  # a verification metric to keep the best checkpoint by (higher is better), e.g. lfw/accuracy
    resume: str = "auto"  # auto (the newest checkpoint that verifies, if any) | never | a checkpoint folder
    init_from: str = ""  # a checkpoint folder to take the weights from (fine-tuning; a fresh run otherwise)
    async_save: bool = False  # copy the state to CPU memory, write the files in the background (DDP)
    # signals that ask for a checkpoint and an exit (code 75) at the next step boundary
    signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1"])

    def __post_init__(self):
        _check(self.every_steps >= 0, "checkpoint.every_steps", self.every_steps, "must be >= 0 (0 = at the end only)")
        _check(self.every_minutes >= 0, "checkpoint.every_minutes", self.every_minutes, "must be >= 0 (0 = off)")
        _positive("checkpoint.keep_last", self.keep_last)
        _check(bool(self.resume), "checkpoint.resume", self.resume, "use auto, never or a checkpoint folder")
        _check(self.keep_best == "" or "/" in self.keep_best, "checkpoint.keep_best", self.keep_best,
               "name a verification metric as <set>/<metric>, e.g. lfw/accuracy (or leave it empty)")
        _check(not self.keep_best.endswith("/val"), "checkpoint.keep_best", self.keep_best,  # the old spelling
               f"<set>/val is now <set>/val_at_far: use {self.keep_best}_at_far")


@dataclass(kw_only=True)
class Config:
    """The whole run: one field per section, and the modules that register parts of your own."""

    name: str = "run"
    seed: int = 0
    # modules imported before the sections are built (by the loader, on every rank), so the parts they
    # register are choices (dsoft_dist.registry); they make parts available and do not define the run
    extra_modules: list[str] = field(default_factory=list)
    model: ModelConfig = field(default_factory=ModelConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    divergence: DivergenceConfig = field(default_factory=DivergenceConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def __post_init__(self):
        _check(self.data.num_classes >= self.parallel.nproc, "data.num_classes", self.data.num_classes,
               f"must be >= parallel.nproc={self.parallel.nproc}: every rank needs at least one class")
        _check(self.eval.synthetic_identities == 0 or self.data.source == "synthetic", "eval.synthetic_identities",
               self.eval.synthetic_identities, f"synthetic verification pairs need data.source=synthetic (got "
               f"{self.data.source!r}): set it to 0 and give your own verification sets in eval.bins")
        _check(self.eval.synthetic_identities == 0 or self.data.synthetic_mode == "images",
               "eval.synthetic_identities", self.eval.synthetic_identities,
               "the synthetic verification pairs are face-like images (data.synthetic_mode=images), which say "
               f"nothing of a data.synthetic_mode={self.data.synthetic_mode} backbone: set it to 0 (dsoft bench "
               "accuracy shows how to verify such runs on unseen identities)")
        _check(not (self.optimizer.head_step_in_backward and self.parallel.precision == "fp16"),
               "optimizer.head_step_in_backward", self.optimizer.head_step_in_backward,
               "under parallel.precision=fp16 an overflow must skip the head step with the backbone's, which a step "
               "inside backward cannot: set it to false (or leave it unset)")
        if MODELS.get(self.model.name).inputs == "vectors":
            _check(self.model.in_features > 0, "model.in_features", self.model.in_features,
                   f"model.name={self.model.name} needs model.in_features > 0 (the synthetic vector size)")


__all__ = [
    "CheckpointConfig", "Config", "ConfigError", "DataConfig", "DivergenceConfig", "EvalConfig", "HeadConfig",
    "LoggingConfig", "ModelConfig", "OptimizerConfig", "ParallelConfig", "ScheduleConfig",
    "NEGATIVES", "parse_fraction",
]
