"""The retrieval methods dsmoe trains, by name.

A method registers itself here: its name (the ``method:`` of a YAML, and the name of its own YAML section), the
dataclass of that section (``MethodSettings``, torch-free, so a config is checked before anything heavy loads) and
the ``module:function`` that builds its ``dsmoe.methods.base.Method`` for a run (imported only then). A new method
is a package of files with one ``register`` call, imported below or by the user's code before the config is read.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

from dsmoe.schema import ConfigError

if TYPE_CHECKING:
    from dsmoe.config import RunConfig
    from dsmoe.methods.base import Method


class MethodSettings:
    """Base of a method's YAML section: the checks it needs across sections, and the runs (stages) it asks for."""

    def validate(self, run: RunConfig) -> None:
        """Raise ``ConfigError`` when ``run`` (whose ``method_config`` is this) cannot train the method."""

    def stage_runs(self, run: RunConfig) -> list[RunConfig]:
        """The runs of this config, in order (a method with stages: one per stage, each in its own
        ``train.output_dir``)."""
        return [run]


@dataclass(frozen=True)
class MethodSpec:
    name: str
    config: type[MethodSettings]
    builder: str  # "module:function", function(cfg) -> Method

    def build(self, cfg: RunConfig) -> Method:
        module, function = self.builder.split(":")
        return getattr(importlib.import_module(module), function)(cfg)


_METHODS: dict[str, MethodSpec] = {}


def register(name: str, config: type[MethodSettings], builder: str) -> None:
    if name in _METHODS:
        raise ValueError(f"method {name!r} is registered twice")
    _METHODS[name] = MethodSpec(name, config, builder)


def names() -> list[str]:
    return sorted(_METHODS)


def method_spec(name: object) -> MethodSpec:
    if name not in _METHODS:
        raise ConfigError(f"method: {name!r} is not a method dsmoe knows (known: {', '.join(names())})")
    return _METHODS[name]


def get_method(cfg: RunConfig) -> Method:
    """The method of ``cfg``, built for this run (its model code is imported here)."""
    return method_spec(cfg.method).build(cfg)


from dsmoe.methods import dasd, dm_adapter  # noqa: E402,F401  the built-in methods register themselves
