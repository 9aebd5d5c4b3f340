"""The grid of ``dsoft bench accuracy --sweep KEY=V1,V2`` and the runs of its ``--config FILE`` form.

    sweeps = parse_sweeps(["head.end_point=0.85,0.9", "head.scale=32,64"])  # [(key, [values]), ...]
    points = grid_points(sweeps)          # the cartesian product, in the keys' order: [{key: value}, ...]
    point_overrides(points[0])            # ["head.end_point=0.85", "head.scale=32"]: as ``dsoft train --set`` takes
    base, digest = load_user_config("my.yaml")   # the resolved config dict, the file's sha256
    trainer_figures(run_folder)           # the final verification the trainer logged: {"lfw/accuracy": ...}

A value is read as the config loader reads an override (a YAML scalar; ``1e-3`` is a number here too), so
``head.scale=48`` and ``head.scale=48.0`` are one point. Keys the bench sets per run are refused (``RESERVED``
names the option that sets them), as are a key given twice, an empty value list and a value given twice.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import re

import yaml

from dsoft_dist.bench.accuracy_report import SAMPLED_HEADS
from dsoft_dist.config.loader import config_to_dict, load_config

_RUN_FOLDER = "--out (each run trains, checkpoints and resumes in its own folder under it)"
# keys the bench sets for each run -> the option that chooses them
RESERVED = {
    "name": "--out (a run is named by its part, method, rate, seed and point)", "logging.output_dir": _RUN_FOLDER,
    "seed": "--seeds", "data.seed": "--seeds", "head.seed": "--seeds",
    "head.loss": "--methods", "head.negatives": "--methods", "head.sample_rate": "--rates",
    "parallel.nproc": "--nproc", "checkpoint.dir": _RUN_FOLDER, "checkpoint.resume": _RUN_FOLDER,
    "logging.overwrite": _RUN_FOLDER,
}
# what YAML 1.1 leaves a string and the schema reads as a float (1e-3): a number in a grid point too
_EXPONENT_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")
_METHOD_OF_HEAD = {("d_softmax", "batch"): "d_softmax_b", **{head: m for m, head in SAMPLED_HEADS.items()}}


def split_values(text: str) -> list[str]:
    """'32,64' -> ['32', '64']; commas inside [...] or {...} belong to the value ('[1,2],[3]' is two lists)."""
    values, depth, start = [], 0, 0
    for i, char in enumerate(text):
        depth += (char in "[{") - (char in "]}")
        if char == "," and depth == 0:
            values.append(text[start:i].strip())
            start = i + 1
    return [*values, text[start:].strip()]


def parse_value(text: str):
    """A grid value as the config loader reads an override's value (a YAML scalar or list), with 1e-3 a float."""
    value = yaml.safe_load(text)
    return float(value) if isinstance(value, str) and _EXPONENT_FLOAT.fullmatch(value) else value


def _checked_key(item: str, seen: set) -> tuple[str, str]:
    """(key, values text) of one ``--sweep`` item; ValueError naming it unless the grid may sweep the key."""
    if "=" not in item:
        raise ValueError(f"--sweep {item!r} is invalid: write KEY=V1,V2,..., e.g. --sweep head.scale=32,64")
    key, text = (part.strip() for part in item.split("=", 1))
    if not key:
        raise ValueError(f"--sweep {item!r} names no key: write KEY=V1,V2,..., e.g. --sweep head.scale=32,64")
    if key in RESERVED:
        raise ValueError(f"--sweep {key}: the bench sets {key} for each run; use {RESERVED[key]} instead")
    inside = [r for r in RESERVED if r.startswith(key + ".")]
    if inside:
        raise ValueError(f"--sweep {key}: sweep single keys ({key}.KEY=V1,V2), not the section, whose "
                         f"{', '.join(inside)} the bench sets for each run")
    if key in seen:
        raise ValueError(f"--sweep {key} is given twice: give all its values in one --sweep {key}=V1,V2,...")
    return key, text


