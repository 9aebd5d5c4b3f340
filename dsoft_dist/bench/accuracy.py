"""The paper's accuracy comparison, and a grid over any config keys to tune d and s on your own data: every run
trained by ``dsoft train`` with the same budget and seeds, verified on identities never seen in training.

    dsoft bench accuracy                                   # vectors and images, 3 seeds: about an hour on 2 CPU cores
    dsoft bench accuracy --parts glyphs --methods arcface,d_softmax,d_softmax_k --rates 1,1/8,1/64
    dsoft bench accuracy --parts vectors --seeds 0 --methods d_softmax,d_softmax_k --rates 1,1/64
    dsoft bench accuracy --parts images --methods d_softmax,arcface --sweep head.scale=32,64 --seeds 0,1,2
    dsoft bench accuracy --config my.yaml --sweep head.end_point=0.85,0.9,0.95 --sweep head.scale=32,64 --seeds 0,1

Three parts, each on identities generated here (``dsoft_dist.data.synthetic``, ``dsoft_dist.data.glyphs``)
sized for a CPU; ``--parts`` defaults to vectors and images:

| part | data | backbone | methods (default) |
|---|---|---|---|
| vectors | 20,000 vector identities x 8 samples, ``data.difficulty=hard`` | ``mlp`` | every method below |
| images | 500 image identities x 16 samples (32 px, medium) | ``iresnet_tiny`` | the seven full losses |
| glyphs | 1,000 glyph identities x 16 samples (32 px, easy, 16 font styles) | ``iresnet_tiny`` | seven full losses |

| method | head | rates |
|---|---|---|
| softmax, normface, sphereface, cosface, arcface, d_softmax_paper, d_softmax | that loss over all classes | 1 |
| d_softmax_b | D-Softmax-B: the inter term over the batch's classes | its K / C |
| d_softmax_k | D-Softmax-K: the inter term over a random r of the classes | --rates |
| d_softmax_kn | D-Softmax-K whose every row adds its class's nearest classes (not run by default) | --rates |
| d_softmax_partial | D-Softmax over partial_fc's negatives (K = r C is their floor) | --rates |
| partial_fc | Partial-FC-style: ArcFace over the batch's positives + random others up to r C | --rates |
| sampled_softmax | plain sampled softmax: linear softmax over a random r of the classes | --rates |

d_softmax_paper is D-Softmax in the paper's form (d = 0.9, a constant inter weight w = 1), d_softmax at its
presets (d = 1, w from 1 to 0 along a half cosine); the D-Softmax variants below take d_softmax's.
At r = 1 the sampled methods are their full loss (d_softmax_k = d_softmax_partial = d_softmax,
partial_fc = arcface, sampled_softmax = softmax), so their r = 1 rows are those runs. Every run of a seed shares the
seed's synthetic world (``seed``, ``data.seed`` and ``head.seed`` are the seed), the schedule,
the batch and the optimizer; the seeds give the spread.

Verification (the same for every run): ``--eval-identities`` unseen identities (global ids from
``EVAL_IDENTITY_OFFSET``; glyphs: at most the 500 characters kept for evaluation) x ``--eval-samples``
samples, embedded by the run's ``backbone.pt`` (images: the flip-summed embedding; glyphs are not
mirrored), every pair scored by cosine: TAR at FAR = 1e-3 and 1e-4 over
all pairs (1000 x 4 gives 6,000 genuine and 7,992,000 impostor pairs), and the 10-fold accuracy
over the genuine pairs plus as many impostor pairs drawn at random.

The grid: ``--sweep KEY=V1,V2,...`` (repeatable; any dotted config key, values read as ``dsoft train --set``
reads them) trains every run once per point of the cartesian product, the point's overrides applied after
the part's and the method's settings; every point's config is validated before anything trains. A run's
name ends in its point (``@end_point=0.85,scale=32``). ``--config FILE`` (a ``dsoft train`` YAML) replaces
the built-in parts by your own data: every run is that config (its own head unless --methods is given) with
the run's seeds and the point, reported by the verification the trainer runs at the end of training on its
``eval.bins``, ``eval.pairs`` or ``eval.synthetic_identities``; --vector-*, --image-* and --eval-* are the
built-in parts' options and do not apply.

The sweep is resumable: each run trains in ``OUT/runs/<part>-<method>-<rate>-s<seed>[@<point>]/``
(checkpoints every third of the run; ``checkpoint.resume=auto`` continues an interrupted one), and its record
is appended to ``OUT/results.jsonl`` once verified; a rerun with the same settings (and the same --config
file) skips what is done, so a grid extended by more values trains only the new points.

Writes ``accuracy.json`` (settings, machine, one record per run), ``accuracy.csv``, ``accuracy.md``
(mean and spread over seeds, a column per swept key), ``loss_curves.png``, ``accuracy_vs_rate.png`` (the
built-in parts without a grid) and ``sweep.png`` (with a grid: each figure against the points) to --out
(``dsoft_dist.bench.accuracy_report``, ``dsoft_dist.bench.sweep_report``).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time

import numpy as np
import yaml

from dsoft_dist.bench.accuracy_grid import (
    check_verifies,
    grid_points,
    load_user_config,
    own_method,
    parse_sweeps,
    point_overrides,
    trainer_figures,
    user_run_config,
)
from dsoft_dist.bench.accuracy_report import (
    CONFIG_PART,
    FULL_LOSSES,
    METHODS,
    PART_OPTION,
    PARTS,
    SAMPLED_HEADS,
    figure_label,
    figures_of,
    format_markdown,
    point_text,
    summarize,
    write_outputs,
)
from dsoft_dist.bench.cli import bench_parser
from dsoft_dist.bench.speedup import SAMPLED, machine, parse_rates
from dsoft_dist.bench.sweep_report import write_sweep_plot
from dsoft_dist.config.loader import apply_overrides, config_from_dict
from dsoft_dist.config.schema import rate_text
from dsoft_dist.data.glyphs import GlyphIdentities, glyph_capacity
from dsoft_dist.data.synthetic import EVAL_IDENTITY_OFFSET, SyntheticIdentities, SyntheticVectors, vector_difficulty
from dsoft_dist.errors import ConfigError
from dsoft_dist.eval.extract import extract_embeddings
from dsoft_dist.eval.roc import tar_at_far
from dsoft_dist.eval.verification import verify_scores_kfold
from dsoft_dist.losses.forms import D_SOFTMAX_KEYS, D_SOFTMAX_LOSSES
from dsoft_dist.models.checkpoint import load_backbone
from dsoft_dist.registry import LOSSES
from dsoft_dist.utils import int_list

DEFAULT_METHODS = {"vectors": (*FULL_LOSSES, "d_softmax_b", *(m for m in SAMPLED if m != "d_softmax_kn")),
                   "images": FULL_LOSSES, "glyphs": FULL_LOSSES}
DEFAULT_PARTS = ("vectors", "images")
GLOBAL_BATCH = {"vectors": 256, "images": 128, "glyphs": 128}  # split over --nproc ranks
FARS = (1e-3, 1e-4)


def head_of(method: str) -> tuple[str, str]:
    """(head.loss, head.negatives) of a method."""
    if method == "d_softmax_b":
        return "d_softmax", "batch"
    return SAMPLED_HEADS.get(method, (method, "all"))


def part_config(part: str, args) -> dict:
    """The config every run of a part shares (its method, rate and seed are set per run)."""
    if part == "vectors":
        model = {"name": "mlp", "embedding_size": 128, "in_features": 128}
        data = {"synthetic_mode": "vectors", "vector_dim": 128, "difficulty": "hard",
                "num_classes": args.vector_classes, "samples_per_class": 8,
                "batch_size": GLOBAL_BATCH[part] // args.nproc}
        steps = args.vector_steps
    else:  # images, glyphs
        model = {"name": "iresnet_tiny", "embedding_size": 128, "input_size": 32}
        data = {"synthetic_mode": part, "image_size": 32, "difficulty": "medium" if part == "images" else "easy",
                "num_classes": getattr(args, f"{PART_OPTION[part]}_classes"), "samples_per_class": 16,
                "batch_size": GLOBAL_BATCH[part] // args.nproc, "num_workers": 1}
        steps = getattr(args, f"{PART_OPTION[part]}_steps")
    return {
        "model": model,
        "head": {"scale": 32.0},  # each D-Softmax loss at its own presets (d_softmax_paper: the paper's d = 0.9)
        "data": {"source": "synthetic", "num_workers": 0, **data},
        "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 5.0e-4},
        "schedule": {"steps": steps, "warmup_steps": max(1, steps // 15), "decay": "cosine"},
        "parallel": {"nproc": args.nproc, "backend": "gloo"},
        "logging": {"log_every": max(1, steps // 30), "progress": False},
        "checkpoint": {"every_steps": max(1, steps // 3), "keep_last": 1, "resume": "auto"},
    }


def method_rates(part: str, args) -> list[tuple[str, float]]:
    """(method, rate) of every run of a part per seed and point: the sampled methods at each --rates < 1, the
    others at 1; a --config without --methods: its own head's."""
    if part == CONFIG_PART and not args.method_list:
        return [own_method(args.user_config["head"])]
    return [(method, rate) for method in args.methods_of[part]
            for rate in ([r for r in args.rate_list if r < 1] if method in SAMPLED_HEADS else [1.0])]


