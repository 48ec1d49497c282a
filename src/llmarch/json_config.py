"""Frozen dataclasses from JSON, strictly: each value must already have its field's type, every
required field must be present, and no unknown field may appear; errors name the dotted field
(``TrainConfig.optimizer.learning_rate``) or the file."""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from pathlib import Path
from typing import Any


def build(cls: type, data: Any, where: str) -> Any:
    """Rebuilds dataclass ``cls`` from plain JSON data, following its type hints: every value
    must already have its field's type (JSON ``"0.01"`` is not a float, ``"no"`` not a bool)."""
    if not isinstance(data, dict):
        raise ValueError(f"{where} must be a JSON object, got {type(data).__name__}")
    upgrade = getattr(cls, "upgrade_json", None)
    if upgrade is not None:  # a class that still reads what earlier versions of it wrote
        data = upgrade(data)
    hints = typing.get_type_hints(cls)
    fields = dataclasses.fields(cls)
    names = {f.name for f in fields}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{where} has unknown fields {unknown}; allowed: {sorted(names)}")
    missing = [
        f.name
        for f in fields
        if f.name not in data
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ValueError(f"{where} is missing the required fields {missing}")
    kwargs = {k: _convert(hints[k], v, f"{where}.{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:  # a __post_init__ comparing a value of the wrong type
        raise ValueError(f"{where}: {e}") from None


_SCALARS = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def _convert(hint: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            if len(options) < len(typing.get_args(hint)):
                return None
            raise ValueError(f"{where}=null is invalid: must be {_describe(options)}")
        errors = []
        for option in options:
            try:
                return _convert(option, value, where)
            except ValueError as e:
                errors.append(e)
        if len(errors) == 1:
            raise errors[0]
        raise ValueError(f"{where}={value!r} is invalid: must be {_describe(options)} or null")
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ValueError(f"{where}={value!r} is invalid: must be a list")
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:  # tuple[X, ...]
            return tuple(_convert(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ValueError(f"{where}={value!r} is invalid: must be a list of {len(args)} items")
        pairs = enumerate(zip(args, value, strict=True))
        return tuple(_convert(a, v, f"{where}[{i}]") for i, (a, v) in pairs)
    if dataclasses.is_dataclass(hint):
        return build(hint, value, where)
    if hint in _SCALARS:
        ok = (
            isinstance(value, bool)
            if hint is bool
            else isinstance(value, int | float) and not isinstance(value, bool)
            if hint is float
            else isinstance(value, hint) and not isinstance(value, bool)
        )
        if not ok:
            raise ValueError(f"{where}={value!r} is invalid: must be {_SCALARS[hint]}")
        return float(value) if hint is float else value
    return value


def _describe(options: list) -> str:
    return " or ".join(_SCALARS.get(o, getattr(o, "__name__", str(o))) for o in options)


_JSON_KINDS = {
    dict: "an object",
    list: "an array",
    str: "a string",
    bool: "a boolean",
    int: "a number",
    float: "a number",
    type(None): "null",
}


def json_kind(value: Any) -> str:
    return _JSON_KINDS.get(type(value), type(value).__name__)


def read_json(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON object in ``path``.

    Raises:
      ValueError: naming the file, when it cannot be read, is not JSON, or holds no object.
    """
    try:
        data = json.loads(Path(path).read_bytes())
    except OSError as e:
        raise ValueError(f"{path} cannot be read: {e.strerror or e}") from None
    except ValueError as e:  # JSONDecodeError, or bytes that are not UTF-8/16/32
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, not {json_kind(data)}")
    return data


def dataclass_from_dict(cls: type, data: Any) -> Any:
    """Rebuilds the (possibly nested) frozen dataclass ``cls`` from JSON data, validated."""
    return build(cls, data, cls.__name__)
