"""Registries: every part the config chooses by name (engine, model, loss, data source, LR schedule,
optimizer) is registered under that name by the module that defines it; builders look it up, the config
schema takes its choices from it.

    from dsoft_dist.registry import LOSSES

    @LOSSES.register("my_loss")              # in the part's own module
    class MyLoss: ...

    LOSSES.get("my_loss")                    # the builder's lookup; ConfigError naming head.loss otherwise
    LOSSES.names()                           # ('d_softmax', 'arcface', ..., 'my_loss'): the config's choices

A registry loads its built-in parts on first use by importing the modules named in ``builtins``
(module paths, not imports: this module sits at the bottom of the layers, docs/design.md). A part
defined outside the package registers when its module is imported: name the module in the config's
``extra_modules`` (``import_extra_modules``), e.g. ``extra_modules: [my_losses]``.
"""
from __future__ import annotations

import importlib
from typing import Any

from dsoft_dist.errors import ConfigError


class Registry:
    """The parts of one kind by config string (see the module doc)."""

    def __init__(self, kind: str, key: str, builtins: tuple[str, ...]):
        self.kind, self.key, self.builtins = kind, key, builtins
        self._parts: dict[str, Any] = {}
        self._loaded = False

    def register(self, name: str, part: Any = None, *, replace: bool = False) -> Any:
        """Registers ``part`` under ``name``; without ``part``, a decorator. A name taken by another part is
        refused unless ``replace`` (registering the same object again is a no-op: a module imported twice)."""
        if part is None:
            return lambda obj: self.register(name, obj, replace=replace)
        if not isinstance(name, str) or not name:
            raise ValueError(f"a {self.kind} needs a non-empty string name, got {name!r}")
        known = self._parts.get(name)
        if known is not None and known is not part and not replace:
            raise ValueError(f"{self.kind} {name!r} is registered already ({_describe(known)}); pick another name "
                             "or pass replace=True")
        self._parts[name] = part
        return part

    def _load(self) -> None:
        if not self._loaded:
            self._loaded = True
            for module in self.builtins:
                importlib.import_module(module)

    def names(self) -> tuple[str, ...]:
        """Every registered name, built-ins first (in registration order)."""
        self._load()
        return tuple(self._parts)

    def __contains__(self, name: str) -> bool:
        return name in self.names()

    def get(self, name: str) -> Any:
        """The part registered under ``name``; ConfigError naming the config key and the choices otherwise."""
        if name not in self.names():
            raise ConfigError(f"{self.key}={name!r} is invalid: use one of {', '.join(self.names())} (a {self.kind} "
                              "of your own registers when its module is named in extra_modules)")
        return self._parts[name]


def _describe(part: Any) -> str:
    return f"{getattr(part, '__module__', '?')}.{getattr(part, '__qualname__', type(part).__name__)}"


def import_extra_modules(modules: list[str], key: str = "extra_modules") -> None:
    """Imports each module so the parts it defines register themselves; ConfigError naming the module when
    it cannot be imported (a module of your own must be importable: installed, or on PYTHONPATH)."""
    for i, name in enumerate(modules):
        try:
            importlib.import_module(name)
        except ImportError as err:
            raise ConfigError(f"{key}[{i}]={name!r} cannot be imported ({err}): install it or put its folder on "
                              "PYTHONPATH (every rank imports it)") from err


ENGINES = Registry("engine", "parallel.engine", ("dsoft_dist.train.engines",))
MODELS = Registry("model", "model.name", ("dsoft_dist.models",))
LOSSES = Registry("loss", "head.loss", ("dsoft_dist.losses",))
DATA_SOURCES = Registry("data source", "data.source", ("dsoft_dist.data.sources",))
LR_SCHEDULES = Registry("learning-rate schedule", "schedule.decay", ("dsoft_dist.train.schedule",))
OPTIMIZERS = Registry("optimizer", "optimizer.name", ("dsoft_dist.train.optimizers",))

__all__ = ["DATA_SOURCES", "ENGINES", "LOSSES", "LR_SCHEDULES", "MODELS", "OPTIMIZERS", "Registry",
           "import_extra_modules"]