def plan(args) -> list[dict]:
    """Every run of the sweep, seed by seed (an interrupted sweep has whole seeds first), a run per grid point;
    a point's run is named ``<part>-<method>-<rate>-s<seed>@<point_text>`` and records its ``"point"``."""
    runs = []
    for seed in args.seed_list:
        for part in args.part_list:
            for method, rate in method_rates(part, args):
                for point in args.points:
                    run = {"part": part, "method": method, "rate": rate, "seed": seed,
                           "name": f"{part}-{method}-{rate_text(rate).replace('/', 'of')}-s{seed}"}
                    if point:
                        run.update(name=f"{run['name']}@{point_text(point)}", point=point)
                    runs.append(run)
    return runs


def run_config(run: dict, args, out: str) -> dict:
    """The config dict of one planned run: its part's config (or the user's --config) with the run's head, seeds
    and output folder, then its grid point's overrides (which may change anything else)."""
    if run["part"] == CONFIG_PART:
        cfg = user_run_config(args.user_config, args.nproc_given)
    else:
        cfg = part_config(run["part"], args)
    if run["part"] != CONFIG_PART or args.method_list:
        loss, negatives = head_of(run["method"])
        if not LOSSES.get(loss).presets:  # a margin loss refuses D-Softmax's keys a --config may give its head
            for key in D_SOFTMAX_KEYS:
                cfg["head"].pop(key, None)
        cfg["head"].update(loss=loss, negatives=negatives, sample_rate=run["rate"])
    cfg["name"], cfg["seed"] = run["name"], run["seed"]
    cfg["head"]["seed"] = cfg["data"]["seed"] = run["seed"]
    cfg["logging"]["output_dir"] = out
    return apply_overrides(cfg, point_overrides(run.get("point") or {}))


