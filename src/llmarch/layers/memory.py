"""Product-key memory (PKM) and UltraMem layers: a huge value table, a few rows read per token.

``MemoryLayer(d_model, memory_cfg, rngs=...)`` is one memory layer (a ``MemoryConfig``); every
UltraMem part is a switch there, so the paper's ablation chain (PKM → raw scores → halved value
width + projection → TDQKR → MCS → IVE) is a sequence of configs. Per token ``x [D]``:

1. queries: ``q_row, q_col = LayerNorm(x W_q)`` per memory head ``[N,H]`` (LayerNorm, not PKM's
   BatchNorm, which padding breaks); keys ``K_row, K_col [N,P,Z,H]`` (LayerNormed too with
   ``key_norm``), Z = max(r, 1) rank components.
2. scores ``S_row = K_row q_row [N,P,Z]`` (and columns); the search picks m slots per head
   (``memory_search``): PKM's exact product-key top-m of ``s_row[i] + s_col[j]``, or TDQKR's
   top-m of ``Σ_c S_row C_c S_colᵀ`` among the candidates of the cores' leading singular vectors.
3. weights: softmax over each head's m scores (PKM) or the raw scores (UltraMem); with MCS each
   core's score weights its own chunk of the row.
4. read (``memory_lookup``): ``Σ w·V[row]`` over the ``N·m`` picks, gathering only those rows;
   with IVE, grid slot → fixed permutation → (physical row, virtual block), pooled per block.
5. output: optional Memory+ gate ``⊙ silu(x W_g)``, then ``W_o [W,U,D]`` (UltraMem's projection,
   one per virtual block), or the pooled row itself (PKM, value width = D).

Skip-layer wiring (UltraMem's: the layer reads the stream entering block i, its output joins the
stream after block j) is ``ModelConfig.skip_layers`` with ``skip_kind="ultramem"``; a skip-layer
memory normalizes its input itself (RMSNorm), an FFN-position one ("pkm" blocks) gets the block's.

The leading singular vectors ``u, v`` are recomputed from the current cores in every forward
pass, without gradient, and their joint sign is aligned with ``tucker_ref``, non-trainable state
(``MemoryState``, in the train step's ``rest``) holding the previous step's aligned ``(u, v)``:
the train step (``make_train_step(update_rest=True)``, as the trainer runs it) calls
``Transformer.update_state`` after each update, which stores the new cores' aligned vectors. A
loop that never updates ``rest`` aligns with the initial (Perron, non-negative) vectors instead.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from llmarch import axes
from llmarch.checks import check_layer, fail
from llmarch.layers.configs import MemoryConfig
from llmarch.layers.einsum import Einsum, param
from llmarch.layers.memory_lookup import read_values, virtual_to_physical
from llmarch.layers.memory_search import (
    initial_reference,
    leading_singular_vectors,
    product_key_search,
    tucker_aux_loss,
    tucker_search,
)
from llmarch.layers.memory_sharded import memory_axes, sharded_read_values
from llmarch.layers.norms import LayerNorm, RMSNorm

VALUES_PATTERN = r"values_mu"  # the value tables' parameter name, for learning-rate groups


class MemoryState(nnx.Variable):
    """Non-trainable memory-layer state (IVE permutation, TDQKR sign reference): not an
    ``nnx.Param``, so it travels in the train step's ``rest`` and in checkpoints."""


