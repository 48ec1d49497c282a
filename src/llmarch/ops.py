"""Implementation choice per op: the XLA reference or a Pallas kernel.

Layers call the functions here, never a kernel directly. ``impl`` is resolved per call:
an explicit argument wins, then the model config's ``impl``; ``"auto"`` takes the Pallas
kernel on TPU/GPU when one is registered for the op and the XLA reference otherwise. Asking
for Pallas where no kernel exists is an error, not a silent fallback.
"""

from __future__ import annotations

import enum
from collections.abc import Callable

import jax

from kernels_pallas.flash_attention import attention_reference


class Impl(enum.Enum):
    XLA = "xla"
    PALLAS = "pallas"


# op name -> {Impl: function}. Kernels register their Pallas entry as they land.
_REGISTRY: dict[str, dict[Impl, Callable]] = {
    "attention": {Impl.XLA: attention_reference},
}


def register(op: str, impl: Impl, fn: Callable) -> None:
    _REGISTRY.setdefault(op, {})[impl] = fn


def available(op: str) -> tuple[Impl, ...]:
    return tuple(_REGISTRY.get(op, {}))


def resolve(op: str, impl: Impl | str | None = None) -> tuple[Impl, Callable]:
    """The implementation ``op`` runs with under the request ``impl`` (None or "auto": default)."""
    if op not in _REGISTRY:
        raise ValueError(f"op={op!r} is unknown; known ops: {sorted(_REGISTRY)}")
    impls = _REGISTRY[op]
    if impl is None or impl == "auto":
        on_accelerator = jax.default_backend() in ("tpu", "gpu", "cuda", "rocm")
        chosen = Impl.PALLAS if on_accelerator and Impl.PALLAS in impls else Impl.XLA
    else:
        try:
            chosen = Impl(impl)
        except ValueError:
            raise ValueError(
                f"impl={impl!r} is invalid: must be one of 'auto', 'xla', 'pallas'"
            ) from None
        if chosen not in impls:
            raise ValueError(
                f"impl={chosen.value!r} is not available for op={op!r}; "
                f"available: {[i.value for i in impls]}"
            )
    return chosen, impls[chosen]


def attention(q, k, v, *, impl: Impl | str | None = None, **kwargs) -> jax.Array:
    """Attention of ``q [B,T,N,H]`` over ``k, v [B,S,K,H]``; see ``attention_reference``."""
    _, fn = resolve("attention", impl)
    return fn(q, k, v, **kwargs)
