"""Typed configuration: dataclasses filled from a YAML recipe plus ``key.sub=value`` overrides.

A recipe states only what differs from the defaults. Every key is checked against the dataclass
it lands in: an unknown key, a value of the wrong type or a value outside a ``Literal`` ends in a
``ConfigError`` that names the key, the value and what is allowed.

``model`` is one of the registered architectures' dataclasses, told apart by their ``arch`` field
(a ``OneOf`` field: the set of classes is asked for when a config is read, so an architecture
registered at run time is a valid ``model.arch``).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Callable
from dataclasses import MISSING
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml


class ConfigError(ValueError):
    """A recipe or override that cannot be turned into a valid configuration."""


@dataclasses.dataclass(frozen=True)
class OneOf:
    """Metadata of a field ``Annotated[T, OneOf(classes)]`` that holds one of the dataclasses
    ``classes()`` returns, picked by the ``arch`` value of its mapping (each class types its
    ``arch`` as a ``Literal``). The first class is the default when the mapping has no ``arch``."""

    classes: Callable[[], list[type]]


# ----------------------------------------------------------------------------------------------
# Generic dict -> dataclass conversion with precise errors


def _one_of(tp: Any) -> OneOf | None:
    if typing.get_origin(tp) is Annotated:
        return next((m for m in tp.__metadata__ if isinstance(m, OneOf)), None)
    return None


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if _one_of(tp) is not None:
        return " | ".join(f"a mapping ({cls.__name__})" for cls in _one_of(tp).classes())
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        args = typing.get_args(tp)
        return f"a list of {_type_name(args[0])}" if args else "a list"
    if origin is dict:
        k, v = typing.get_args(tp)
        return f"a mapping of {_type_name(k)} to {_type_name(v)}"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return f"a mapping ({tp.__name__})"
    return getattr(tp, "__name__", str(tp))


def _fail(key: str, value: Any, tp: Any, where: str | None) -> typing.NoReturn:
    src = f" (in {where})" if where else ""
    raise ConfigError(f"{key} = {value!r}{src}: expected {_type_name(tp)}")


def _convert(value: Any, tp: Any, key: str, where: str | None) -> Any:
    """Return ``value`` converted to type ``tp`` or raise ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    one_of = _one_of(tp)
    if one_of is not None:
        if not isinstance(value, dict):
            _fail(key, value, tp, where)
        return _convert_tagged(value, one_of.classes(), key, where)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            _fail(key, value, tp, where)
        return from_dict(tp, value, prefix=key, where=where)
    if origin is Literal:
        if value in typing.get_args(tp) and type(value) in {type(a) for a in typing.get_args(tp)}:
            return value
        _fail(key, value, tp, where)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            _fail(key, value, tp, where)
        dc_args = [a for a in args if dataclasses.is_dataclass(a)]
        if dc_args and isinstance(value, dict):
            return _convert_tagged(value, dc_args, key, where)
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key, where)
            except ConfigError:
                continue
        _fail(key, value, tp, where)
    if origin in (list, tuple):
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        if isinstance(value, (list, tuple)):
            items = [_convert(v, item_tp, f"{key}[{n}]", where) for n, v in enumerate(value)]
            return items if origin is list else tuple(items)
        _fail(key, value, tp, where)
    if origin is dict:
        k_tp, v_tp = typing.get_args(tp)
        if isinstance(value, dict):
            return {
                _convert(k, k_tp, f"{key}", where): _convert(v, v_tp, f"{key}.{k}", where)
                for k, v in value.items()
            }
        _fail(key, value, tp, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        _fail(key, value, tp, where)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        _fail(key, value, tp, where)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML reads "3e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        _fail(key, value, tp, where)
    if tp is str:
        if isinstance(value, str):
            return value
        _fail(key, value, tp, where)
    raise TypeError(f"unsupported config field type {tp!r} for {key}")


def _convert_tagged(value: dict, classes: list[type], key: str, where: str | None) -> Any:
    """Pick the dataclass of a union whose ``arch`` Literal matches ``value['arch']``."""
    tags = {}
    for cls in classes:
        arch_tp = typing.get_type_hints(cls)["arch"]
        for tag in typing.get_args(arch_tp):
            tags[tag] = cls
    tag = value.get("arch", next(iter(tags)))
    if tag not in tags:
        _fail(f"{key}.arch", tag, Literal[tuple(tags)], where)  # type: ignore[misc]
    return from_dict(tags[tag], value, prefix=key, where=where)


def from_dict(cls: type, data: dict, *, prefix: str = "", where: str | None = None) -> Any:
    """Build dataclass ``cls`` from a (possibly partial) mapping, checking every key."""
    hints = typing.get_type_hints(cls, include_extras=True)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else str(name)
        if name not in fields:
            close = difflib.get_close_matches(str(name), list(fields), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            allowed = ", ".join(sorted(fields))
            src = f" (in {where})" if where else ""
            raise ConfigError(f"unknown key '{key}'{src}{hint} Allowed keys here: {allowed}")
        kwargs[name] = _convert(value, hints[name], key, where)
    for name, f in fields.items():
        if name not in kwargs and f.default is MISSING and f.default_factory is MISSING:
            key = f"{prefix}.{name}" if prefix else name
            src = f" (in {where})" if where else ""
            raise ConfigError(f"missing required key '{key}'{src}: expected {_type_name(hints[name])}")
    obj = cls(**kwargs)
    check = getattr(obj, "validate", None)
    if check is not None:
        check(prefix)
    return obj


def to_dict(obj: Any) -> Any:
    """A plain (YAML/JSON-ready) view of a config dataclass."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


# ----------------------------------------------------------------------------------------------
# Recipes and overrides


def read_recipe(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"recipe {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {path} must be a mapping of sections, got {type(data).__name__}")
    return data


def apply_override(data: dict, override: str) -> None:
    """Apply one ``a.b.c=value`` override in place; the value is parsed as YAML."""
    if "=" not in override:
        raise ConfigError(f"override '{override}' is not of the form key.sub=value")
    dotted, raw = override.split("=", 1)
    dotted = dotted.strip()
    if not dotted or any(not part for part in dotted.split(".")):
        raise ConfigError(f"override '{override}': empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    node = data
    *parents, leaf = dotted.split(".")
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override '{override}': '{part}' is a value, not a section")
        node = child
    node[leaf] = value
