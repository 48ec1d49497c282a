"""Quantized weight matrices: RTN's integer formats, nibble packing, FP8, and ``QuantizedTensor``.

A weight is viewed as ``[..., K, N]``: K the contracted ("input") axes flattened, N the output
axes, leading batch axes (MoE experts) kept. Groups of ``g`` consecutive rows of K share a scale
(``g = None``: one group, a scale per output column). For ``b`` bits (RTN is the definition every
method shares, GPTQ and AWQ only choose the weights it rounds):

- symmetric: ``qmax = 2^(b-1) - 1``, ``s = amax/qmax`` (1 where amax = 0),
  ``q = clip(round(w/s), -qmax-1, qmax)``, ``w ≈ q·s``;
- asymmetric: ``s = (max-min)/(2^b - 1)`` (1 where max = min), ``z = clip(round(-min/s), 0, 2^b-1)``,
  ``q = clip(round(w/s) + z, 0, 2^b-1)``, ``w ≈ (q - z)·s``.

``round`` is half-to-even (``np.round``). Storage: 8 bits as int8 (uint8 when asymmetric); 4 and 3
bits two to a byte along K, row ``2i`` in the low nibble and ``2i+1`` in the high one, signed values
offset by +8. FP8 weights are float8_e4m3fn with ``s = amax/448`` per output column or per
``block × block`` tile of ``[K, N]`` (DeepSeek-V3's checkpoint layout).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

FP8_DTYPE = jnp.float8_e4m3fn
FP8_MAX = 448.0  # the largest finite float8_e4m3fn


def _xp(a: Any):
    return np if isinstance(a, np.ndarray) else jnp


def check_groups(shape: tuple[int, ...], bits: int, group_size: int | None, where: str = "weight") -> None:
    """``ValueError`` unless ``group_size`` divides K (``shape[-2]``) and, packed, K is even."""
    K = shape[-2]
    if group_size is not None and K % group_size:
        raise ValueError(
            f"group_size={group_size} does not divide the input dimension K={K} of {where} "
            f"{tuple(shape)}; use a divisor of {K} or None (per output channel)"
        )
    if bits < 8 and K % 2:
        raise ValueError(
            f"bits={bits} packs two rows per byte: the input dimension K={K} of {where} must be even"
        )


def rtn(w: Any, bits: int, group_size: int | None, symmetric: bool) -> tuple[Any, Any, Any]:
    """Round-to-nearest quantization of ``w [..., K, N]`` (numpy in, numpy out; jax otherwise).

    Returns:
      ``(q, scale, zero)``: ``q`` int8 ``[..., K, N]`` (uint8 for 8-bit asymmetric), ``scale``
      float32 ``[..., K//g, N]``, ``zero`` like ``scale`` in q's dtype, or None when symmetric.
    """
    xp = _xp(w)
    check_groups(w.shape, bits, group_size)
    *batch, K, N = w.shape
    g = K if group_size is None else group_size
    wg = w.astype(xp.float32).reshape(*batch, K // g, g, N)  # [..., groups, g, N]
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        amax = xp.max(xp.abs(wg), axis=-2, keepdims=True)
        scale = xp.where(amax == 0, xp.float32(1), amax / xp.float32(qmax))
        q = xp.clip(xp.round(wg / scale), -qmax - 1, qmax).astype(xp.int8)
        zero = None
    else:
        levels = 2**bits - 1
        lo, hi = xp.min(wg, axis=-2, keepdims=True), xp.max(wg, axis=-2, keepdims=True)
        scale = xp.where(hi == lo, xp.float32(1), (hi - lo) / xp.float32(levels))
        dtype = xp.uint8 if bits == 8 else xp.int8
        zero_f = xp.clip(xp.round(-lo / scale), 0, levels)
        q = xp.clip(xp.round(wg / scale) + zero_f, 0, levels).astype(dtype)
        zero = zero_f.astype(dtype).reshape(*batch, K // g, N)
    return q.reshape(*batch, K, N), scale.reshape(*batch, K // g, N), zero


def pack(q: Any, bits: int, *, signed: bool = True) -> Any:
    """``q [..., K, N]`` in storage form: 8 bits as is; 4 and 3 bits two per uint8 ``[..., K/2, N]``
    (row 2i low nibble, 2i+1 high nibble; ``signed`` values offset by +8)."""
    if bits == 8:
        return q
    xp = _xp(q)
    u = (q.astype(xp.int16) + (8 if signed else 0)).astype(xp.uint8)  # 0..15
    return u[..., 0::2, :] | (u[..., 1::2, :] << 4)


def nibbles(p: Any, *, signed: bool = True) -> tuple[Any, Any]:
    """The low and high nibbles of packed ``p [..., K/2, N]`` (rows 0,2,4,.. and 1,3,5,..) as
    int8, the +8 offset removed when ``signed``."""
    xp = _xp(p)
    offset = 8 if signed else 0
    low = (p & 0xF).astype(xp.int8) - xp.int8(offset)
    high = (p >> 4).astype(xp.int8) - xp.int8(offset)
    return low, high


def unpack(p: Any, bits: int, K: int, *, signed: bool = True) -> Any:
    """The inverse of ``pack``: ``[..., K, N]`` int8 (8 bits: ``p`` itself)."""
    if bits == 8:
        return p
    xp = _xp(p)
    low, high = nibbles(p, signed=signed)
    q = xp.stack([low, high], axis=-2)  # [..., K/2, 2, N]
    return q.reshape(*p.shape[:-2], K, p.shape[-1])


def fp8(w: Any, block: int | None = None) -> tuple[jax.Array, jax.Array]:
    """float8_e4m3fn weights of ``w [..., K, N]`` and float32 scales ``amax/448``: ``[..., 1, N]``
    per output column, or ``[..., ⌈K/b⌉, ⌈N/b⌉]`` per ``b × b`` block (edge blocks partial)."""
    w = jnp.asarray(w, jnp.float32)
    *batch, K, N = w.shape
    if block is None:
        amax = jnp.max(jnp.abs(w), axis=-2, keepdims=True)  # [..., 1, N]
        scale = jnp.where(amax == 0, 1.0, amax / FP8_MAX)
        return (w / scale).astype(FP8_DTYPE), scale
    kb, nb = -(-K // block), -(-N // block)
    padded = jnp.pad(w, [(0, 0)] * len(batch) + [(0, kb * block - K), (0, nb * block - N)])
    tiles = padded.reshape(*batch, kb, block, nb, block)
    amax = jnp.max(jnp.abs(tiles), axis=(-3, -1))  # [..., kb, nb]
    scale = jnp.where(amax == 0, 1.0, amax / FP8_MAX)
    q = (w / _expand(scale, block, K, N, cols=block)).astype(FP8_DTYPE)
    return q, scale


def _expand(scale: jax.Array, rows: int, K: int, N: int, cols: int = 1) -> jax.Array:
    """``scale [..., K/rows, N/cols]`` repeated to ``[..., K, N]`` (cut to K, N at partial edges)."""
    s = jnp.repeat(scale, rows, axis=-2)[..., :K, :]
    return jnp.repeat(s, cols, axis=-1)[..., :N] if cols > 1 else s


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedTensor:
    """A quantized ``[..., K, N]`` weight in storage form (a pytree: arrays are leaves).

    Attributes:
      q: int: int8/uint8 ``[..., K, N]`` (8 bits) or packed uint8 ``[..., K/2, N]`` (4 and 3
        bits); fp8: float8_e4m3fn ``[..., K, N]``.
      scale: float32 ``[..., K/g, N]`` (g = K when ``group_size`` is None); fp8 with blocks
        ``[..., ⌈K/b⌉, ⌈N/b⌉]``.
      zero: zero points like ``scale`` (asymmetric int) or None.
      bits, group_size, kind ("int" or "fp8"), shape (the logical ``[..., K, N]``): static.
    """

    q: jax.Array
    scale: jax.Array
    zero: jax.Array | None
    bits: int = dataclasses.field(metadata={"static": True})
    group_size: int | None = dataclasses.field(metadata={"static": True})
    kind: str = dataclasses.field(metadata={"static": True})
    shape: tuple[int, ...] = dataclasses.field(metadata={"static": True})

    @classmethod
    def from_unpacked(
        cls, q: Any, scale: Any, zero: Any, bits: int, group_size: int | None, *, kind: str = "int"
    ) -> QuantizedTensor:
        """The storage form of an algorithm's ``(q, scale, zero)`` (see ``rtn``) or of ``fp8``'s
        ``(q, scale)`` with ``kind="fp8"``, ``bits=8`` and ``group_size`` its block."""
        shape = tuple(int(d) for d in q.shape)
        if kind == "fp8":
            return cls(
                jnp.asarray(q, FP8_DTYPE), jnp.asarray(scale, jnp.float32), None, 8, group_size, kind, shape
            )
        if kind != "int":
            raise ValueError(f"kind={kind!r} is invalid: must be 'int' or 'fp8'")
        check_groups(shape, bits, group_size)
        signed = zero is None
        packed = pack(q if isinstance(q, jax.Array) else np.asarray(q), bits, signed=signed)
        zero = None if zero is None else jnp.asarray(zero)
        return cls(jnp.asarray(packed), jnp.asarray(scale, jnp.float32), zero, bits, group_size, kind, shape)

    @property
    def K(self) -> int:
        return self.shape[-2]

    @property
    def N(self) -> int:
        return self.shape[-1]

    @property
    def nbytes(self) -> int:
        return nbytes(self)


def quantize(
    w: Any,
    *,
    method: str,
    bits: int = 8,
    group_size: int | None = None,
    symmetric: bool = True,
    fp8_block: int | None = None,
) -> QuantizedTensor:
    """``w [..., K, N]`` quantized by RTN (``method="rtn"``) or to FP8 (``method="fp8"``)."""
    if method == "fp8":
        q, scale = fp8(w, fp8_block)
        return QuantizedTensor.from_unpacked(q, scale, None, 8, fp8_block, kind="fp8")
    if method != "rtn":
        raise ValueError(f"method={method!r} is invalid here: must be 'rtn' or 'fp8'")
    q, scale, zero = rtn(np.asarray(w, np.float32), bits, group_size, symmetric)
    return QuantizedTensor.from_unpacked(q, scale, zero, bits, group_size)


def dequantize(qt: QuantizedTensor) -> jax.Array:
    """float32 ``[..., K, N]``: ``q·s`` (symmetric, fp8) or ``(q - z)·s`` (asymmetric)."""
    K, N = qt.K, qt.N
    if qt.kind == "fp8":
        b = qt.group_size
        scale = qt.scale if b is None else _expand(qt.scale, b, K, N, cols=b)
        return qt.q.astype(jnp.float32) * scale
    q = unpack(qt.q, qt.bits, K, signed=qt.zero is None).astype(jnp.float32)
    g = K if qt.group_size is None else qt.group_size
    zero = 0.0 if qt.zero is None else _expand(qt.zero.astype(jnp.float32), g, K, N)
    return (q - zero) * _expand(qt.scale, g, K, N)


def nbytes(qt: QuantizedTensor) -> int:
    """Bytes stored: the (packed) values, the scales and the zero points."""
    return sum(math.prod(a.shape) * a.dtype.itemsize for a in (qt.q, qt.scale, qt.zero) if a is not None)
