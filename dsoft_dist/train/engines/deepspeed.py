"""The backbone under DeepSpeed ZeRO-1/2 (``pip install 'dsoft_dist[deepspeed]'``); the head stays outside.

The ``Engine`` of ``dsoft_dist.train.engines``, as ``ddp.DDPEngine``. What DeepSpeed 0.19 does, measured on
the installed version (2 gloo ranks on CPU) and what this engine does about it:

- ZeRO-1/2 average the backbone's gradients over ranks exactly like DDP (bit-identical
  updates in fp32) once ``gradient_clipping`` is set: its default is 1.0, not off, so the
  engine always sets it (``optimizer.grad_clip`` for clip_scope=backbone, else 0).
- ``engine.backward(loss)`` divides by ``gradient_accumulation_steps`` (the loss, or hooks
  on the engine's outputs for a plain ``loss.backward()``). The trainer already divides each
  micro-batch's loss by k on both sides (``dsoft_dist.train.grads``), so the backbone's
  backward runs with ``scale_wrt_gas=False``: nothing is divided twice.
- DeepSpeed's ``step()`` must be called after EVERY micro-batch: its boundary counter only moves
  inside ``step()``, and one call after k backwards silently applies nothing.
- A client ``torch.optim`` optimizer under ZeRO needs ``zero_allow_untested_optimizer``; the
  engine's ``optimizer.param_groups`` are the client's, so the lr is set there.
- bf16 converts the module's parameters to bf16 in place (fp32 masters in the optimizer):
  inputs are cast to bf16. fp16 is refused by DeepSpeed's CPU accelerator; on GPUs its own
  dynamic loss scale multiplies the backbone's backward only (the head never sees it).
- Non-finite gradients make DeepSpeed skip its step (``was_step_applied()`` False) in every
  precision; the head's optimizer update is skipped with it. The head's gradients are checked too: a
  non-finite head gradient skips the head step (logged); DeepSpeed cannot be told to skip
  its own then, but the head's gradient and the embedding gradient come from the same
  finite-or-not statistics, so in practice both are non-finite together.
- Its state is DeepSpeed's own checkpoint folder (ZeRO partitions per rank), written by DeepSpeed's
  collective ``save_checkpoint`` (so a save with this engine is synchronous). On the world size that
  wrote it, DeepSpeed's ``load_checkpoint`` loads it. On another one DeepSpeed refuses ZeRO-1/2 optimizer
  state ("Automatic adjustment of ZeRO's optimizer state partitioning with a new world size is not
  currently supported"; its universal-checkpoint converter knows Adam's state keys only, not SGD's
  momentum), so ``load`` re-partitions it here: DeepSpeed loads the module and its counters without the
  optimizer state, every saved rank's partition file is read, each parameter's fp32 master and optimizer
  state are put together from the fragments the saved ranks held (``param_slice_mappings``: a
  world-size-independent form) and set into this rank's partition with DeepSpeed's public
  ``safe_set_full_fp32_param`` / ``safe_set_full_optimizer_state``: copies, bit for bit.
- ``LOCAL_RANK`` must be set (it is, under torchrun and ``spawn_local``); the process group is
  the trainer's (DeepSpeed wraps it, it does not initialize another). DeepSpeed's one-time
  C++ comm op is cached in ``$TORCH_EXTENSIONS_DIR`` (default: the dsoft cache directory).
"""
from __future__ import annotations

import contextlib
import glob
import io
import logging
import os
import re
import warnings

import torch
import torch.distributed as dist
from torch import nn

from dsoft_dist.config.schema import Config
from dsoft_dist.errors import CheckpointError, ConfigError
from dsoft_dist.observability import get_logger
from dsoft_dist.registry import ENGINES
from dsoft_dist.train.ckpt_files import storage_error
from dsoft_dist.train.grads import all_finite, clip_grads_
from dsoft_dist.utils import load_weights_only

log = get_logger(__name__)


def deepspeed_config(cfg: Config) -> dict:
    """The DeepSpeed config dict for a run (batch sizes, ZeRO stage, precision, clipping)."""
    o, p = cfg.optimizer, cfg.parallel
    if o.grad_clip > 0 and o.clip_scope == "both":
        raise ConfigError("optimizer.clip_scope='both' is invalid with parallel.engine=deepspeed: DeepSpeed clips "
                          "the backbone on its own; use clip_scope=backbone (DeepSpeed's gradient_clipping) or head")
    return {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": o.grad_accum_steps,
        "zero_optimization": {"stage": p.zero_stage},
        "zero_allow_untested_optimizer": True,
        "gradient_clipping": o.grad_clip if o.clip_scope == "backbone" else 0.0,
        "bf16": {"enabled": p.precision == "bf16"},
        "fp16": {"enabled": p.precision == "fp16", "initial_scale_power": 16},
        "wall_clock_breakdown": False,
    }


