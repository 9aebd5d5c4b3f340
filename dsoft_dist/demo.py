"""``dsoft demo``: the embedded default job, end to end on a CPU.

Trains a tiny IResNet with the class-sharded D-Softmax head on procedural synthetic
identities in ``parallel.nproc`` real gloo processes (DDP backbone, model-parallel head),
then verifies on identities never seen in training (10-fold protocol on a .bin built
from the synthetic evaluation range, read back through the safe loader) and prints a
report comparing the untrained and the trained backbone.

    dsoft demo                                            # the embedded default (= configs/demo.yaml)
    dsoft demo --set head.negatives=random --set head.sample_rate=0.25
    dsoft demo --config configs/demo.yaml --set parallel.nproc=1 --set schedule.steps=50

Outputs under ``logging.output_dir``: metrics.jsonl, report.json, report.md,
backbone.pt and head/ (re-shardable head checkpoint).
"""
from __future__ import annotations

import copy
import json
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dsoft_dist.config import apply_overrides, config_from_dict, config_to_dict, load_config
from dsoft_dist.config.schema import Config, ConfigError
from dsoft_dist.observability import get_logger
from dsoft_dist.parallel import free_port

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
}
EVAL_IDENTITIES, EVAL_PAIRS = 100, 600



def build_eval_bin(cfg: Config, path: str) -> str:
    """Writes a .bin of EVAL_PAIRS pairs over EVAL_IDENTITIES unseen synthetic identities."""
    from dsoft_dist.data.verification import collect_synthetic, sample_pairs, write_bin

    groups = collect_synthetic(EVAL_IDENTITIES, per_identity=6, image_size=cfg.data.image_size, seed=cfg.data.seed,
                               fmt="png")
    write_bin(path, sample_pairs(groups, EVAL_PAIRS, seed=cfg.seed))
    return path


def _evaluate(model, cfg: Config, pairs) -> dict:
    """10-fold verification of ``model`` on ``pairs`` = (images, issame) from load_bin."""
    from dsoft_dist.eval.runner import evaluate_loaded

    res = evaluate_loaded(model, *pairs, name="synthetic_unseen", batch_size=256, flip=True, folds=cfg.eval.folds)
    return {"accuracy": res["accuracy"], "accuracy_std": res["accuracy_std"], "val@far=1e-3": res["val"]}


def _build(cfg: Config):
    from dsoft_dist.head import ShardedClassifier
    from dsoft_dist.head.optim import build_head_optimizer

    model = _backbone(cfg)  # the same initial backbone on every rank
    head = ShardedClassifier.from_config(cfg.head, cfg.data.num_classes, cfg.model.embedding_size)
    o = cfg.optimizer
    if o.name == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay,
                              nesterov=o.nesterov)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                                weight_decay=o.weight_decay)
    return model, head, opt, build_head_optimizer(head, o)


def _batches(cfg: Config, rank: int, world: int):
    """Endless (images, labels) over epochs of the synthetic training identities."""
    from dsoft_dist.data import build_train_loader

    epoch = 0
    while True:
        yield from build_train_loader(cfg.data, rank, world, epoch)
        epoch += 1


def _train(cfg: Config, rank: int, world: int, sink):
    """Runs cfg.schedule.steps steps; returns (backbone, head, head optimizer, logged rows)."""
    from torch.nn.parallel import DistributedDataParallel
    from tqdm import tqdm

    from dsoft_dist.train import lr_factor

    model, head, opt, head_opt = _build(cfg)
    net = DistributedDataParallel(model) if world > 1 else model
    rows, batches, start = [], _batches(cfg, rank, world), time.time()
    bar = tqdm(total=cfg.schedule.steps, desc="demo", disable=rank != 0 or not cfg.logging.progress, file=sys.stderr)
    for step in range(cfg.schedule.steps):
        images, labels = next(batches)
        for o in (opt, head_opt):
            for group in o.param_groups:
                group["lr"] = cfg.optimizer.lr * lr_factor(step, cfg.schedule)
        emb = net(images)  # (B_local, D)
        if world > 1:  # DDP averages over ranks; the head's gradient is already the global mean's
            emb.register_hook(lambda g: g * world)
        loss = head(emb, labels)
        opt.zero_grad(set_to_none=True)
        head_opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.optimizer.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optimizer.grad_clip)
        opt.step()
        head_opt.step()
        bar.update(1)
        if (step + 1) % cfg.logging.log_every == 0 or step == 0 or step + 1 == cfg.schedule.steps:
            row = {"loss": float(loss.detach()), **head.diagnostics(), "lr": opt.param_groups[0]["lr"],
                   "samples_per_s": (step + 1) * images.shape[0] * world / (time.time() - start)}
            bar.set_postfix(loss=f"{row['loss']:.3f}")
            if sink is not None:
                sink.log(step + 1, row)
            rows.append({"step": step + 1, **row})
    bar.close()
    return model, head, head_opt, rows


