"""FP8 GEMMs with TransformerEngine-style per-tensor *delayed* scaling, and the state they carry.

Each FP8 GEMM operand, the input ``x`` and the weight ``w`` of the forward pass and the output
gradient ``dy`` of the backward pass, has an amax history of ``H`` steps (``FP8Meta``, a
``[3, H]`` float32 variable of the ``Einsum`` layer: rows x, w, dy; column 0 the most recent step).
A training step quantizes each operand to E4M3 with the scale TransformerEngine's default
algorithm takes from the *previous* steps' amaxes, ``scale = max(history) / 448`` (algorithm
"max", margin 0), and records its own amax: the history rolls by one, this step's amax enters at
index 0 and the oldest leaves. The scale never waits for the current tensor's reduction, which is
the point of delaying it (the cast can be fused into the producer), and its cost: a value that grew
past the stale scale's range **saturates** to ±448·scale (``fb.to_e4m3`` clips, as TE's cast does),
silently, until the history catches up a step later.

Differences from TE, on purpose:

- The first step, whose history is still all zeros (and any operand whose history holds only
  zeros), is quantized with its *current* amax (the ``"tensor"`` recipe of ``fp8_linear``). TE
  starts from a stored scale of 1.0, which casts gradients of ~1e-5 to zero on step 1.
- ``dy`` is E4M3 like the other operands (TE's default HYBRID format uses E5M2 for gradients), so
  that this recipe differs from ``"tensor"`` and ``"blockwise"`` in its scaling only.
- The dequantized operands are multiplied in float32 (an emulation, as ``"tensor"`` is): there is
  no FP8 kernel on this path.

How the dy amax leaves the backward pass: ``fp8_delayed_einsum`` is a ``jax.custom_vjp`` that takes
the history as an input and returns the *new history* as its cotangent. The train step
(``llmarch.train.step``) differentiates the ``FP8Meta`` variables along with the parameters and
overwrites them with that "gradient" instead of handing it to the optimizer (the idea of Flax
linen's ``OVERWRITE_WITH_GRADIENT`` collection). Consequences: every FP8 layer must be called
exactly once per differentiated forward pass (two calls would *sum* two histories; a layer not
called gets a zero history and starts again from current scaling), and a forward pass without a
gradient (evaluation, decoding) reads the history without recording anything. With gradient
accumulation each micro-step is one step of the history.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from llmarch.quant import fp8_blockwise as fb

RECIPE = "delayed"
DEFAULT_HISTORY = 16  # TE's default is 1024 steps; 16 follows a growing tensor sooner
MAX_HISTORY = 4096
OPERANDS = ("x", "w", "dy")  # the history's rows
_F32 = jnp.float32


class FP8Meta(nnx.Variable):
    """Delayed-scaling state of one FP8 layer: amax histories ``[..., 3, H]`` float32 (rows
    ``OPERANDS``, column 0 the latest step; a scanned run's layers stack a leading ``L`` axis).

    Not an ``nnx.Param``: the optimizer, weight decay and gradient clipping never see it; the train
    step overwrites it with its "gradient" (module docstring); checkpoints keep it with the rest
    of the model's non-parameter state."""


def check_history(history: object) -> int:
    """``history`` as the amax history length; raises ValueError unless an int in [1, MAX_HISTORY]."""
    if isinstance(history, bool) or not isinstance(history, int) or not 1 <= history <= MAX_HISTORY:
        raise ValueError(
            f"fp8 amax history length={history!r} is invalid: it must be an int from 1 to {MAX_HISTORY} "
            "(steps whose amax the delayed scale takes the max over)"
        )
    return history


def init_meta(history: int, lead: tuple[int, ...] = ()) -> FP8Meta:
    """A fresh (all-zero) ``FP8Meta`` of ``[*lead, 3, history]``."""
    return FP8Meta(jnp.zeros((*lead, len(OPERANDS), check_history(history)), _F32))


def delayed_scale(history: jax.Array, current_amax: jax.Array) -> jax.Array:
    """float32 ``[]`` dequantization scale from a ``[H]`` history: ``max(history)/448``, or, while
    the history holds only zeros, from ``current_amax`` (module docstring)."""
    past = jnp.max(history)
    return fb.scale_from_amax(jnp.where(past > 0, past, current_amax))


def roll(history: jax.Array, amax: jax.Array) -> jax.Array:
    """``[3, H]`` history with ``amax [3]`` entered at column 0 and the oldest column dropped."""
    return jnp.concatenate([amax[:, None].astype(_F32), history[:, :-1]], axis=1)


def _amax(a: jax.Array) -> jax.Array:
    return jnp.max(jnp.abs(a.astype(_F32)))


def _quantize(a: jax.Array, history_row: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(q e4m3, scale, amax)`` of ``a`` under the delayed scale of ``history_row``."""
    amax = _amax(a)
    scale = delayed_scale(history_row, amax)
    return fb.quantize_per_tensor(a, scale), scale, amax


def _einsum(eqn: str, a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.einsum(eqn, a, b, precision=jax.lax.Precision.HIGHEST, preferred_element_type=_F32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _delayed_einsum(eqn: str, x: jax.Array, w: jax.Array, history: jax.Array) -> jax.Array:
    return _forward(eqn, x, w, history)[0]


def _forward(eqn, x, w, history):
    xq, xs, ax = _quantize(x, history[0])
    wq, ws, aw = _quantize(w, history[1])
    y = _einsum(eqn, xq.astype(_F32) * xs, wq.astype(_F32) * ws)
    # e4m3 operands and their scales are what Dgrad and Wgrad need (1 byte an element);
    # zero-size arrays carry the primal dtypes for the cotangents.
    dtypes = (jnp.zeros((0,), x.dtype), jnp.zeros((0,), w.dtype))
    return y.astype(x.dtype), (xq, xs, wq, ws, history, jnp.stack([ax, aw]), dtypes)


def _backward(eqn, res, g):
    xq, xs, wq, ws, history, amax_xw, (x_dtype, w_dtype) = res
    gq, gs, ag = _quantize(g, history[2])
    _, vjp = jax.vjp(functools.partial(_einsum, eqn), xq.astype(_F32) * xs, wq.astype(_F32) * ws)
    dx, dw = vjp(gq.astype(_F32) * gs)
    new_history = roll(history, jnp.concatenate([amax_xw, ag[None]]))  # the "gradient" of the meta
    return dx.astype(x_dtype.dtype), dw.astype(w_dtype.dtype), new_history


_delayed_einsum.defvjp(_forward, _backward)


def fp8_delayed_einsum(eqn: str, x: jax.Array, w: jax.Array, history: jax.Array) -> jax.Array:
    """``jnp.einsum(eqn, x, w)`` with x, w (and dy in the VJP) through E4M3 at delayed per-tensor
    scales (module docstring).

    Args:
      eqn: any two-operand einsum (per-tensor scales do not care how it contracts).
      x: the activations, in the compute dtype.
      w: the weight in its master dtype (float32), quantized from it at every call.
      history: ``[3, H]`` float32 amax histories of x, w, dy (``FP8Meta``'s value).

    Returns:
      the product in x's dtype. Its VJP gives dx in x's dtype, dw in w's, and for ``history`` the
      history after this step (to overwrite it with, not to descend along).
    """
    if history.ndim != 2 or history.shape[0] != len(OPERANDS) or history.shape[1] < 1:
        raise ValueError(f"fp8 amax history has shape {history.shape}: it must be [3, H] with H >= 1")
    return _delayed_einsum(eqn, x, w, history.astype(_F32))


def split_meta(state: nnx.State) -> tuple[nnx.State, nnx.State]:
    """``(meta, others)``: ``state``'s ``FP8Meta`` variables, and everything else."""
    return nnx.split_state(state, FP8Meta, ...)


def has_meta(state: nnx.State) -> bool:
    """Whether ``state`` holds any ``FP8Meta`` variable (a model under ``--precision fp8-delayed``)."""
    return bool(jax.tree.leaves(split_meta(state)[0]))
