"""Config base class: frozen dataclasses that round-trip through JSON.

Each model family defines its config next to the module that reads it (``models/<family>.py``);
they all derive from :class:`Config`, so converters and ``calico_jax.load`` can serialise them.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

C = TypeVar("C", bound="Config")


class ConfigError(ValueError):
    """A config field is unknown, missing or has the wrong type."""


def _to_json(value: Any) -> Any:
    if isinstance(value, Config):
        return value.to_dict()
    if isinstance(value, (tuple, list)):
        return [_to_json(v) for v in value]
    return value


def optional_inner(tp: Any) -> Any:
    """``X | None`` (or ``Optional[X]``) -> ``X``; any other type as it is."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _from_json(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if isinstance(tp, type) and issubclass(tp, Config):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected an object for {tp.__name__}, got {type(value).__name__}")
        return tp.from_dict(value, where=where)
    if origin is tuple:
        args = typing.get_args(tp)
        inner = args[0] if args else Any
        return tuple(_from_json(inner, v, f"{where}[{i}]") for i, v in enumerate(value))
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        inner = optional_inner(tp)
        return value if inner is tp else _from_json(inner, value, where)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool) and (not isinstance(value, tp) or (tp is not bool and isinstance(value, bool))):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
    return value


@dataclasses.dataclass(frozen=True)
class Config:
    """Frozen, JSON-serialisable config; subclasses are plain dataclasses with defaults."""

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _to_json(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls: type[C], data: Mapping[str, Any], where: str | None = None) -> C:
        where = where or cls.__name__
        hints = typing.get_type_hints(cls)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"{where}: unknown field(s) {unknown}; known: {sorted(names)}")
        kwargs = {k: _from_json(hints[k], v, f"{where}.{k}") for k, v in data.items()}
        try:
            return cls(**kwargs)
        except TypeError as e:  # missing required fields
            raise ConfigError(f"{where}: {e}") from None

    def replace(self: C, **changes: Any) -> C:
        return dataclasses.replace(self, **changes)


def hf_get(cfg: Any, name: str, default: Any = dataclasses.MISSING) -> Any:
    """Reads a field from a transformers config object or a plain config.json dict."""
    if isinstance(cfg, Mapping):
        if name in cfg:
            return cfg[name]
    elif hasattr(cfg, name):
        return getattr(cfg, name)
    if default is dataclasses.MISSING:
        raise ConfigError(f"config has no field {name!r}")
    return default


def split_overrides(argv: Sequence[str]) -> tuple[list[tuple[str, str]], list[str]]:
    """Pulls ``--config.a.b=v`` (or ``--config.a.b v``) out of argv; returns (overrides, the rest)."""
    out, rest, i = [], [], 0
    argv = list(argv)
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--config."):
            key, eq, val = arg[len("--config."):].partition("=")
            if not eq:
                if i + 1 >= len(argv):
                    raise ConfigError(f"{arg}: missing value")
                i, val = i + 1, argv[i + 1]
            out.append((key, val))
        else:
            rest.append(arg)
        i += 1
    return out, rest
