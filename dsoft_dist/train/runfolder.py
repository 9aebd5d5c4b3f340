"""A run folder holds one run: its identity is recorded, and a start that would mix two runs is refused.

    problem = check_run_folder(cfg)     # None, or why this start would mix runs (read-only; any process)
    prepare_run_folder(cfg)             # rank 0, at the start: the check, ``--overwrite``'s clean-up, run.json

``<logging.output_dir>/run.json`` records what defines the run (``run_identity``: the model,
the loss and its negatives, the classes, the data; not ``extra_modules``, which only makes parts
available) and a hash of it. Then:

- ``checkpoint.resume: auto`` (the default) continues the folder's run only when this config
  defines the same run; a config that differs there (``--set head.loss=arcface`` into a
  D-Softmax folder) is refused, naming the keys. Keys that do not define the run (steps,
  learning rate, logging, verification) may change: ``--set schedule.steps=...`` trains longer.
- ``checkpoint.resume: never`` starts a new run, so a folder that already holds one is refused
  (the old run's checkpoints would stay beside the new ones).
- ``checkpoint.resume: <folder>`` is an explicit choice: it loads that checkpoint even when the
  config differs (the differences are logged) and records the new identity.
- ``logging.overwrite: true`` (``--overwrite``) deletes the old run's outputs first and starts afresh.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time

from dsoft_dist.observability import get_logger
from dsoft_dist.registry import DATA_SOURCES
from dsoft_dist.train.checkpoint import RUN_CHECKPOINTS, STEP_PREFIX, step_folders
from dsoft_dist.utils import __version__, flat_dict, load_weights_only, write_text_atomic

log = get_logger(__name__)

RUN_RECORD = "run.json"
FORMAT = "dsoft_dist.run/1"
# what a run writes into logging.output_dir (checkpoints go to checkpoint.dir, by default checkpoints/ here)
RUN_OUTPUTS = (RUN_RECORD, "metrics.jsonl", "report.md", "report.json", "curves.png", "backbone.pt", "head",
               "samples", "tensorboard", "synthetic_unseen.bin")


def _checkpoint_root(cfg) -> str:
    return cfg.checkpoint.dir or os.path.join(cfg.logging.output_dir, RUN_CHECKPOINTS)


def _data_identity(data) -> dict:
    """The data a run trains on, as its source says (``dsoft_dist.data.sources``): the manifest's content hash
    (it lists every shard's sha256) for webdataset, the generator's parameters for synthetic data."""
    return DATA_SOURCES.get(data.source).identity(data)


# model keys that choose how the same numbers are computed, not which run it is: they may change on resume
_MODEL_NOT_DEFINING = ("activation_checkpointing",)


def run_identity(cfg) -> dict:
    """The config values that define the run (flat ``section.key`` names), without those that may change
    between the attempts of one run."""
    model = {f"model.{k}": v for k, v in vars(cfg.model).items() if k not in _MODEL_NOT_DEFINING}
    data = {f"data.{k}": v for k, v in _data_identity(cfg.data).items()}
    return {**model, "head.loss": cfg.head.loss, "head.negatives": cfg.head.negatives,
            "data.num_classes": cfg.data.num_classes, **data}


def identity_hash(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def read_run_record(output_dir: str) -> dict | None:
    """run.json of ``output_dir`` (None when there is none; an unreadable one is an error naming the fix)."""
    path = os.path.join(output_dir, RUN_RECORD)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as fh:
            record = json.load(fh)
        record["identity"], record["defining"]  # noqa: B018 - both must be there
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path} is unreadable ({err}): it records which run the folder holds; restore it, "
                         "or pass --overwrite to replace the folder's run") from err
    return record


def recorded_identity(cfg) -> dict | None:
    """The defining values of the run the folder holds: run.json's, or for a folder written before run.json
    existed, those of the config saved in its newest checkpoint; None for a folder without a run."""
    record = read_run_record(cfg.logging.output_dir)
    if record is not None:
        return record["defining"]
    steps = _checkpoints(cfg)
    if not steps:
        return None
    from dsoft_dist.config.loader import saved_config_from_dict

    try:
        saved = load_weights_only(os.path.join(_checkpoint_root(cfg), steps[-1], "trainer.pt"))["config"]
        return run_identity(saved_config_from_dict(saved))
    except Exception as err:  # a torn or foreign checkpoint: resume's own verification reports it
        log.debug("no identity from %s: %s", steps[-1], err)
        return None


def _checkpoints(cfg) -> list[str]:
    return step_folders(_checkpoint_root(cfg))


def _holds_a_run(cfg) -> str | None:
    """What shows that the folder already holds a run (run.json, checkpoints), or None."""
    found = [RUN_RECORD] if os.path.isfile(os.path.join(cfg.logging.output_dir, RUN_RECORD)) else []
    steps = _checkpoints(cfg)
    if steps:
        found.append(f"checkpoints {', '.join(steps[-3:])} in {_checkpoint_root(cfg)}")
    return " and ".join(found) or None


def differences(old: dict, new: dict) -> list[str]:
    """``key: old -> new`` for every key of two flat dicts that differs."""
    return [f"{k}: {old.get(k, '(unset)')!r} -> {new.get(k, '(unset)')!r}"
            for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


# keys that say how this attempt starts, not what it trains: not worth a note when they change
_ATTEMPT_KEYS = ("checkpoint.resume", "logging.overwrite")


def config_changes(saved: dict, current: dict, limit: int = 6) -> str | None:
    """The resume's note on the keys that changed since the checkpoint was written (those that do not define
    the run may, the module doc says), e.g. ``config changed since the checkpoint: optimizer.lr: 0.1 -> 0.05``;
    None when none did. The saved config is read as the run it was (``saved_config_from_dict``: a D-Softmax
    run from before the presets of ``LossForm`` had the paper's constant inter weight)."""
    from dsoft_dist.config.loader import config_to_dict, saved_config_from_dict

    try:
        saved = config_to_dict(saved_config_from_dict(saved))
    except ValueError:  # a config that no longer loads: what it holds
        pass
    old, new = ({k: v for k, v in flat_dict(c).items() if k not in _ATTEMPT_KEYS} for c in (saved, current))
    changed = differences(old, new)
    if not changed:
        return None
    more = f" and {len(changed) - limit} more" if len(changed) > limit else ""
    return "config changed since the checkpoint: " + ", ".join(changed[:limit]) + more


def check_run_folder(cfg) -> str | None:
    """None when this config may start in ``logging.output_dir``, else why not with the fix (see the module
    doc). Reads files only: every process may call it, before any rank starts."""
    return _problem(cfg, _recorded_if_it_matters(cfg))


def _recorded_if_it_matters(cfg) -> dict | None:
    """The folder's recorded identity when this start continues what the folder holds (resume auto or a
    checkpoint folder, no overwrite), else None without reading anything."""
    return None if cfg.logging.overwrite or cfg.checkpoint.resume == "never" else recorded_identity(cfg)


def _problem(cfg, recorded: dict | None) -> str | None:
    """``check_run_folder`` with the folder's recorded identity already read."""
    out, c = cfg.logging.output_dir, cfg.checkpoint
    if cfg.logging.overwrite:
        if c.resume not in ("auto", "never"):
            return (f"logging.overwrite=true deletes the run in {out}, and checkpoint.resume={c.resume!r} asks to "
                    "continue from a checkpoint: pass one of them")
        return None
    if c.resume == "never":
        held = _holds_a_run(cfg)
        if held:
            return (f"logging.output_dir={out} already holds a run ({held}); checkpoint.resume=never starts a new "
                    "one, which would mix with it: pass another logging.output_dir, --overwrite to delete the old "
                    "run's outputs first, or --resume auto to continue it")
        return None
    if c.resume != "auto" or recorded is None:
        return None  # an explicit checkpoint (the differences are logged when it loads), or no run to mix with
    changed = differences(recorded, run_identity(cfg))
    if not changed:
        return None
    return (f"logging.output_dir={out} holds another run: {'; '.join(changed)}; resuming it with this config "
            "would mix the two runs. Pass another logging.output_dir for a new run, --overwrite to replace the "
            "old one, or --resume <one of its checkpoint folders> to continue it with this config anyway")


def _clear(cfg) -> None:
    """Deletes the run outputs of ``logging.output_dir`` and the step folders of the checkpoint folder."""
    out, root = cfg.logging.output_dir, _checkpoint_root(cfg)
    for name in RUN_OUTPUTS:
        path = os.path.join(out, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)
    if os.path.isdir(root):
        for name in os.listdir(root):
            if name.startswith(STEP_PREFIX) or name in ("latest", "best"):
                path = os.path.join(root, name)
                shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    log.warning("logging.overwrite: deleted the previous run's outputs in %s", out)


def write_run_record(cfg) -> None:
    """Writes run.json atomically (rank 0)."""
    identity = run_identity(cfg)
    record = {"format": FORMAT, "name": cfg.name, "identity": identity_hash(identity), "defining": identity,
              "version": __version__, "written": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    os.makedirs(cfg.logging.output_dir, exist_ok=True)
    write_text_atomic(os.path.join(cfg.logging.output_dir, RUN_RECORD), json.dumps(record, indent=1) + "\n")


def prepare_run_folder(cfg) -> str | None:
    """Rank 0 at the start of a run: the check (its message, or None), ``--overwrite``'s clean-up, run.json.
    An explicit ``checkpoint.resume`` folder with other defining values logs them and records the new ones."""
    recorded = _recorded_if_it_matters(cfg)
    problem = _problem(cfg, recorded)
    if problem is not None:
        return problem
    if cfg.logging.overwrite and _holds_a_run(cfg):
        _clear(cfg)
    if recorded is not None:
        changed = differences(recorded, run_identity(cfg))
        if changed:
            log.warning("checkpoint.resume=%s continues the run in %s with other defining values: %s",
                        cfg.checkpoint.resume, cfg.logging.output_dir, "; ".join(changed))
    write_run_record(cfg)
    return None