def _import_deepspeed(device: torch.device):
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    cache = os.environ.get("DSOFT_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "dsoft_dist"))
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(cache, "torch_extensions"))
    try:
        import deepspeed
    except ImportError as err:
        raise ConfigError("parallel.engine='deepspeed' needs DeepSpeed: pip install 'dsoft_dist[deepspeed]' "
                          "(DS_BUILD_OPS=0 on machines without CUDA), or use parallel.engine=ddp") from err
    return deepspeed


def _initialize(deepspeed, model, optimizer, config):
    """deepspeed.initialize without its start-up noise: the comm op's print on every rank, the
    "untested optimizer" warning (a client SGD is what we pass on purpose) and ZeRO's deprecation
    warnings for torch's all_gather_into_tensor. Its later warnings (overflow) still show."""
    from deepspeed.utils import logger as ds_logger

    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*reduce_scatter_tensor.*", category=FutureWarning)
    level = ds_logger.level
    ds_logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            engine, opt, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    finally:
        ds_logger.setLevel(level)
    return engine, opt


def _unlink_comm_buffers(env) -> None:
    """Removes the names of DeepSpeed's CPU all-reduce buffers (their memory stays mapped until exit).

    On CPU, DeepSpeed's shared-memory all-reduce creates one ~69 MB POSIX shared-memory segment per
    rank, ``/dev/shm/deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>``, and never
    unlinks it: every run would leave its segments in /dev/shm (RAM) until the machine reboots. Each
    rank maps every other rank's segment during ``deepspeed.initialize`` (it waits for them to exist);
    after a barrier all have, so each rank unlinks its own name and the kernel frees the memory when
    the last process using it exits.
    """
    if env.device.type != "cpu" or not dist.is_initialized():
        return
    dist.barrier()
    name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{env.rank}")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join("/dev/shm", name))


