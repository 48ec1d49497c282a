"""Collective matmul: tensor parallelism's all-gather and reduce-scatter decomposed into a ring of
``ppermute`` steps, each interleaved with the partial matmul that does not depend on it.

Megatron tensor parallelism with sequence parallelism (Korthikanti et al. 2022) gathers the
sequence before a column-parallel matmul and reduce-scatters it after a row-parallel one; as
single collectives, the matmul waits for the whole all-gather, and the reduce-scatter for the whole
matmul. Decomposed (Wang et al., "Overlap Communication with Dependent Computation via
Decomposition in Large Deep Learning Models", ASPLOS 2023), every step's transfer has a matmul
beside it that needs none of it, so the transfer can run under that matmul; the dependence is
visible in the program, not left to the scheduler to discover.

Both functions are called *inside* ``jax.shard_map`` over a mesh axis ``axis`` of size ``n``; the
letters are those of ``llmarch.axes`` (``Tc = T/n`` the local sequence chunk, ``Fl = F/n`` the
local column block):

- ``all_gather_matmul(x [B,Tc,D], w [D,Fl]) -> [B,T,Fl]`` = ``all_gather_T(x) @ w``. Device ``d``
  starts with chunk ``d``; at step ``i`` it multiplies the chunk it holds, ``(d - i) mod n``, and
  at the same time passes that chunk to device ``d + 1``: ``n`` matmuls, ``n - 1`` transfers.
  ``bidirectional=True`` sends the device's chunk both ways round the ring, so the farthest chunk
  arrives after ``ceil((n-1)/2)`` steps instead of ``n - 1``: the same ``n - 1`` chunk transfers
  per device, split between the two directions of each link (which full-duplex links, TPU ICI
  and NVLink, carry at once), so each step moves two chunks beside two matmuls.
- ``matmul_reduce_scatter(h [B,T,Fl], w [Fl,D]) -> [B,Tc,D]`` = ``reduce_scatter_T(h @ w)``. Chunk
  ``j``'s accumulator starts on device ``j + 1`` and travels forward; at step ``i`` device ``d``
  adds its partial product for chunk ``(d - 1 - i) mod n`` to the accumulator it received and
  sends it on, so after ``n - 1`` transfers every accumulator is home. The matmul of step ``i + 1``
  reads only ``h`` and ``w``, never the transfer of step ``i``.

Gradients come from autodiff through ``ppermute`` (its transpose is the inverse permutation):
the backward of ``all_gather_matmul`` is a reduce-scatter ring in the opposite direction
(``dx``: each step adds ``dy_chunk @ wᵀ`` to the cotangent received and sends it back) with a
local ``dw = Σ_i x_iᵀ dy_i`` over the chunks the forward held (the gathered ``x``, as the plain
path saves); the backward of ``matmul_reduce_scatter`` is an all-gather ring of ``dy``, run
backwards, each step's ``dh_chunk = dy_chunk @ wᵀ`` independent of the step's transfer. So the
backward is two collective matmuls as well, with the same overlap structure.

Contractions are einsums in the axis alphabet (``eqn``, default the FFN's; attention's are
``"BTD,DNH->BTNH"`` in and ``"BTNH,NHD->BTD"`` out); ``seq`` names the split letter, which must be
a free axis of the activation and of the output, absent from ``w``.

The layers that ring (``layers.ffn.SwiGLU``, ``layers.attention.Attention``, under
``ModelConfig.collective_matmul``) find their axis with ``ring_axis`` (the mesh axis the ambient
rules split ``mlp``/``heads`` over), check the sequence with ``check_sequence`` and their weights
with ``check_plain``, make the batch axes manual too (``sharding.batch_axes``), and constrain their input
and output to ``RESIDUAL``, so that the rules (``tp``: replicated; ``tp_sp``: sequence-split)
decide the residual stream's layout between sublayers.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

from llmarch import axes, sharding

Weights = jax.Array | Sequence[jax.Array]
# The residual stream's logical axes: a layer that rings constrains its input and output to them,
# so the ring's sequence split stays inside the layer whatever the rules (a no-op where they
# already split the sequence over the ring's axis, as rules ``tp_sp`` do).
RESIDUAL = (axes.BATCH, axes.SEQ, axes.ACT_EMBED)


def ring_axis(layer: str, logical: str = axes.MLP) -> str | None:
    """The mesh axis that the ambient rules split ``logical`` (a layer's tensor-parallel axis:
    ``mlp``, ``heads``) over, if it has more than one device; None (the layer's plain path) with
    no mesh, no rules, or ``logical`` unsplit. ``layer`` names the caller in errors."""
    targets = sharding.logical_axes_on_mesh(logical)
    if len(targets) > 1:
        raise ValueError(
            f"{layer} collective_matmul=True rings over one mesh axis, but the rules split "
            f"{logical!r} over {targets}; map it to one axis (e.g. rules 'tp') or set "
            "collective_matmul=False"
        )
    return targets[0] if targets and jax.sharding.get_abstract_mesh().shape[targets[0]] > 1 else None


def check_sequence(layer: str, axis: str, length: int) -> None:
    """A ring splits the sequence over ``axis``: ``length`` must be a multiple of its size."""
    n = jax.sharding.get_abstract_mesh().shape[axis]
    if length % n:
        raise ValueError(
            f"{layer} collective_matmul=True splits the sequence over mesh axis {axis!r} of size "
            f"{n}: sequence length T={length} must be a multiple of it (decoding one token at a "
            "time cannot run so: use a config with collective_matmul=False there)"
        )


def check_plain(layer: str, einsums: dict) -> None:
    """The rings multiply raw weights: FP8, LoRA, quantized and low-rank ``Einsum`` variants are
    refused by name (their own contractions would be skipped)."""
    for name, e in einsums.items():
        fp8 = getattr(e, "fp8", None)
        if type(e).__name__ != "Einsum" or fp8 is not None:
            raise ValueError(
                f"{layer} collective_matmul=True needs plain Einsum weights; {name} is of type "
                f"{type(e).__name__}"
                + (f" with fp8={fp8!r}" if fp8 else "")
                + "; set collective_matmul=False for FP8, LoRA, quantized or low-rank weights"
            )


def _parse(eqn: str, seq: str, where: str) -> tuple[str, str, str]:
    """``"BTD,DF->BTF"`` -> ``("BTD", "DF", "BTF")``, checking that ``seq`` is split-able."""
    try:
        inputs, out = eqn.replace(" ", "").split("->")
        lhs, rhs = inputs.split(",")
    except ValueError:
        raise ValueError(
            f"{where}: eqn={eqn!r} is invalid; expected 'LHS,RHS->OUT', e.g. 'BTD,DF->BTF'"
        ) from None
    if seq not in lhs or seq not in out or seq in rhs:
        raise ValueError(
            f"{where}: seq={seq!r} must be a letter of the activation and of the output of "
            f"eqn={eqn!r} and not of the weight (the sequence axis split over the ring)"
        )
    return lhs, rhs, out


def _as_tuple(w: Weights) -> tuple[tuple[jax.Array, ...], bool]:
    return (tuple(w), False) if isinstance(w, list | tuple) else ((w,), True)


def _send(x, axis: str, n: int, shift: int):
    """Every device's ``x`` to device ``d + shift`` of the ring."""
    return lax.ppermute(x, axis, [(i, (i + shift) % n) for i in range(n)])


def all_gather_matmul(
    x: jax.Array,
    w: Weights,
    axis: str,
    *,
    eqn: str = "BTD,DF->BTF",
    seq: str = "T",
    bidirectional: bool = False,
) -> jax.Array | tuple[jax.Array, ...]:
    """``einsum(eqn, all_gather(x over seq), w)``, as a ring of ``ppermute`` steps (see module doc).

    Args:
      x: this device's sequence chunk, e.g. ``[B,Tc,D]``.
      w: the local weight block, e.g. ``[D,Fl]``, or a sequence of them (SwiGLU's gate and up):
        each step then multiplies the chunk in hand by every one, and ``x`` travels once.
      axis: the mesh axis of the enclosing ``shard_map`` the sequence is split over.
      eqn, seq: the contraction and the letter of its sequence axis.
      bidirectional: send each chunk both ways round the ring (half the steps).
    Returns:
      ``[B,T,Fl]`` (a tuple of them when ``w`` is a sequence); chunk ``j`` of ``T`` is device
      ``j``'s ``x``.
    """
    lhs, _, out = _parse(eqn, seq, "all_gather_matmul")
    ws, single = _as_tuple(w)
    n = lax.axis_size(axis)
    d = lax.axis_index(axis)
    at, tc = out.index(seq), x.shape[lhs.index(seq)]

    def product(chunk):  # one chunk's rows of every output: [B,Tc,Fl] each
        return tuple(jnp.einsum(eqn, chunk, wi) for wi in ws)

    outs = None

    def place(outs, parts, source):  # writes chunk `source`'s rows: [B,Tc,Fl] -> [B,T,Fl]
        if outs is None:
            outs = tuple(jnp.zeros(p.shape[:at] + (n * tc,) + p.shape[at + 1 :], p.dtype) for p in parts)
        return tuple(
            lax.dynamic_update_slice_in_dim(o, p, source * tc, at) for o, p in zip(outs, parts, strict=True)
        )

    if not bidirectional or n <= 2:
        held = x
        for i in range(n):
            nxt = _send(held, axis, n, 1) if i < n - 1 else None  # issued beside this step's matmul
            outs = place(outs, product(held), (d - i) % n)
            held = nxt
    else:
        # Step i holds chunk d - i (from behind) and d + i (from ahead); for even n the chunk
        # d + n/2 arrives both ways, so the last step takes it from behind only.
        fwd = bwd = x
        outs = place(outs, product(x), d)
        last = n // 2
        for i in range(1, last + 1):
            fwd = _send(fwd, axis, n, 1)
            both = i < last or n % 2
            if both:
                bwd = _send(bwd, axis, n, -1)
            outs = place(outs, product(fwd), (d - i) % n)
            if both:
                outs = place(outs, product(bwd), (d + i) % n)
    return outs[0] if single else outs


def matmul_reduce_scatter(
    h: jax.Array,
    w: jax.Array,
    axis: str,
    *,
    eqn: str = "BTF,FD->BTD",
    seq: str = "T",
) -> jax.Array:
    """``reduce_scatter(einsum(eqn, h, w) over seq)``, as a ring of ``ppermute`` steps.

    Args:
      h: the whole sequence's activation with this device's block of the contracted axis,
        e.g. ``[B,T,Fl]``; ``T`` divisible by the size of ``axis``.
      w: the local weight block, e.g. ``[Fl,D]``.
      axis: the mesh axis of the enclosing ``shard_map``, the one ``Fl`` is split over.
      eqn, seq: the contraction and the letter of its sequence axis.
    Returns:
      ``[B,Tc,D]``: this device's chunk of the sequence, summed over the devices of ``axis``.
    """
    lhs, _, _ = _parse(eqn, seq, "matmul_reduce_scatter")
    n = lax.axis_size(axis)
    d = lax.axis_index(axis)
    at = lhs.index(seq)
    if h.shape[at] % n:
        raise ValueError(
            f"matmul_reduce_scatter: the sequence axis {seq!r} of h {h.shape} has length "
            f"{h.shape[at]}, not a multiple of the size {n} of mesh axis {axis!r}"
        )
    tc = h.shape[at] // n

    def partial(source):  # chunk `source`'s partial sum over this device's block: [B,Tc,D]
        return jnp.einsum(eqn, lax.dynamic_slice_in_dim(h, source * tc, tc, at), w)

    acc = partial((d - 1) % n)
    for i in range(1, n):
        acc = _send(acc, axis, n, 1) + partial((d - 1 - i) % n)  # the matmul needs no transfer
    return acc