def _worker(rank: int, world: int, port: int, cfg_dict: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        _run_rank(config_from_dict(cfg_dict), rank, world)
    finally:
        dist.destroy_process_group()


def _run_rank(cfg: Config, rank: int, world: int) -> None:
    from dsoft_dist.head.state import save_head_checkpoint
    from dsoft_dist.models import save_backbone
    from dsoft_dist.observability.metrics import MetricsSink

    out = cfg.logging.output_dir
    sink = MetricsSink(out, cfg.logging.wandb, cfg.logging.wandb_project, cfg.name, config_to_dict(cfg)) if rank == 0 else None
    bin_path = os.path.join(out, "synthetic_unseen.bin")
    if rank == 0:
        build_eval_bin(cfg, bin_path)
    dist.barrier()
    t0 = time.time()
    model, head, head_opt, rows = _train(cfg, rank, world, sink)
    seconds = time.time() - t0
    save_head_checkpoint(os.path.join(out, "head"), head, head_opt)  # collective
    if rank == 0:
        save_backbone(os.path.join(out, "backbone.pt"), model, cfg.model)
        from dsoft_dist.eval.binfile import load_bin

        pairs = load_bin(bin_path)  # decoded once for both models
        report = {"config": config_to_dict(cfg), "world_size": world, "train_seconds": round(seconds, 1),
                  "log": rows, "untrained": _evaluate(_backbone(cfg), cfg, pairs),
                  "trained": _evaluate(model, cfg, pairs)}
        sink.close()  # before the report, so wandb's closing lines do not follow it
        _write_report(report, out)
    dist.barrier()


def _backbone(cfg: Config):
    """The backbone as initialized from cfg.seed (so the untrained one can be rebuilt for the report)."""
    from dsoft_dist.models import build_model

    torch.manual_seed(cfg.seed)
    m = cfg.model
    return build_model(m.name, embedding_size=m.embedding_size, input_size=m.input_size,
                       in_features=m.in_features, dropout=m.dropout)


def _write_report(report: dict, out: str) -> None:
    cfg = report["config"]
    lines = [
        f"# dsoft demo: {cfg['head']['loss']} (negatives={cfg['head']['negatives']}, "
        f"r={cfg['head']['sample_rate']}), {cfg['model']['name']}",
        "",
        f"{cfg['data']['num_classes']} synthetic training identities, {report['world_size']} gloo ranks x "
        f"{cfg['data']['batch_size']} images, {cfg['schedule']['steps']} steps in {report['train_seconds']} s",
        "",
        "| step | loss | intra | inter | target cos | hardest negative cos | samples/s |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["log"]:
        lines.append(f"| {r['step']} | {r['loss']:.3f} | {r.get('intra', float('nan')):.3f} | "
                     f"{r.get('inter', float('nan')):.3f} | {r['target_cos']:.3f} | "
                     f"{r.get('hardest_neg_cos', float('nan')):.3f} | {r['samples_per_s']:.0f} |")
    u, t = report["untrained"], report["trained"]
    lines += ["", f"Verification on {EVAL_PAIRS} pairs of {EVAL_IDENTITIES} identities never seen in training "
              "(10-fold accuracy, flip-augmented embeddings):", "",
              "| backbone | accuracy | VAL@FAR=1e-3 |", "|---|---:|---:|",
              f"| untrained | {u['accuracy']:.4f} +- {u['accuracy_std']:.4f} | {u['val@far=1e-3']:.4f} |",
              f"| trained | {t['accuracy']:.4f} +- {t['accuracy_std']:.4f} | {t['val@far=1e-3']:.4f} |", ""]
    text = "\n".join(lines)
    with open(os.path.join(out, "report.md"), "w", encoding="utf-8") as f:
        f.write(text)
    with open(os.path.join(out, "report.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)
    sys.stdout.write(text + f"\nWritten to {out}/ (report.md, report.json, metrics.jsonl, backbone.pt, head/)\n")


def run_demo(cfg: Config) -> None:
    """Spawns cfg.parallel.nproc gloo processes that train and evaluate (rank 0 reports)."""
    if cfg.parallel.backend == "nccl":
        raise ConfigError("parallel.backend='nccl' is invalid for dsoft demo: it runs on CPU with gloo")
    os.makedirs(cfg.logging.output_dir, exist_ok=True)
    mp.start_processes(_worker, args=(cfg.parallel.nproc, free_port(), copy.deepcopy(config_to_dict(cfg))),
                       nprocs=cfg.parallel.nproc, start_method="spawn", join=True)


def _main(args) -> int:
    try:
        if args.config:
            cfg = load_config(args.config, args.set)
        else:
            cfg = config_from_dict(apply_overrides(copy.deepcopy(DEMO_CONFIG), args.set))
    except ConfigError as err:
        sys.stderr.write(f"dsoft demo: {err}\n")
        return 1
    run_demo(cfg)
    return 0


def register(subparsers) -> None:
    """Adds ``dsoft demo``."""
    parser = subparsers.add_parser("demo", help="train D-Softmax on synthetic identities on CPU ranks, verify, report")
    parser.add_argument("--config", default=None, help="YAML config (default: the embedded demo = configs/demo.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="dotted override, e.g. --set head.negatives=random (repeatable)")
    parser.set_defaults(func=_main)
