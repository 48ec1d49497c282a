"""Reading ``config.json`` values: each scalar checked for its type and range, naming the field.

transformers writes JSON null for an unset field; here null reads as absent. A string, a fraction or
a bool where a number belongs is refused rather than coerced (``int("8")`` would hide a broken
config), and a zero dimension is refused here rather than failing far away in a shape.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from llmarch.checks import check_int
from llmarch.config import DTYPES, RopeScaling, YarnScaling


def read_value(hf: Mapping[str, Any], key: str, default: Any, prefix: str) -> Any:
    """``hf[key]``, with JSON null read as absent; required when ``default`` is None."""
    value = hf.get(key)
    if value is not None:
        return value
    if default is None:
        raise ValueError(f"config.json has no {prefix}{key!r}: the model needs it")
    return default


def read_int(
    hf: Mapping[str, Any], key: str, default: int | None = None, *, minimum: int = 1, prefix: str = ""
) -> int:
    """``hf[key]`` as an integer >= ``minimum`` (see ``read_value``). A string, a fraction or a bool
    is refused naming the field: ``int("8")`` would hide a broken config, and a zero dimension
    would fail far from here (in a division, or a shape)."""
    value = read_value(hf, key, default, prefix)
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # 4096.0, as some tools write it
    check_int("", f"config.json {prefix}{key}", value, low=minimum)
    return value


def read_float(hf: Mapping[str, Any], key: str, default: float | None = None, *, prefix: str = "") -> float:
    """``hf[key]`` as a float (see ``read_value``); a string or a bool is refused naming the field.
    Ranges are checked by the config dataclasses."""
    value = read_value(hf, key, default, prefix)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"config.json {prefix}{key}={value!r} is invalid: must be a finite number")
    return float(value)


def read_bool(hf: Mapping[str, Any], key: str, default: bool) -> bool:
    """``hf[key]`` as a bool (JSON null: ``default``); ``"false"`` would read as true, so refused."""
    value = hf.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ValueError(f"config.json {key}={value!r} is invalid: must be true or false")
    return value


def read_object(hf: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    """``hf[key]`` as a JSON object, ``{}`` for null or absent."""
    value = hf.get(key)
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ValueError(f"config.json {key}={value!r} is invalid: must be an object or null")
    return value


def read_rope(hf: Mapping[str, Any], scaled: str = "llama3") -> tuple[float, RopeScaling | None]:
    """RoPE theta and scaling (of rope_type ``scaled``) from either transformers layout.

    transformers 5 writes ``rope_parameters = {"rope_type", "rope_theta", ...}``; 4.x wrote
    top-level ``rope_theta`` and ``rope_scaling = {"rope_type" (or legacy "type"), ...}``.
    """
    params, scaling = read_object(hf, "rope_parameters"), read_object(hf, "rope_scaling")
    if params.get("rope_theta") is not None:
        theta = read_float(params, "rope_theta", prefix="rope_parameters.")
    else:
        theta = read_float(hf, "rope_theta", 10_000.0)
    source = params if "rope_type" in params or "type" in params else scaling
    field = "rope_parameters" if source is params else "rope_scaling"
    kind = source.get("rope_type", source.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind != scaled:
        raise ValueError(
            f"config.json {field}.rope_type={kind!r} is not supported; allowed: 'default', {scaled!r}"
        )
    if scaled == "yarn":
        return theta, read_yarn(source, field, read_int(hf, "max_position_embeddings", 4096))
    keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    missing = [k for k in keys if source.get(k) is None]
    if missing:
        raise ValueError(f"config.json {field} (rope_type 'llama3') lacks {missing}")
    at = f"{field}."
    return theta, RopeScaling(
        factor=read_float(source, "factor", prefix=at),
        low_freq_factor=read_float(source, "low_freq_factor", prefix=at),
        high_freq_factor=read_float(source, "high_freq_factor", prefix=at),
        original_max_position_embeddings=read_int(source, "original_max_position_embeddings", prefix=at),
    )


def read_yarn(source: Mapping[str, Any], field: str, max_positions: int) -> YarnScaling:
    """DeepSeek's YaRN parameters, with transformers' defaults for absent ones."""
    if source.get("factor") is None:
        raise ValueError(f"config.json {field} (rope_type 'yarn') lacks 'factor'")
    for key, allowed in (("attention_factor", None), ("truncate", True)):
        if source.get(key, allowed) != allowed:
            raise ValueError(
                f"config.json {field}.{key}={source[key]!r} is not supported; allowed: {allowed}"
            )
    at = f"{field}."
    omp = read_int(source, "original_max_position_embeddings", max_positions, prefix=at)
    return YarnScaling(
        factor=read_float(source, "factor", prefix=at),
        original_max_position_embeddings=omp,
        beta_fast=read_float(source, "beta_fast", 32.0, prefix=at) or 32.0,
        beta_slow=read_float(source, "beta_slow", 1.0, prefix=at) or 1.0,
        mscale=read_float(source, "mscale", 0.0, prefix=at),
        mscale_all_dim=read_float(source, "mscale_all_dim", 0.0, prefix=at),
    )


def dtype_name(dtype: Any) -> str:
    """The name in ``DTYPES`` of a dtype (or dtype name) for parameters and computation."""
    try:
        name = np.dtype(jax.numpy.dtype(dtype)).name
    except TypeError:  # not a dtype at all, e.g. "float33"
        name = None
    if name not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported; allowed: {DTYPES}")
    return name