def parse_sweeps(items: list[str]) -> list[tuple[str, list]]:
    """The ``--sweep KEY=V1,V2,...`` options as [(key, [values])] in the order given; ValueError naming the
    option and the fix for a malformed item, a reserved key, a key given twice, an empty value or a repeat."""
    sweeps: list[tuple[str, list]] = []
    for item in items:
        key, text = _checked_key(item, {k for k, _ in sweeps})
        texts = split_values(text)
        if not all(texts):
            raise ValueError(f"--sweep {key}={text} has an empty value: give comma-separated values, e.g. "
                             f"--sweep {key}=V1,V2")
        try:
            values = [parse_value(t) for t in texts]
        except yaml.YAMLError as err:
            raise ValueError(f"--sweep {key}={text}: a value is not valid YAML ({err})") from err
        repeated = [t for i, (t, v) in enumerate(zip(texts, values)) if v in values[:i]]
        if repeated:
            raise ValueError(f"--sweep {key}={text} gives {repeated[0]} twice: give each value once")
        sweeps.append((key, values))
    return sweeps


def grid_points(sweeps: list[tuple[str, list]]) -> list[dict]:
    """The cartesian product of the swept values, the first key outermost; [{}] (one run per setting) without
    a sweep."""
    keys = [key for key, _ in sweeps]
    return [dict(zip(keys, combo)) for combo in itertools.product(*(values for _, values in sweeps))]


def point_overrides(point: dict) -> list[str]:
    """A grid point as ``section.key=value`` override strings (JSON is YAML, so each value reads back as given)."""
    return [f"{key}={json.dumps(value)}" for key, value in point.items()]


def check_verifies(cfg, where: str) -> None:
    """ValueError unless the validated Config ``cfg`` verifies something at the end of training (the figures a
    ``--config`` run is reported by)."""
    e = cfg.eval
    if not (e.bins or e.pairs or e.synthetic_identities):
        raise ValueError(f"{where}: its eval section verifies nothing, so the run would have no figures to report: "
                         "add eval.bins, eval.pairs or eval.synthetic_identities (data.source=synthetic, images)")


def load_user_config(path: str) -> tuple[dict, str]:
    """(the resolved config dict, the sha256 of the file's bytes) of a ``dsoft train`` YAML, loaded and checked
    as ``dsoft train`` loads it (ConfigError naming the key) and refused unless it verifies something."""
    cfg = load_config(path)
    check_verifies(cfg, f"--config {path}")
    with open(path, "rb") as fh:
        digest = hashlib.sha256(fh.read()).hexdigest()
    return config_to_dict(cfg), digest


def own_method(head: dict) -> tuple[str, float]:
    """(method, rate) of a config's own head section: the bench's method name where one matches its loss and
    negatives (d_softmax + random = d_softmax_k), else the loss; the rate of sampled negatives, else 1."""
    loss, negatives = head["loss"], head["negatives"]
    method = _METHOD_OF_HEAD.get((loss, negatives), loss if negatives == "all" else f"{loss}_{negatives}")
    return method, (head["sample_rate"] if negatives in ("random", "partial", "nearest") else 1.0)


def user_run_config(base: dict, nproc: int | None) -> dict:
    """A copy of the user's resolved config with the bench's run policy: checkpoints every third of the run
    (one kept, ``resume: auto``, in the run's folder), no overwrite, no progress bar; ``nproc`` (``--nproc``)
    replaces parallel.nproc when given. The run's name, seeds, head and folder are set by the caller."""
    cfg = json.loads(json.dumps(base))  # a deep copy of plain data
    steps = cfg["schedule"]["steps"]
    cfg["checkpoint"].update(every_steps=max(1, steps // 3), keep_last=1, resume="auto", dir="")
    cfg["logging"].update(overwrite=False, progress=False)
    if nproc is not None:
        cfg["parallel"]["nproc"] = nproc
    return cfg


def trainer_figures(out: str) -> dict:
    """The run's final verification as the trainer logged it (the last ``"eval"`` row of out/metrics.jsonl):
    each set's ``accuracy`` and TAR (``val_at_far``, ``tar@<far>``) as fractions, and ``"figures"``, their names.
    RuntimeError when the run logged none."""
    path = os.path.join(out, "metrics.jsonl")
    with open(path, encoding="utf-8") as fh:
        evals = [row for row in (json.loads(line) for line in fh if line.strip()) if row.get("eval")]
    if not evals:
        raise RuntimeError(f"{path} holds no verification row: the run ended without verifying")
    figures = {k: float(v) for k, v in evals[-1].items()
               if k.endswith(("/accuracy", "/val_at_far")) or "/tar@" in k}
    return {**figures, "figures": list(figures)}

