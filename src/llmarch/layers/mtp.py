"""DeepSeek-V3's multi-token prediction (MTP, DeepSeek-V3 report §2.2): one module per depth k.

At depth k (1..D), position i, module k combines the previous depth's hidden state with the
embedding of the token k positions ahead, runs its own causal transformer block, and the shared
output head reads the result:

    h'^k_i = M_k [RMSNorm(Emb(t_{i+k})); RMSNorm(h^{k-1}_i)]      M_k: [2D -> D]  (eh_proj)
    h^k_{1:T-k} = TRM_k(h'^k_{1:T-k})                               its own block, causal
    P^k_{i+k+1} = OutHead(RMSNorm(h^k_i))                           shared head, own final norm

``h^0`` is the main model's residual stream *before* its final norm (``ModelOutput.trunk``).
Why: every deeper module's input ``h^k`` (k >= 1) is a block's raw residual output, and each module
normalizes what it reads itself (``hnorm``), exactly as DeepSeek's published checkpoint stores it
(``enorm``, ``hnorm``, ``eh_proj``, a decoder layer, ``shared_head.norm``); feeding the final-normed
states would make ``hnorm`` a second RMSNorm of an already normalized vector for depth 1 only,
and give depth 1 a different kind of input from every later depth. The two differ only by the
main model's final-norm scale, which a model trained either way absorbs into ``hnorm``; importing
DeepSeek's own MTP weights would have to follow whatever they trained with (not checked here).

The concatenation is ``[embedding; hidden]``, the order of the published ``eh_proj`` (its columns
``[:D]`` read the embedding), where the paper writes ``[h; Emb]``: the same map with the rows of
``M_k`` swapped, chosen so a checkpoint's ``eh_proj`` is a plain transpose of ``w``.

Training runs every depth over the whole row at once: module k reads ``t_{i+k}``, the row's
tokens shifted left by k (``shift_left``; the last k positions read a pad id, and, the block being
causal, nothing before them sees them); their targets are masked (``targets_and_mask``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from llmarch import axes
from llmarch.layers.einsum import Einsum
from llmarch.layers.norms import RMSNorm


class MTPModule(nnx.Module):
    """One MTP depth: ``enorm``, ``hnorm``, the projection ``M_k`` (``eh_proj`` ``[2D, D]``, its
    input axis written ``c``), its own transformer ``block``, and the final ``norm`` before the
    shared output head.

    ``block`` is built by the caller (a layer does not import the decoder): any module called as
    ``block(x [B,T,D], positions, segment_ids, cache) -> (x, (cache, aux))``, in ``Transformer``
    a one-block ``BlockRun``, so it has the decoder's caches, remat and sharding.
    """

    def __init__(
        self,
        d_model: int,
        block: nnx.Module,
        *,
        rngs: nnx.Rngs,
        norm_eps: float = 1e-5,
        init_std: float = 0.02,
        param_dtype: jnp.dtype = jnp.float32,
    ):
        self.enorm = RMSNorm(d_model, eps=norm_eps, param_dtype=param_dtype)
        self.hnorm = RMSNorm(d_model, eps=norm_eps, param_dtype=param_dtype)
        # Named as in DeepSeek's checkpoint (a w_<role>_<axes> name cannot say [2D, D]: "c" is
        # lowercase, and weight suffixes are the uppercase axes).
        self.eh_proj = Einsum(
            (2 * d_model, d_model),
            (axes.MLP, axes.EMBED),  # sharded like an FFN down projection
            rngs=rngs,
            init=nnx.initializers.normal(init_std),
            param_dtype=param_dtype,
        )
        self.block = block
        self.norm = RMSNorm(d_model, eps=norm_eps, param_dtype=param_dtype)

    def __call__(
        self,
        h: jax.Array,
        emb: jax.Array,
        positions: jax.Array,
        segment_ids: jax.Array | None = None,
        cache: Any = None,
    ) -> tuple[jax.Array, tuple[Any, Any]]:
        """``h^k``, ``[B,T,D]``, from ``h = h^{k-1} [B,T,D]`` and ``emb = Emb(t_{i+k}) [B,T,D]``
        (aligned: row i of both belongs to position i); returns ``(h^k, (cache, aux))``."""
        x = jnp.concatenate([self.enorm(emb), self.hnorm(h.astype(emb.dtype))], axis=-1)  # [B,T,c]
        x = self.eh_proj("BTc,cD->BTD", x)
        return self.block(x, positions, segment_ids, cache)


def build_mtp(cfg: Any, make_block: Callable[[], nnx.Module], *, rngs: nnx.Rngs) -> nnx.List | None:
    """The ``cfg.mtp_depth`` modules of a ``ModelConfig`` (None for 0), each block from
    ``make_block()``."""
    if not cfg.mtp_depth:
        return None
    pd = jnp.dtype(cfg.param_dtype)
    return nnx.List(
        [
            MTPModule(
                cfg.d_model,
                make_block(),
                rngs=rngs,
                norm_eps=cfg.norm_eps,
                init_std=cfg.init_std,
                param_dtype=pd,
            )
            for _ in range(cfg.mtp_depth)
        ]
    )


def shift_left(tokens: jax.Array, k: int, fill: int = 0) -> jax.Array:
    """``tokens [B,T]`` moved k positions left, the last k filled with ``fill``: row i holds
    ``t_{i+k}``, the token module k embeds at position i."""
    if k == 0:
        return tokens
    B, T = tokens.shape
    pad = jnp.full((B, min(k, T)), fill, tokens.dtype)
    return jnp.concatenate([tokens[:, k:], pad], axis=1)[:, :T]


def targets_and_mask(
    targets: jax.Array, k: int, mask: jax.Array | None = None, segment_ids: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """Depth k's targets and loss mask, ``[B,T]``, from the row's next-token ``targets`` (``t_{i+1}``),
    ``mask`` and ``segment_ids`` as the main loss has them.

    Position i predicts ``t_{i+k+1} = targets[i+k]``. It counts only when i + k < T (the target is
    in the row), the main loss counts ``targets[i+k]`` (``mask[i+k]``: the same document as its
    input, a trained token), and position i is in the same packed document as i + k: a target
    beyond the end of position i's document never counts, whatever follows it in the row.
    """
    B, T = targets.shape
    valid = jnp.arange(T)[None, :] < T - k  # [1,T]
    if mask is not None:
        valid = valid & (shift_left(mask, k) != 0)
    if segment_ids is not None:
        valid = valid & (shift_left(segment_ids, k, fill=-1) == segment_ids)
    return shift_left(targets, k), jnp.broadcast_to(valid, (B, T))
