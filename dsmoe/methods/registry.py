"""The retrieval methods dsmoe trains, by name.

A method registers itself here: its name (the ``method:`` of a YAML, and the name of its own YAML section), the
dataclass of that section (``MethodSettings``, torch-free, so a config is checked before anything heavy loads) and
the ``module:function`` that builds its ``dsmoe.methods.base.Method`` for a run (imported only then). The built-in
methods are imported on the first look-up (``BUILT_IN``); another is a package with one ``register`` call, imported
by the user's code before the config is read.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, ClassVar

from dsmoe.schema import ConfigError

BUILT_IN = ("dsmoe.methods.dm_adapter", "dsmoe.methods.dasd", "dsmoe.methods.baselines")
"""Packages whose import registers a method: the registry's only imports of the methods."""


class MethodSettings:
    """Base of a method's YAML section: the checks it needs across sections, and the runs (stages) it asks for.
    ``run`` is the ``dsmoe.config.RunConfig`` whose ``method_config`` this is."""

    experts: ClassVar[bool] = True
    """Whether the method's model has the ``adapter:`` section's experts (without: its ep_size is 1)."""

    @classmethod
    def of(cls, run: Any):
        """The section of this class in ``run`` (a method's own settings, typed)."""
        assert isinstance(run.method_config, cls), (run.method, cls.__name__)
        return run.method_config

    def validate(self, run: Any) -> None:
        """Raise ``ConfigError`` when ``run`` cannot train the method."""

    def stage_runs(self, run: Any) -> list:
        """The runs of this config, in order (a method with stages: one per stage, each in its own
        ``train.output_dir``)."""
        return [run]


@dataclass(frozen=True)
class MethodSpec:
    name: str
    config: type[MethodSettings]
    builder: str  # "module:function", function(cfg) -> Method

    def build(self, cfg: Any):
        """The ``Method`` of ``cfg`` (a ``RunConfig``), its model code imported now."""
        module, function = self.builder.split(":")
        return getattr(importlib.import_module(module), function)(cfg)


_METHODS: dict[str, MethodSpec] = {}


def register(name: str, config: type[MethodSettings], builder: str) -> None:
    if name in _METHODS:
        raise ValueError(f"method {name!r} is registered twice")
    _METHODS[name] = MethodSpec(name, config, builder)


def _built_in() -> dict[str, MethodSpec]:
    for package in BUILT_IN:
        importlib.import_module(package)
    return _METHODS


def names() -> list[str]:
    return sorted(_built_in())


def method_spec(name: object) -> MethodSpec:
    methods = _built_in()
    if name not in methods:
        raise ConfigError(f"method: {name!r} is not a method dsmoe knows (known: {', '.join(names())})")
    return methods[name]


def get_method(cfg: Any):
    """The method of ``cfg`` (a ``RunConfig``), built for this run (its model code is imported here)."""
    return method_spec(cfg.method).build(cfg)
