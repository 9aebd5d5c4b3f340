"""YAML loading, dotted overrides and strict type checking for ``Config``.

    cfg = load_config("configs/demo.yaml", overrides=["head.sample_rate=0.015625"])
    print(dump_config(cfg))

Unknown keys, wrong types and impossible values raise ``ConfigError`` naming the
dotted key, the value and the fix. Values in overrides are parsed as YAML scalars
(``head.scale=32`` is an int, ``eval.bins=[a.bin,b.bin]`` a list); ``head.sample_rate`` also takes a
fraction a/b (``head.sample_rate=1/64``), in YAML as in overrides.

``extra_modules`` (a list of module names) is imported before any section is built, so the parts
those modules register (``dsoft_dist.registry``) are choices of the keys that name parts:

    cfg = load_config(None, ["extra_modules=[my_losses]", "head.loss=my_loss"])
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from dsoft_dist.config.schema import Config, HeadConfig, parse_fraction
from dsoft_dist.errors import ConfigError
from dsoft_dist.losses.forms import D_SOFTMAX_KEYS
from dsoft_dist.registry import LOSSES, import_extra_modules


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(key: str, value: Any, tp) -> Any:
    """Checks ``value`` against the annotation ``tp``; ints are accepted for floats."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(key, value, inner[0])
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{key}={value!r} is invalid: expected a list of {_type_name(item_tp)}, e.g. [a, b]")
        return [_coerce(f"{key}[{i}]", v, item_tp) for i, v in enumerate(value)]
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads 1e-6 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if tp is bool and not isinstance(value, bool):
        raise ConfigError(f"{key}={value!r} is invalid: expected true or false")
    if tp is int and isinstance(value, bool):
        raise ConfigError(f"{key}={value!r} is invalid: expected an integer, not a boolean")
    if not isinstance(value, tp):
        raise ConfigError(f"{key}={value!r} is invalid: expected {_type_name(tp)}, got {type(value).__name__}")
    return value


def _build(cls, data: dict, prefix: str):
    """Builds dataclass ``cls`` from ``data``, recursing into section dataclasses."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}={data!r} is invalid: expected a mapping of keys to values")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    names = list(fields)
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; known keys: {', '.join(names)}"
            raise ConfigError(f"unknown key '{dotted}'{hint}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value if value is not None else {}, f"{dotted}.")
        elif isinstance(value, str) and fields[key].metadata.get("fraction"):
            kwargs[key] = parse_fraction(value, dotted)  # head.sample_rate: 1/64 as dsoft plan takes it
        else:
            kwargs[key] = _coerce(dotted, value, tp)
    return cls(**kwargs)


def config_from_dict(data: dict | None) -> Config:
    """Builds and validates a ``Config`` from a plain nested dict, after importing its ``extra_modules``."""
    data = data or {}
    if isinstance(data, dict) and "extra_modules" in data:
        _import_extra_modules(data["extra_modules"])
    return _build(Config, data, "")


# what every config saved before the losses had presets holds for D-Softmax's keys, whatever its loss
_FORMER_D_SOFTMAX_VALUES = dict(zip(D_SOFTMAX_KEYS, (0.9, 1.0, None)))


def saved_config_from_dict(data: dict) -> Config:
    """``config_from_dict`` of a config a run saved (in its checkpoints), which may predate the presets of
    ``LossForm``: there a margin loss held D-Softmax's former defaults (d = 0.9, w = 1), which it now refuses,
    and a D-Softmax run without ``head.inter_weight_end`` had the paper's constant inter weight."""
    data = copy.deepcopy(data)
    head = data.get("head") or {}
    if "extra_modules" in data:
        _import_extra_modules(data["extra_modules"])
    loss = head.get("loss", HeadConfig.loss)
    if loss in LOSSES.names() and not LOSSES.get(loss).presets:
        for key, former in _FORMER_D_SOFTMAX_VALUES.items():
            if key in head and head[key] == former:
                del head[key]
    elif "inter_weight_end" not in head:
        head["inter_weight_end"] = None
    return config_from_dict(data)


def _import_extra_modules(value) -> None:
    """Imports the modules ``extra_modules`` names (a list of module names); ConfigError naming the bad one."""
    modules = _coerce("extra_modules", value, list[str])
    for i, name in enumerate(modules):
        if not name.strip() or name.startswith("."):
            raise ConfigError(f"extra_modules[{i}]={name!r} is invalid: give an absolute module name, e.g. my_losses "
                              "or my_package.losses")
    import_extra_modules(modules)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Applies ``section.key=value`` strings to a nested dict (in place) and returns it."""
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is invalid: write it as section.key=value, e.g. head.scale=32")
        dotted, raw = item.split("=", 1)
        parts = dotted.strip().split(".")
        node = data
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} is invalid: '{part}' is not a section")
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Reads a YAML file (or the defaults when ``path`` is None), applies overrides, validates."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist: pass a path to a YAML file, "
                              "e.g. configs/demo.yaml")
        with open(path, encoding="utf-8") as handle:
            try:
                data = yaml.safe_load(handle) or {}
            except yaml.YAMLError as err:
                raise ConfigError(f"config file {str(path)!r} is not valid YAML: {err}") from err
    return config_from_dict(apply_overrides(data, overrides or []))


def config_to_dict(cfg) -> dict:
    """The resolved config as a plain nested dict."""
    return dataclasses.asdict(cfg)


def dump_config(cfg) -> str:
    """The resolved config as YAML text (round-trips through ``load_config``)."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