class MemoryLayer(nnx.Module):
    """A PKM/UltraMem memory layer: ``layer(x [B,T,D]) -> (out [B,T,D], aux)``.

    ``aux["loss"]`` is the TDQKR singular-value loss (0 without TDQKR); ``llmarch.model.aux_loss``
    adds it to the training objective.
    """

    def __init__(
        self,
        d_model: int,
        cfg: MemoryConfig,
        *,
        rngs: nnx.Rngs,
        pre_norm: bool = False,
        norm_eps: float = 1e-5,
        init_std: float = 0.02,
        param_dtype: jnp.dtype = jnp.float32,
        impl: str = "auto",
    ):
        """``pre_norm``: RMS-normalize the input first (a skip-layer memory reads the raw residual
        stream; an FFN-position one gets its block's norm)."""
        check_layer(
            "MemoryLayer", cfg, MemoryConfig, d_model=d_model, init_std=init_std, param_dtype=param_dtype
        )
        check_width(d_model, cfg)
        m = self.mem = cfg
        D, N, P, H, r = d_model, m.num_heads, m.num_keys, m.key_dim, m.tucker_rank
        Z, U, W, X = max(r, 1), m.width(d_model), m.virtual_blocks, m.num_cores
        pd = jnp.dtype(param_dtype)
        self.impl = impl
        self.norm = RMSNorm(D, eps=norm_eps, param_dtype=pd) if pre_norm else None
        # The official UltraMem initialization: query projection and keys N(0, 1/H) (LayerNorms
        # follow, so only their directions matter), LayerNorm scales H^-0.33, cores U(0, 1),
        # output projection N(0, 1/(W·U)).
        normal = nnx.initializers.normal
        self.w_q_row_dnh = Einsum(
            (D, N, H), (axes.EMBED, None, None), rngs=rngs, init=normal(H**-0.5), param_dtype=pd
        )
        self.w_q_col_dnh = Einsum(
            (D, N, H), (axes.EMBED, None, None), rngs=rngs, init=normal(H**-0.5), param_dtype=pd
        )
        self.query_norm = LayerNorm(H, scale_init=H**-0.33, param_dtype=pd)
        self.keys_row_npzh = param(normal(H**-0.5)(rngs.params(), (N, P, Z, H), pd), (None,) * 4)
        self.keys_col_npzh = param(normal(H**-0.5)(rngs.params(), (N, P, Z, H), pd), (None,) * 4)
        self.key_norm = LayerNorm(H, scale_init=H**-0.33, param_dtype=pd) if m.key_norm else None
        if r:
            cores = jax.random.uniform(rngs.params(), (X, N, Z, Z), pd)
            self.cores_xnzy = param(cores, (None, None, None, None))
            self.tucker_ref = MemoryState(initial_reference(cores))  # [N, 2, Z]
        std = m.value_init_std if m.value_init_std is not None else U**-0.5
        self.values_mu = param(normal(std)(rngs.params(), (m.physical_rows, U), pd), (axes.MEMORY_ROWS, None))
        if W > 1:
            self.ive_permutation = MemoryState(
                jax.random.permutation(rngs.params(), m.num_slots).astype(jnp.int32)
            )
        self.w_gate_dwu = (
            Einsum((D, W, U), (axes.EMBED, None, None), rngs=rngs, init=normal(init_std), param_dtype=pd)
            if m.gate
            else None
        )
        self.w_out_wud = (
            Einsum(
                (W, U, D), (None, None, axes.EMBED), rngs=rngs, init=normal((W * U) ** -0.5), param_dtype=pd
            )
            if m.output_proj
            else None
        )

    def search(self, h: jax.Array) -> tuple[jax.Array, jax.Array]:
        """The picks of ``h [B,T,D]``: ``(weights [B,T,N,m,X], slots [B,T,N,m])`` (grid slots)."""
        m = self.mem
        q_row = self.query_norm(self.w_q_row_dnh("BTD,DNH->BTNH", h))  # float32
        q_col = self.query_norm(self.w_q_col_dnh("BTD,DNH->BTNH", h))
        k_row, k_col = self.keys_row_npzh[...], self.keys_col_npzh[...]
        if self.key_norm is not None:
            k_row, k_col = self.key_norm(k_row), self.key_norm(k_col)
        s_row = jnp.einsum("BTNH,NPZH->BTNPZ", q_row, k_row.astype(jnp.float32))
        s_col = jnp.einsum("BTNH,NPZH->BTNPZ", q_col, k_col.astype(jnp.float32))
        if m.tucker_rank == 0:
            scores, slots = product_key_search(s_row[..., 0], s_col[..., 0], m.topk, impl=self.impl)
            core_scores = scores[..., None]
        else:
            u, v = leading_singular_vectors(self.cores_xnzy[...], self.tucker_ref[...])
            scores, core_scores, slots = tucker_search(
                s_row, s_col, self.cores_xnzy[...], u, v, m.topk, impl=self.impl
            )
        if m.score == "softmax":
            return jax.nn.softmax(scores, axis=-1)[..., None], slots
        return core_scores, slots

    def __call__(self, x: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        B, T, _ = x.shape
        m = self.mem
        h = self.norm(x) if self.norm is not None else x
        with jax.named_scope("memory_search"):
            weights, slots = self.search(h)
            rows, blocks = virtual_to_physical(
                slots, self.ive_permutation[...] if m.virtual_blocks > 1 else None, m.physical_rows
            )
        J = m.reads_per_token
        rows = rows.reshape(B * T, J)
        weights = weights.reshape(B * T, J, weights.shape[-1])
        blocks = None if blocks is None else blocks.reshape(B * T, J)
        mesh_axes = memory_axes()
        read = functools.partial(sharded_read_values, mesh_axes=mesh_axes) if mesh_axes else read_values
        with jax.named_scope("memory_read"):
            pooled = read(self.values_mu[...], rows, weights, blocks, m.virtual_blocks, impl=self.impl)
        pooled = pooled.astype(x.dtype).reshape(B, T, m.virtual_blocks, -1)  # [B,T,W,U]
        if self.w_gate_dwu is not None:
            pooled = pooled * jax.nn.silu(self.w_gate_dwu("BTD,DWU->BTWU", h))
        out = pooled[:, :, 0] if self.w_out_wud is None else self.w_out_wud("BTWU,WUD->BTD", pooled)
        loss = (
            tucker_aux_loss(self.cores_xnzy[...], m.aux_alpha, m.aux_tau)
            if m.tucker_rank
            else jnp.zeros((), jnp.float32)
        )
        return out, {"loss": loss}

    def update_state(self, aux: dict | None = None) -> None:
        """After an optimizer step: ``tucker_ref`` becomes the current cores' ``(u, v)``, aligned
        with the old reference (the paper's "sign-aligned with the previous step"). Works on a
        scanned run's stacked layer too (a leading layers axis on every variable)."""
        del aux
        if not self.mem.tucker_rank:
            return
        cores, ref = self.cores_xnzy[...], self.tucker_ref[...]
        align = leading_singular_vectors
        for _ in range(cores.ndim - 4):  # [L, X, N, Z, Y] in a scanned run
            align = jax.vmap(align)
        u, v = align(cores, ref)
        self.tucker_ref[...] = jnp.stack([u, v], axis=-2).astype(ref.dtype)


def check_width(d_model: int, cfg: MemoryConfig) -> None:
    """The value width ``U`` (``value_dim``, or ``d_model``) must split into one chunk per core,
    and a width other than ``d_model`` needs the output projection back to it."""
    width = cfg.width(d_model)
    if width % cfg.num_cores:
        fail(
            "MemoryConfig",
            "value_dim",
            width,
            f"must be divisible by num_cores={cfg.num_cores} (MCS splits a value row into one chunk "
            "per core); value_dim=None means d_model",
        )
    if width != d_model and not cfg.output_proj:
        fail(
            "MemoryConfig",
            "output_proj",
            False,
            f"must be True when the value width {width} differs from d_model={d_model}",
        )
