"""The schema walker of the YAML configs: values checked against dataclass fields' type hints, with errors
that name the dotted key and where it came from."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, Literal, Union

from rcm_nddr.errors import ConfigError
from rcm_nddr.inheritance import Where


def type_name(tp: Any) -> str:
    """How a schema type reads in an error message."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(type_name(a) for a in typing.get_args(tp))
    if origin is not None:
        return repr(tp).replace("typing.", "")
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", repr(tp))


def coerce(value: Any, tp: Any, key: str, where: Where) -> Any:
    """Check ``value`` against the type ``tp`` and return it in canonical form."""

    def fail(expected: str | None = None) -> ConfigError:
        return ConfigError(f"{where(key)}: key '{key}': expected {expected or type_name(tp)}, got {value!r}")

    if isinstance(value, float) and not math.isfinite(value):  # YAML's .nan and .inf, for every key
        raise fail("a finite number")
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise fail(f"a mapping of {', '.join(f.name for f in schema_fields(tp))}")
        return build(tp, value, key, where)
    if origin is Literal:
        if isinstance(value, bool) or value not in typing.get_args(tp):
            raise fail()
        return value
    if origin in (Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return coerce(value, option, key, where)
            except ConfigError:
                continue
        raise fail()
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise fail()
        return [coerce(v, item, f"{key}[{i}]", where) for i, v in enumerate(value)]
    if origin is tuple:
        items = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(items):
            raise fail()
        pairs = enumerate(zip(value, items, strict=True))
        return tuple(coerce(v, t, f"{key}[{i}]", where) for i, (v, t) in pairs)
    if origin is dict:
        key_tp, value_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise fail()
        return {coerce(k, key_tp, key, where): coerce(v, value_tp, f"{key}.{k}", where) for k, v in value.items()}
    if tp is Any:
        return value
    if tp is type(None):
        if value is not None:
            raise fail()
        return None
    if tp is bool:
        if not isinstance(value, bool):
            raise fail()
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise fail()
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise fail()
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise fail()
        return value
    raise TypeError(f"unsupported schema type {tp!r} for {key}")


def schema_fields(cls: type) -> list[dataclasses.Field]:
    """The YAML keys of a schema dataclass (internal fields left out)."""
    return [f for f in dataclasses.fields(cls) if not f.metadata.get("internal")]


def build(cls: type, data: dict[str, Any], prefix: str, where: Where) -> Any:
    """An instance of the schema dataclass ``cls`` from ``data`` (an unknown key is an error naming it)."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in schema_fields(cls)}
    for k in data:
        if k not in known:
            dotted = f"{prefix}.{k}" if prefix else str(k)
            raise ConfigError(f"{where(dotted)}: unknown key '{dotted}'; known keys here: {', '.join(sorted(known))}")
    kwargs = {}
    for k, v in data.items():
        dotted = f"{prefix}.{k}" if prefix else k
        kwargs[k] = coerce(v, hints[k], dotted, where)
    return cls(**kwargs)


def non_defaults(obj: Any) -> Any:
    """``obj`` (a config dataclass, or a dict or list holding them) as plain data without the fields that
    hold their declared default (nor the internal ones): what a config chose. A config written before an
    option was added, and the same config with the option at its default, give the same value."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out: dict[str, Any] = {}
        for f in dataclasses.fields(obj):
            if f.metadata.get("internal"):
                continue
            value = getattr(obj, f.name)
            if f.default is not dataclasses.MISSING:
                default = f.default
            elif f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
            else:
                out[f.name] = non_defaults(value)
                continue
            if value == default:
                continue
            out[f.name] = non_defaults(value)
            if dataclasses.is_dataclass(value) and type(value) is not type(default):
                out[f.name] = {"type": type(value).__name__, **out[f.name]}
        return out
    if isinstance(obj, dict):
        return {k: non_defaults(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [non_defaults(v) for v in obj]
    return obj