def checked_runs(args) -> list[tuple[dict, dict]]:
    """(run, config dict) of every planned run, each config validated as ``dsoft train`` validates it, before
    any trains: ConfigError naming the grid point and the key; ValueError when two points share a run name or
    a --config run would verify nothing."""
    runs, names = [], {}
    for run in plan(args):
        cfg = run_config(run, args, os.path.join(args.out, "runs", run["name"]))
        point = ",".join(f"{key}={value}" for key, value in (run.get("point") or {}).items())
        where = f"--sweep point {point}" if point else f"run {run['name']}"
        try:
            checked = config_from_dict(copy.deepcopy(cfg))
        except ConfigError as err:
            raise ConfigError(f"{where}: {err}") from err
        if run["part"] == CONFIG_PART:
            check_verifies(checked, where)
        if run["name"] in names:
            raise ValueError(f"--sweep points {names[run['name']]} and {run['point']} give the same run name "
                             f"{run['name']!r}: give values that differ in letters, digits or . _ + -")
        names[run["name"]] = run.get("point")
        runs.append((run, cfg))
    return runs


def train(cfg: dict, out: str) -> float:
    """``dsoft train`` of a config dict in a subprocess, logging to ``out/train.log`` (with
    ``checkpoint.resume=auto`` it continues the run's newest checkpoint); returns its wall seconds."""
    os.makedirs(out, exist_ok=True)
    cfg_path = os.path.join(out, "config.yaml")
    with open(cfg_path, "w", encoding="utf-8") as fh:
        yaml.safe_dump(cfg, fh, sort_keys=False)
    log_path = os.path.join(out, "train.log")
    env = {**os.environ, "WANDB_MODE": os.environ.get("WANDB_MODE", "disabled")}
    start = time.perf_counter()
    with open(log_path, "a", encoding="utf-8") as log:
        code = subprocess.call([sys.executable, "-m", "dsoft_dist.cli", "train", "--config", cfg_path],
                               stdout=log, stderr=subprocess.STDOUT, env=env)
    if code != 0:
        with open(log_path, encoding="utf-8", errors="replace") as fh:
            tail = "".join(fh.readlines()[-15:])
        raise RuntimeError(f"dsoft train failed for {cfg['name']} (exit {code}); the end of {log_path}:\n{tail}")
    return time.perf_counter() - start