@ENGINES.register("deepspeed")
class DeepSpeedEngine:
    """The backbone inside a DeepSpeed engine (see the module doc for the conventions)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, head_optimizer, env, cfg: Config):
        deepspeed = _import_deepspeed(env.device)
        os.environ.setdefault("LOCAL_RANK", str(env.local_rank))
        self.env, self.head_optimizer, self.precision = env, head_optimizer, cfg.parallel.precision
        self.grad_clip, self.clip_scope = cfg.optimizer.grad_clip, cfg.optimizer.clip_scope
        self.input_dtype = torch.bfloat16 if self.precision == "bf16" else \
            torch.float16 if self.precision == "fp16" else torch.float32
        # DeepSpeed casts the parameters to bf16/fp16 but not the buffers (BatchNorm's running statistics),
        # which the normalization kernels then refuse: cast the whole module first (the same values)
        model = model.to(device=env.device, dtype=self.input_dtype)
        self.ds, self.optimizer = _initialize(deepspeed, model, optimizer, deepspeed_config(cfg))
        _unlink_comm_buffers(env)
        self.module = self.ds.module
        self._last = True
        self.skipped_by_head = 0
        self.last_norms: dict[str, float] = {}
        log.debug("DeepSpeed ZeRO-%d engine, precision %s", self.ds.zero_optimization_stage(), self.precision)

    def describe(self) -> str:
        """``deepspeed ZeRO-<stage>``."""
        return f"deepspeed ZeRO-{int(self.ds.zero_optimization_stage())}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The embeddings (B_local, D); floating inputs cast to the precision's dtype."""
        return self.ds(x.to(self.input_dtype) if x.is_floating_point() else x)

    @contextlib.contextmanager
    def accumulating(self, last: bool):
        """Records whether this is the update's last micro-batch (``backward`` steps DeepSpeed before it)."""
        self._last = last
        yield

    def backward(self, emb: torch.Tensor, grad_emb: torch.Tensor) -> None:
        """engine.backward of the surrogate <emb, grad_emb> (its gradient w.r.t. emb is grad_emb)."""
        surrogate = (emb.float() * grad_emb.float()).sum()
        self.ds.backward(surrogate, scale_wrt_gas=False)
        if not self._last:
            self.ds.step()  # not a boundary: only advances DeepSpeed's micro-step counter

    def set_lr(self, lr: float) -> None:
        """The learning rate of both optimizers (DeepSpeed's param_groups are the client optimizer's)."""
        for opt in (self.optimizer, self.head_optimizer):
            for group in opt.param_groups:
                group["lr"] = lr

    def update(self, head) -> bool:
        """DeepSpeed's boundary step (its own overflow check), then the head's update when both are finite."""
        head_params = [head.weight]
        head_finite = all_finite(head_params, group=head.group)
        if head_finite and self.grad_clip > 0 and self.clip_scope == "head":
            self.last_norms = clip_grads_([], head_params, self.grad_clip, "head", head.group)
        self.ds.step()
        applied = bool(self.ds.was_step_applied())
        if applied and not head_finite:
            self.skipped_by_head += 1
            log.error("non-finite head gradients with finite backbone gradients: the head step was skipped, "
                      "DeepSpeed's was not")
        if applied and head_finite:
            self.head_optimizer.step()
        elif not applied and self.env.is_main:
            log.warning("non-finite gradients: DeepSpeed skipped its step, the head step is skipped with it")
        self.head_optimizer.zero_grad(set_to_none=True)
        return applied and head_finite

    def save(self, path: str) -> None:
        """Collective: DeepSpeed's own checkpoint form (its ZeRO partitions, fp32 masters, loss scale) under
        the folder ``path`` (which the checkpointer made). A storage error while DeepSpeed writes its files (a
        full disk) is raised after this rank has met the others in the barrier DeepSpeed's save ends with (its
        collectives come before the writes), so every rank returns and the checkpointer abandons the save on
        all of them together."""
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                self.ds.save_checkpoint(path, tag="engine", save_latest=False)
        except (OSError, RuntimeError) as err:
            if storage_error(err) and dist.is_initialized():
                dist.barrier()
            raise

    def load(self, path: str, saved_world_size: int) -> str | None:
        """Collective: the state DeepSpeed saved under the folder ``path`` on ``saved_world_size`` ranks. On that
        world size (or without ZeRO: nothing is partitioned) DeepSpeed's own ``load_checkpoint``; on another one
        the ZeRO-1/2 partitions are re-partitioned (``_repartition``), and the note says so. DeepSpeed reads its
        files with ``weights_only=False``, so each is first read weights-only (see refuse_code): a file carrying
        code is refused before DeepSpeed opens it."""
        refuse_code(path)
        same = saved_world_size == self.env.world_size or not self.ds.zero_optimization()
        with contextlib.redirect_stdout(io.StringIO()):
            self.ds.load_checkpoint(path, tag="engine", load_optimizer_states=same, load_lr_scheduler_states=False)
        if same:
            return None
        self._repartition(read_partitions(path, saved_world_size))
        return (f"DeepSpeed ZeRO-{int(self.ds.zero_optimization_stage())} optimizer state re-partitioned from "
                f"{saved_world_size} to {self.env.world_size} ranks")

    def _repartition(self, partitions: list[dict]) -> None:
        """Sets this rank's partition of the fp32 masters and of the optimizer state from ``full_states`` of the
        saved ranks' ``partitions``. The client optimizer holds one flat fp32 partition per param group; a state
        it has not created yet (no step taken since the engine started) is created as zeros first and linked to
        the parameters' fragments as DeepSpeed links it after its first step."""
        from deepspeed.utils import (
            lazy_init_hp_params_optimizer_state,
            safe_set_full_fp32_param,
            safe_set_full_optimizer_state,
        )

        full, groups = full_states(partitions)
        params = {name: p for name, p in self.module.named_parameters() if p.requires_grad}
        _check_same_parameters(full, params)
        base = self.optimizer.optimizer  # the client torch optimizer over this rank's flat partitions
        if len(groups) != len(base.param_groups):
            raise CheckpointError(f"the DeepSpeed checkpoint has {len(groups)} optimizer param groups, this "
                                  f"run's optimizer {len(base.param_groups)}: resume with the config that wrote it")
        for g, (group, (keys, values)) in enumerate(zip(base.param_groups, groups)):
            hp = group["params"][0]  # (partition,) fp32
            for key in keys:
                base.state[hp].setdefault(key, torch.zeros_like(hp))
            base.state[hp].update({k: v.to(hp.device) if torch.is_tensor(v) else v for k, v in values.items()})
            lazy_init_hp_params_optimizer_state(
                [p for p in params.values() if p._hp_mapping is not None and p._hp_mapping.param_group_index == g],
                hp, base.state)
        for name, p in params.items():
            for key, value in full[name].items():
                value = value.to(p.device).view(p.shape)
                if key == "fp32":
                    safe_set_full_fp32_param(p, value)
                else:
                    safe_set_full_optimizer_state(p, value, key)
        self.optimizer._load_global_state(partitions[0])  # DeepSpeed's own: loss scaler, clip, overflow


