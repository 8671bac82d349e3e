"""The one strict loader for every config in the project (the pipeline file, alignment, montage,
FFN and training configs): a mapping (YAML, JSON, `--set` overrides) into a frozen dataclass,
recursively, with every key checked against the fields and every value against the field's type.
An unknown or mistyped key is an InputError that names it (`pipeline.segment.subvolme: unknown
key; segment takes ...`) and lists what that section takes. This is SOFIMA's
`update_dataclass` idea with one strictness everywhere."""

from __future__ import annotations

import dataclasses
import math
import numbers
import types
import typing
from typing import Any, Mapping

from exaconnect.errors import InputError


def _convert(value: Any, kind: Any, where: str) -> Any:
    origin = typing.get_origin(kind)
    args = typing.get_args(kind)
    if kind is Any:
        return value
    if origin is typing.Union or origin is types.UnionType:
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(value, inner[0], where)
    if dataclasses.is_dataclass(kind):
        if dataclasses.is_dataclass(value) and isinstance(value, kind):
            return value
        return load_dataclass(kind, value, where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise InputError(f"{where}: {value!r}; expected a list")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise InputError(f"{where}: {value!r}; expected {len(args)} values")
        return tuple(_convert(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin in (Mapping, dict, typing.Mapping) or kind in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise InputError(f"{where}: {value!r}; expected a mapping")
        return dict(value)
    if kind is bool:
        if not isinstance(value, bool):
            raise InputError(f"{where}: {value!r}; expected true or false")
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise InputError(f"{where}: {value!r}; expected an integer")
        return int(value)
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise InputError(f"{where}: {value!r}; expected a finite number")
        return float(value)
    if kind is str:
        if not isinstance(value, str):
            raise InputError(f"{where}: {value!r}; expected a string")
        return value
    return value


def load_dataclass(cls: type, data: Any, where: str) -> Any:
    """`cls(**data)` with every key and value checked against the dataclass's fields, recursively;
    `where` names the section in messages (e.g. `pipeline.segment`, `align.flow`)."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise InputError(f"{where}: expected a mapping of options, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = [k for k in data if k not in names]
    if unknown:
        raise InputError(f"{where}.{unknown[0]}: unknown key; {where.rsplit('.', 1)[-1]} takes {', '.join(names)}")
    values = {key: _convert(value, hints[key], f"{where}.{key}") for key, value in data.items()}
    try:
        return cls(**values)
    except TypeError as exc:
        raise InputError(f"{where}: {exc}") from None


def plain(config: Any) -> Any:
    """The YAML/JSON-ready form of a config (dataclasses to mappings, tuples to lists)."""
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return {f.name: plain(getattr(config, f.name)) for f in dataclasses.fields(config)}
    if isinstance(config, (tuple, list)):
        return [plain(v) for v in config]
    if isinstance(config, Mapping):
        return {k: plain(v) for k, v in config.items()}
    return config


def merged_mapping(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict:
    """`base` with `overrides` laid over it, nested mappings merged key by key (an override of
    `refine.fill.sigma` keeps `refine.fill.enabled`); any other value replaces the one below."""
    out = dict(base)
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merged_mapping(out[key], value)
        else:
            out[key] = value
    return out