def unseen_inputs(data: dict, identities: int, per_identity: int):
    """(inputs, identity of each) of unseen identities in the synthetic world of a run's ``data`` config
    (its mode, seed, difficulty and vector or image size)."""
    ids = np.repeat(np.arange(identities), per_identity)
    index = np.tile(np.arange(per_identity), identities)
    if data["synthetic_mode"] == "vectors":
        src = SyntheticVectors(identities, dim=data["vector_dim"], seed=data["seed"],
                               identity_offset=EVAL_IDENTITY_OFFSET, **vector_difficulty(data["difficulty"]))
        return src.batch(ids, index), ids
    kind = GlyphIdentities if data["synthetic_mode"] == "glyphs" else SyntheticIdentities
    src = kind(identities, image_size=data["image_size"], seed=data["seed"], identity_offset=EVAL_IDENTITY_OFFSET,
               difficulty=data["difficulty"])
    return np.stack([src.sample(i, j) for i, j in zip(ids.tolist(), index.tolist())]), ids


def verify_embeddings(emb: np.ndarray, ids: np.ndarray, seed: int = 0) -> dict:
    """All-pairs TAR@FAR and the 10-fold accuracy (genuine pairs + as many random impostor pairs) of
    L2-normalized embeddings (N, D) with identities (N,)."""
    rows, cols = np.triu_indices(len(ids), 1)
    scores = (emb @ emb.T)[rows, cols]
    same = ids[rows] == ids[cols]
    tar = tar_at_far(scores, same, fars=FARS)
    rng = np.random.default_rng([seed, 17])
    genuine = np.flatnonzero(same)
    impostor = rng.choice(np.flatnonzero(~same), size=len(genuine), replace=False)
    pairs = rng.permutation(np.concatenate([genuine, impostor]))
    kfold = verify_scores_kfold(scores[pairs], same[pairs], folds=10)
    return {"accuracy": kfold["accuracy"], "accuracy_std": kfold["accuracy_std"],
            **{f"tar_at_{far:.0e}": tar[far] for far in FARS},
            "genuine_pairs": int(same.sum()), "impostor_pairs": int((~same).sum())}


def verify_run(cfg: dict, args, out: str) -> dict:
    """``verify_embeddings`` of the unseen identities embedded by the run's ``out/backbone.pt``."""
    model, _ = load_backbone(os.path.join(out, "backbone.pt"))
    identities = args.eval_identities
    if cfg["data"]["synthetic_mode"] == "glyphs":
        identities = min(identities, glyph_capacity()["eval"])
    inputs, ids = unseen_inputs(cfg["data"], identities, args.eval_samples)
    emb = extract_embeddings(model, inputs, batch_size=512, flip=cfg["data"]["synthetic_mode"] == "images")
    return verify_embeddings(emb, ids, seed=cfg["seed"])


def loss_curve(out: str) -> list[tuple[int, float]]:
    """(step, loss) of every logged step of a run."""
    with open(os.path.join(out, "metrics.jsonl"), encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r and "step" in r]


def sampled_k(cfg: dict) -> int:
    """Classes the inter term of a run's config touches per step; for d_softmax_b its upper bound, the
    global batch."""
    if cfg["head"]["negatives"] == "batch":
        return cfg["data"]["batch_size"] * cfg["parallel"]["nproc"]
    if cfg["head"]["negatives"] == "all":  # a --config may keep a sample_rate that "all" ignores
        return cfg["data"]["num_classes"]
    return int(np.ceil(cfg["head"]["sample_rate"] * cfg["data"]["num_classes"]))


def load_results(path: str) -> dict[str, dict]:
    """{run name: record} of the verified runs in results.jsonl ({} when there is none yet)."""
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as fh:
        return {r["name"]: r for r in (json.loads(line) for line in fh if line.strip())}


