"""Typed configs read from YAML: dataclasses whose fields are checked for type and range as they are built.

Every key maps to a dataclass field; an unknown key or a value of the wrong type or out of its ``Range`` raises
``ConfigError`` naming the key (and the closest valid one). Components declare their own sections with these
helpers (``dsmoe.config`` the shared ones, each method its own).
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal


class ConfigError(ValueError):
    """A user mistake in the model YAML, an override or the DeepSpeed JSON."""


@dataclass(frozen=True)
class Range:
    """Allowed values of a numeric field (each element of a tuple field); checked when a config is read."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def contains(self, value: float) -> bool:
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def __str__(self) -> str:
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"


def ranged(default: Any, low: float | None = None, high: float | None = None, *, low_open: bool = False,
           high_open: bool = False) -> Any:
    return field(default=default, metadata={"range": Range(low, high, low_open, high_open)})


def positive(default: Any) -> Any:
    return ranged(default, 0, low_open=True)


def at_least(low: int, default: Any) -> Any:
    return ranged(default, low)


def share(default: Any, *, high_open: bool = False) -> Any:
    """A value in [0, 1] (or [0, 1))."""
    return ranged(default, 0, 1, high_open=high_open)


def location(default: Any, kind: str) -> Any:
    """A local path or, for ``kind="model"``, a Hugging Face hub id: written absolute into a run's files (so they
    work from any directory) and checked before any process starts (``local_locations``)."""
    return field(default=default, metadata={"location": kind})


def looks_local(value: str) -> bool:
    """A path rather than a hub id (``org/name``) or a URL."""
    return "://" not in value and (value.startswith(("/", ".", "~")) or os.path.exists(os.path.expanduser(value)))


def locations(section: Any, prefix: str = "") -> list[tuple[str, str, Any]]:
    """(dotted key, kind, value) of every ``location`` field in a config dataclass and its sections."""
    found = []
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if "location" in f.metadata:
            found.append((prefix + f.name, f.metadata["location"], value))
        elif dataclasses.is_dataclass(value) and f.metadata.get("yaml", True):
            found.extend(locations(value, f"{prefix}{f.name}."))
    return found


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Return ``value`` checked (and minimally converted) against the annotation ``tp``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} matches none of {_type_name(tp)}")
    if origin is Literal:
        if value not in args:
            close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{key}: {value!r} is not one of {list(args)}{hint}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 5e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise AssertionError(f"unsupported annotation {tp} for {key}")


def from_dict(cls: type, data: Any, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping, refusing unknown keys and wrong types."""
    where = prefix or "the config"
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.metadata.get("yaml", True)}
    names = list(fields)
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{prefix + '.' if prefix else ''}{close[0]}'?)" if close else ""
            raise ConfigError(f"unknown key '{full}'{hint}")
        kwargs[key] = _coerce(value, hints[key], full)
        _check_range(kwargs[key], fields[key].metadata.get("range"), full)
    return cls(**kwargs)


def _check_range(value: Any, allowed: Range | None, key: str) -> None:
    if allowed is None or value is None:
        return
    for v in value if isinstance(value, tuple) else (value,):
        if not allowed.contains(v):
            raise ConfigError(f"{key}: {value!r} is out of range: must be {allowed}")
