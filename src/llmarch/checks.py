"""The field checks every config shares: one place for "a positive integer", "a finite number in
range" and "one of these choices", so every error reads the same way.

Each raises ``ValueError("<Owner>.<field>=<value> is invalid: <what is allowed>")`` before any array
is built or anything compiles. This module imports nothing from llmarch, so configs at every level
(layers, model, trainer) can use it.
"""

from __future__ import annotations

import math
import typing
from typing import Any

import jax.numpy as jnp

INT32_MAX = 2**31 - 1  # step counters and schedules run as int32 on device


def fail(owner: str, field: str, value: Any, allowed: str) -> typing.NoReturn:
    """``owner`` is the config class; "" for a plain argument (then the message names it alone)."""
    raise ValueError(f"{owner + '.' if owner else ''}{field}={value!r} is invalid: {allowed}")


def check_int(owner: str, field: str, value: Any, *, low: int = 1, high: int | None = None) -> None:
    """A Python integer field (JSON-able, unlike a numpy integer; not a bool) in ``[low, high]``
    (``high=None``: no upper bound)."""
    if high is None:
        allowed = "must be a positive integer" if low == 1 else f"must be an integer >= {low}"
    else:
        allowed = f"must be an integer in [{low}, {high}]"
    if isinstance(value, bool) or not isinstance(value, int):
        fail(owner, field, value, allowed if high is None else "must be a Python int")
    if value < low or (high is not None and value > high):
        fail(owner, field, value, allowed)


def check_positive(owner: str, **fields: Any) -> None:
    """Each keyword is a field that must be a positive Python integer."""
    for name, value in fields.items():
        check_int(owner, name, value)


def check_number(
    owner: str, field: str, value: Any, allowed: str, ok: typing.Callable[[float], bool]
) -> None:
    """A float field must be a real, finite number for which ``ok`` holds. NaN fails every
    comparison, so a check such as ``value < 0`` alone would let it through."""
    if isinstance(value, bool) or not isinstance(value, int | float):  # JSON-able, unlike np.float32
        fail(owner, field, value, "must be a Python int or float")
    if not math.isfinite(value) or not ok(value):
        fail(owner, field, value, allowed)


def check_choice(owner: str, field: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        fail(owner, field, value, f"must be one of {allowed}")


def check_float_dtype(owner: str, field: str, value: Any) -> None:
    """A floating-point dtype, by name ("bfloat16") or as a dtype object."""
    try:
        dtype = jnp.dtype(value)
    except TypeError:
        fail(owner, field, value, "must be a floating-point dtype such as 'float32' or 'bfloat16'")
    if not jnp.issubdtype(dtype, jnp.floating):
        fail(owner, field, value, "must be a floating-point dtype such as 'float32' or 'bfloat16'")


def check_layer(
    owner: str,
    cfg: Any,
    cfg_type: type | None = None,
    *,
    init_std: Any = 0.02,
    param_dtype: Any = "float32",
    **dims: Any,
) -> None:
    """A layer's constructor arguments: positive integer dimensions, its config's type, a positive
    init scale and a floating-point parameter dtype."""
    check_positive(owner, **dims)
    if cfg_type is not None and not isinstance(cfg, cfg_type):
        fail(owner, "cfg", type(cfg).__name__, f"must be {article(cfg_type)}")
    check_number(owner, "init_std", init_std, "must be > 0", lambda v: v > 0)
    check_float_dtype(owner, "param_dtype", param_dtype)


def article(cls: type) -> str:
    """``"a MoEConfig"``, ``"an MLAConfig"``: a class name with the article it reads with."""
    name = cls.__name__
    return f"{'an' if name[0] in 'AEIOU' or name.startswith(('ML', 'MH')) else 'a'} {name}"