def settings(args) -> dict:
    """What the records depend on: a rerun must match it to reuse them. Not the grid, the methods, rates or
    seeds: a run's name says those, so a rerun with more of them reuses the runs it shares. The D-Softmax losses'
    presets too: a run named d_softmax trained at the presets of its day."""
    presets = {"presets": {name: LOSSES.get(name).presets for name in D_SOFTMAX_LOSSES}}
    if args.config:
        return {"config_sha256": args.config_sha256, "nproc": args.nproc_given, **presets}
    keys = [f"{PART_OPTION[part]}_{k}" for part in args.part_list for k in ("classes", "steps")]
    keys += ["eval_identities", "eval_samples", "nproc"]
    return {**{k: getattr(args, k) for k in keys}, **presets}


def check_settings(out: str, args) -> None:
    """Records ``settings(args)`` in out/settings.json (merged with what is there); ValueError when the folder
    holds a sweep whose shared settings differ, or one of the other form (--config against the built-in parts).
    A part's settings only bind that part's runs: another part, or one added since, is not a difference."""
    path = os.path.join(out, "settings.json")
    mine, theirs = settings(args), {}
    if os.path.exists(path):
        with open(path, encoding="utf-8") as fh:
            theirs = json.load(fh)
        diff = ", ".join(f"{k}: {theirs[k]} there, {v} now" for k, v in mine.items() if k in theirs and theirs[k] != v)
        if ("config_sha256" in theirs) != ("config_sha256" in mine):
            diff = "--config runs there" if "config_sha256" in theirs else "built-in parts there"
        elif "presets" not in theirs:
            diff = "runs from before the D-Softmax presets there, where d_softmax was the paper's form"
        if diff:
            raise ValueError(f"--out {out!r} holds a sweep with other settings ({diff}): use another --out, "
                             "or rerun with its settings to resume it")
    os.makedirs(out, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        json.dump({**theirs, **mine}, fh, indent=1)


def sweep(args, runs: list[tuple[dict, dict]]) -> list[dict]:
    """Trains and verifies every (run, config) of ``checked_runs`` not yet in results.jsonl (a built-in part's by
    ``verify_run``, a --config run's by the trainer); returns the records of the plan, in its order."""
    results_path = os.path.join(args.out, "results.jsonl")
    done = load_results(results_path)
    for i, (run, cfg) in enumerate(runs, 1):
        if run["name"] in done:
            continue
        out = cfg["logging"]["output_dir"]
        train_s = train(cfg, out)
        figures = trainer_figures(out) if run["part"] == CONFIG_PART else verify_run(cfg, args, out)
        record = {**run, "k": sampled_k(cfg), "train_s": train_s, **figures, "loss_curve": loss_curve(out)}
        with open(results_path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
        done[run["name"]] = record
        shown = ", ".join(f"{figure_label(f)} {record[f]:.4f}" for f in figures_of(record))
        print(f"[{i}/{len(runs)}] {run['name']}: {shown} ({train_s:.0f} s)", flush=True)
    return [done[run["name"]] for run, _ in runs]


def build_parser() -> argparse.ArgumentParser:
    """The options of ``dsoft bench accuracy`` (its help: the module doc's first two paragraphs, the examples)."""
    p = bench_parser("accuracy", "\n\n".join(__doc__.split("\n\n")[:2]),
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/accuracy", help="sweep folder (resumable; default runs/accuracy)")
    p.add_argument("--parts", default=None, help="comma-separated subset of vectors, images, glyphs "
                   "(default vectors,images)")
    p.add_argument("--config", default="", metavar="FILE",
                   help="a dsoft train YAML to run instead of the built-in parts (your own data; its eval section "
                        "must verify something): the part 'config'")
    p.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2",
                   help="a grid over a config key, e.g. head.end_point=0.85,0.9; repeat it for a cartesian product")
    p.add_argument("--methods", default="", help=f"comma-separated subset of {', '.join(METHODS)} "
                   "(default: every method for vectors, the seven full losses for images, the config's own head)")
    p.add_argument("--rates", default="1,1/8,1/64", help="sample rates of the sampled methods (default 1,1/8,1/64)")
    p.add_argument("--seeds", default="0,1,2", help="seeds (default 0,1,2)")
    p.add_argument("--vector-classes", type=int, default=20_000,
                   help="vectors part: training identities, 8 samples each (default 20,000)")
    p.add_argument("--vector-steps", type=int, default=300, help="vectors part: training steps per run (default 300)")
    p.add_argument("--image-classes", type=int, default=500,
                   help="images part: training identities, 16 samples each (default 500)")
    p.add_argument("--image-steps", type=int, default=300, help="images part: training steps per run (default 300)")
    p.add_argument("--glyph-classes", type=int, default=1000,
                   help="glyphs part: training characters, 16 samples each (default 1,000; at most 2,384)")
    p.add_argument("--glyph-steps", type=int, default=800, help="glyphs part: training steps per run (default 800)")
    p.add_argument("--eval-identities", type=int, default=1000, help="unseen identities verified (default 1000)")
    p.add_argument("--eval-samples", type=int, default=4, help="samples of each unseen identity (default 4)")
    p.add_argument("--nproc", type=int, default=None,
                   help="local ranks of each dsoft train run (default 1; a --config's own parallel.nproc)")
    return p


def _check_form(args) -> None:
    """The built-in parts (--parts) or the user's --config: fills part_list, and user_config and config_sha256."""
    if args.config:
        if args.parts is not None:
            raise ValueError(f"--parts {args.parts!r} and --config {args.config!r}: the runs of --config are the "
                             "part 'config'; drop --parts (or --config to run the built-in parts)")
        args.part_list = [CONFIG_PART]
        args.user_config, args.config_sha256 = load_user_config(args.config)
        return
    parts = args.parts if args.parts is not None else ",".join(DEFAULT_PARTS)
    args.part_list = [p.strip() for p in parts.split(",") if p.strip()]
    if not args.part_list or any(p not in PARTS for p in args.part_list):
        raise ValueError(f"--parts {parts!r} is invalid: choose from {', '.join(PARTS)}")


def check_args(args) -> None:
    """Fills the parsed lists (parts, methods, rates, seeds, grid points, a --config's resolved dict); ValueError
    naming the option on a bad value (ConfigError naming the key for a bad --config file)."""
    args.method_list = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in args.method_list if m not in METHODS]
    if unknown or (args.methods and not args.method_list):
        raise ValueError(f"--methods {args.methods!r}: unknown {unknown}; choose from {', '.join(METHODS)}")
    args.methods_of = {p: tuple(args.method_list) or DEFAULT_METHODS[p] for p in PARTS}
    args.methods_of[CONFIG_PART] = tuple(args.method_list)
    args.rate_list = parse_rates(args.rates)
    args.seed_list = int_list(args.seeds, "--seeds", 0)
    args.grid = parse_sweeps(args.sweep)
    args.points = grid_points(args.grid)
    if args.nproc is not None and args.nproc < 1:
        raise ValueError(f"--nproc {args.nproc} is invalid: must be >= 1")
    args.nproc_given, args.nproc = args.nproc, args.nproc or 1
    for name in ("vector_classes", "vector_steps", "image_classes", "image_steps", "glyph_classes", "glyph_steps",
                 "eval_samples"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} {getattr(args, name)} is invalid: must be >= 1")
    if args.eval_identities < 2 or args.eval_samples < 2:
        raise ValueError(f"--eval-identities {args.eval_identities} / --eval-samples {args.eval_samples}: "
                         "verification needs >= 2 identities with >= 2 samples each")
    _check_form(args)
    if "glyphs" in args.part_list and args.glyph_classes > glyph_capacity()["train"]:
        raise ValueError(f"--glyph-classes {args.glyph_classes} is invalid: the glyph set has "
                         f"{glyph_capacity()['train']} training characters; use at most that")
    for option, batch in GLOBAL_BATCH.items():
        if option in args.part_list and batch % args.nproc:
            raise ValueError(f"--nproc {args.nproc} does not divide the {option} part's global batch of {batch}")


def main(argv: list[str] | None = None) -> int:
    """Runs (or resumes) the sweep, then writes and prints its report; returns the exit code 0. Every run's config
    is validated before --out is written to or anything trains."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    check_args(args)
    runs = checked_runs(args)
    check_settings(args.out, args)
    records = sweep(args, runs)
    result = {"settings": settings(args), "machine": machine(argv, "accuracy"), "records": records}
    if args.config:
        result["config"] = args.config
    result["summary"] = summarize(records)
    result["markdown"] = format_markdown(result)
    paths = {**write_outputs(result, args.out), **write_sweep_plot(result, args.out)}
    sys.stdout.write(result["markdown"] + "\n\n" + "wrote " + ", ".join(paths.values()) + "\n")
    return 0

if __name__ == "__main__":
    sys.exit(main())