def read_partitions(path: str, saved_world_size: int) -> list[dict]:
    """The ZeRO optimizer state (``optimizer_state_dict``) of every rank that wrote the DeepSpeed folder ``path``,
    in rank order, read weights-only; CheckpointError when a rank's file is missing."""
    from deepspeed.checkpoint.constants import OPTIMIZER_STATE_DICT

    files = {}
    for name in glob.glob(os.path.join(path, "engine", "*zero_pp_rank_*_mp_rank_00_optim_states.pt")):
        files[int(re.search(r"zero_pp_rank_(\d+)_", os.path.basename(name)).group(1))] = name
    if sorted(files) != list(range(saved_world_size)):
        raise CheckpointError(f"{path}: DeepSpeed's optimizer partitions of ranks {sorted(files)} are there, the "
                              f"checkpoint was written by {saved_world_size}: it is incomplete; pick another one")
    with _deepspeed_safe_globals():
        return [load_weights_only(files[rank])[OPTIMIZER_STATE_DICT] for rank in range(saved_world_size)]


def full_states(partitions: list[dict]) -> tuple[dict[str, dict[str, torch.Tensor]], list[tuple[list, dict]]]:
    """The world-size-independent form of the saved ranks' ZeRO ``partitions``: for each parameter name, its
    flat (numel,) fp32 master ("fp32") and every partitioned optimizer state (SGD's momentum_buffer, AdamW's
    exp_avg and exp_avg_sq), each the concatenation, in rank order, of the fragments the ranks held
    (``param_slice_mappings``: name -> (start, numel) in that rank's flat partition); and per param group the
    names of its partitioned states and the state values that are not partitioned (AdamW's step), rank 0's:
    every rank holds the same."""
    from deepspeed.checkpoint.constants import BASE_OPTIMIZER_STATE, PARAM_SLICE_MAPPINGS
    from deepspeed.checkpoint.constants import SINGLE_PARTITION_OF_FP32_GROUPS as FP32_GROUPS

    pieces: dict[str, dict[str, list[torch.Tensor]]] = {}
    groups = []
    for rank, sd in enumerate(partitions):
        base = sd[BASE_OPTIMIZER_STATE]  # the client optimizer's state_dict: one flat parameter per group
        for g, mapping in enumerate(sd[PARAM_SLICE_MAPPINGS]):
            state = base["state"].get(base["param_groups"][g]["params"][0], {})
            flat = {"fp32": sd[FP32_GROUPS][g], **{k: v for k, v in state.items() if torch.is_tensor(v) and v.dim()}}
            if rank == 0:
                groups.append((sorted(set(flat) - {"fp32"}), {k: v for k, v in state.items() if k not in flat}))
            for name, address in mapping.items():
                for key, value in flat.items():
                    pieces.setdefault(name, {}).setdefault(key, []).append(value.narrow(0, address.start,
                                                                                         address.numel))
    return {name: {key: torch.cat(parts) for key, parts in state.items()} for name, state in pieces.items()}, groups


def _check_same_parameters(full: dict, params: dict) -> None:
    """CheckpointError unless the saved parameters are this backbone's, with the same sizes."""
    problems = [f"{name} is not in the checkpoint" for name in params if name not in full]
    problems += [f"{name} is not in this backbone" for name in full if name not in params]
    problems += [f"{name} has {full[name]['fp32'].numel()} values saved, {p.numel()} here" for name, p in params.items()
                 if name in full and full[name]["fp32"].numel() != p.numel()]
    if problems:
        raise CheckpointError(f"the DeepSpeed checkpoint does not fit this backbone ({'; '.join(problems[:5])}): "
                              "resume with the model config that wrote it")


def _deepspeed_safe_globals():
    """``torch.serialization.safe_globals`` of the four plain DeepSpeed classes its optimizer files hold (loss
    scalers, the ZeRO stage enum, fragment addresses; measured on DeepSpeed 0.19)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return torch.serialization.safe_globals([LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address])


def refuse_code(folder: str) -> None:
    """Reads every ``.pt`` file of a DeepSpeed checkpoint folder weights-only, allowing the plain DeepSpeed classes
    of ``_deepspeed_safe_globals``; anything else raises CheckpointError naming the file."""
    with _deepspeed_safe_globals():
        for path in sorted(glob.glob(os.path.join(folder, "**", "*.pt"), recursive=True)):
            load_weights_only(path)
