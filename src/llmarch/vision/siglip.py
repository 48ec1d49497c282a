"""SigLIP's vision tower (Zhai et al. 2023, "Sigmoid Loss for Language Image Pre-Training"), a ViT.

``pixel_values [B,C,image,image]`` -> non-overlapping patches ``[B,T,O]`` -> ``+ pos [T,D]`` ->
``num_layers`` pre-LayerNorm blocks (bidirectional MHA, GELU MLP, biases everywhere) -> final
LayerNorm = ``last_hidden_state [B,T,D]``; optionally the MAP head pools it to ``[B,D]``.

The patch embedding is HF's ``Conv2d(kernel=stride=patch)`` written as what it is, one einsum over
flattened patches: ``"BTO,OD->BTD"`` with ``O = C*p*p`` in the conv weight's (channel, row, column)
order. The encoder's layers are stacked on a leading ``layers`` axis and run with ``jax.lax.scan``,
as ``llmarch.model`` stacks decoder blocks, so compile time stays flat in depth (SigLIP-so400m has 27).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from llmarch import axes, ops, sharding
from llmarch.layers.einsum import Einsum, param
from llmarch.layers.norms import LayerNorm
from llmarch.vision.config import VisionConfig

_ACTIVATION = (axes.BATCH, axes.SEQ, axes.ACT_EMBED)


class VisionOutput(NamedTuple):
    """``last_hidden_state [B,T,D]`` (after the final LayerNorm); ``pooled [B,D]`` when the config
    has the head; ``hidden_states [L+1,B,T,D]`` when asked for: the embeddings, then each block's
    output before the final LayerNorm, as HF's ``output_hidden_states`` (LLaVA reads layer -2)."""

    last_hidden_state: jax.Array
    pooled: jax.Array | None = None
    hidden_states: jax.Array | None = None


def patchify(pixels: jax.Array, patch: int) -> jax.Array:
    """``[B,C,H,W]`` -> ``[B,T,O]``: patches in row-major grid order (HF's ``flatten(2)`` of the conv
    output), each flattened as (channel, row, column), the order of the conv weight's ``[C,p,p]``."""
    B, C, height, width = pixels.shape
    gh, gw = height // patch, width // patch
    x = pixels.reshape(B, C, gh, patch, gw, patch)  # [B,C,gh,p,gw,p]
    x = x.transpose(0, 2, 4, 1, 3, 5)  # [B,gh,gw,C,p,p]
    return x.reshape(B, gh * gw, C * patch * patch)  # [B,T,O]


def check_pixels(pixel_values, cfg: VisionConfig) -> None:
    """One-line ValueError for input the tower cannot take; shapes are static, so this runs while
    tracing, before anything compiles."""
    s, c = cfg.image_size, cfg.num_channels
    want = f"must be [B, C, H, W] = [B, {c}, {s}, {s}] floats"
    shape = tuple(getattr(pixel_values, "shape", ()))
    if len(shape) != 4:
        raise ValueError(f"pixel_values has shape {shape} (rank {len(shape)}): {want}")
    if shape[1] != c:
        raise ValueError(f"pixel_values has {shape[1]} channels (shape {shape}): {want}")
    if shape[2:] != (s, s):
        raise ValueError(f"pixel_values is {shape[2]}x{shape[3]} pixels (shape {shape}): {want}")
    if not jnp.issubdtype(pixel_values.dtype, jnp.floating):
        raise ValueError(f"pixel_values has dtype {pixel_values.dtype}: {want}")


def _zeros(shape: tuple[int, ...], names: tuple[str | None, ...], dtype: jnp.dtype) -> nnx.Param:
    return param(jnp.zeros(shape, dtype), names)


class MultiHeadAttention(nnx.Module):
    """Bidirectional MHA with biases: ``w_q_dnh, w_k_dnh, w_v_dnh [D,N,H]`` (+ ``b_*_nh [N,H]``),
    ``w_o_nhd [N,H,D]`` (+ ``b_o_d``). Queries and keys may come from different sequences (the
    MAP head's probe attends over the patches)."""

    def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs, impl: str | None = None):
        D, N, H = cfg.hidden_size, cfg.num_heads, cfg.head_dim
        pd, init = jnp.dtype(cfg.param_dtype), nnx.initializers.normal(cfg.init_std)
        dnh, nh = (axes.EMBED, axes.HEADS, axes.HEAD_DIM), (axes.HEADS, axes.HEAD_DIM)
        self.w_q_dnh = Einsum((D, N, H), dnh, rngs=rngs, init=init, param_dtype=pd)
        self.b_q_nh = _zeros((N, H), nh, pd)
        self.w_k_dnh = Einsum((D, N, H), dnh, rngs=rngs, init=init, param_dtype=pd)
        self.b_k_nh = _zeros((N, H), nh, pd)
        self.w_v_dnh = Einsum((D, N, H), dnh, rngs=rngs, init=init, param_dtype=pd)
        self.b_v_nh = _zeros((N, H), nh, pd)
        self.w_o_nhd = Einsum(
            (N, H, D), (axes.HEADS, axes.HEAD_DIM, axes.EMBED), rngs=rngs, init=init, param_dtype=pd
        )
        self.b_o_d = _zeros((D,), (axes.EMBED,), pd)
        self.impl = cfg.impl if impl is None else impl

    def __call__(self, x: jax.Array, kv: jax.Array) -> jax.Array:
        """Queries from ``x [B,T,D]`` attend over every position of ``kv [B,S,D]``: ``[B,T,D]``."""
        dt = x.dtype
        q = self.w_q_dnh("BTD,DNH->BTNH", x) + self.b_q_nh[...].astype(dt)
        k = self.w_k_dnh("BSD,DNH->BSNH", kv) + self.b_k_nh[...].astype(dt)
        v = self.w_v_dnh("BSD,DNH->BSNH", kv) + self.b_v_nh[...].astype(dt)
        (B, T), S = x.shape[:2], kv.shape[1]
        out = ops.attention(
            q,
            k,
            v,
            impl=self.impl,
            q_positions=jnp.zeros((B, T), jnp.int32),  # positions only matter for causal masks
            kv_positions=jnp.zeros((B, S), jnp.int32),
            causal=False,
        )  # [B,T,N,H]
        return self.w_o_nhd("BTNH,NHD->BTD", out) + self.b_o_d[...].astype(dt)


class MLP(nnx.Module):
    """``fc2(gelu(fc1(x)))`` with biases: ``w_up_df [D,F]``, ``w_down_fd [F,D]`` (HF fc1, fc2)."""

    def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs):
        D, F = cfg.hidden_size, cfg.intermediate_size
        pd, init = jnp.dtype(cfg.param_dtype), nnx.initializers.normal(cfg.init_std)
        self.w_up_df = Einsum((D, F), (axes.EMBED, axes.MLP), rngs=rngs, init=init, param_dtype=pd)
        self.b_up_f = _zeros((F,), (axes.MLP,), pd)
        self.w_down_fd = Einsum((F, D), (axes.MLP, axes.EMBED), rngs=rngs, init=init, param_dtype=pd)
        self.b_down_d = _zeros((D,), (axes.EMBED,), pd)
        self.tanh = cfg.activation == "gelu_pytorch_tanh"

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.w_up_df("BTD,DF->BTF", x) + self.b_up_f[...].astype(x.dtype)
        h = jax.nn.gelu(h, approximate=self.tanh)
        return self.w_down_fd("BTF,FD->BTD", h) + self.b_down_d[...].astype(x.dtype)


def _norm(cfg: VisionConfig) -> LayerNorm:
    pd = jnp.dtype(cfg.param_dtype)
    return LayerNorm(cfg.hidden_size, scale_init=1.0, eps=cfg.layer_norm_eps, param_dtype=pd)


class EncoderBlock(nnx.Module):
    """Pre-LayerNorm residual block: ``x + attn(ln(x))``, then ``x + mlp(ln(x))``."""

    def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs):
        self.attn_norm, self.attn = _norm(cfg), MultiHeadAttention(cfg, rngs=rngs)
        self.mlp_norm, self.mlp = _norm(cfg), MLP(cfg, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        with jax.named_scope("attention"):
            h = self.attn_norm(x).astype(x.dtype)  # LayerNorm computes (and returns) float32
            x = x + self.attn(h, h)
        with jax.named_scope("mlp"):
            x = x + self.mlp(self.mlp_norm(x).astype(x.dtype))
        return sharding.constrain(x, _ACTIVATION)


class Encoder(nnx.Module):
    """``num_layers`` EncoderBlocks whose parameters are stacked on a leading ``layers`` axis
    (initialized with one ``jax.vmap``, as ``llmarch.model.BlockRun`` does) and scanned."""

    def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs):
        def init_one(key: jax.Array) -> nnx.State:
            with nnx.use_eager_sharding(False):
                return nnx.state(EncoderBlock(cfg, rngs=nnx.Rngs(params=key)))

        stacked = jax.vmap(init_one)(jax.random.split(rngs.params(), cfg.num_layers))
        eager = nnx.using_eager_sharding()

        def add_layer_axis(var: nnx.Variable) -> nnx.Variable:
            names = var.get_metadata().get("out_sharding")
            if names:
                var.set_metadata(out_sharding=(axes.LAYERS, *names))
            var.set_metadata(eager_sharding=eager)
            return var

        stacked = jax.tree.map(add_layer_axis, stacked, is_leaf=lambda x: isinstance(x, nnx.Variable))
        mesh, table = sharding.ambient()
        if not mesh.empty and table and eager:  # born sharded, like flax's eager variables
            stacked = sharding.constrain_state(stacked, mesh, table)
        graphdef = nnx.graphdef(nnx.eval_shape(lambda: _unsharded_block(cfg)))
        self.layers = nnx.merge(graphdef, stacked)  # an EncoderBlock whose every variable has an L axis

    def __call__(self, x: jax.Array, *, keep: bool = False) -> tuple[jax.Array, jax.Array | None]:
        """``(x [B,T,D], [L,B,T,D] each block's output when keep else None)``."""
        graphdef, state = nnx.split(self.layers)

        def body(x, layer_state):
            x = nnx.merge(graphdef, layer_state)(x)
            return x, (x if keep else None)

        return jax.lax.scan(body, x, state)


def _unsharded_block(cfg: VisionConfig) -> EncoderBlock:
    with nnx.use_eager_sharding(False):
        return EncoderBlock(cfg, rngs=nnx.Rngs(0))


class MAPHead(nnx.Module):
    """Multihead attention pooling: a learned ``probe_d [D]`` attends over the tokens, then
    ``h + mlp(ln(h))``; one vector per image. Always XLA attention: one query row tiles no kernel."""

    def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs):
        pd, D = jnp.dtype(cfg.param_dtype), cfg.hidden_size
        self.probe_d = param(nnx.initializers.normal(1.0)(rngs.params(), (D,), pd), (axes.EMBED,))
        self.attn = MultiHeadAttention(cfg, rngs=rngs, impl="xla")
        self.norm, self.mlp = _norm(cfg), MLP(cfg, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x [B,T,D]`` -> ``[B,D]``."""
        probe = jnp.broadcast_to(self.probe_d[...].astype(x.dtype), (x.shape[0], 1, x.shape[2]))  # [B,1,D]
        h = self.attn(probe, x)  # [B,1,D]
        h = h + self.mlp(self.norm(h).astype(h.dtype))
        return h[:, 0]


class SiglipVision(nnx.Module):
    """The tower: ``w_patch_od [O,D]`` + ``b_patch_d``, ``pos_td [T,D]``, ``encoder`` (stacked blocks),
    ``final_norm``, and ``head`` (a MAPHead, or None without ``cfg.use_head``)."""

    def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs):
        if not isinstance(cfg, VisionConfig):
            raise ValueError(f"SiglipVision.cfg={type(cfg).__name__} is invalid: must be a VisionConfig")
        self.cfg = cfg
        O, D, T = cfg.patch_dim, cfg.hidden_size, cfg.num_patches
        pd, init = jnp.dtype(cfg.param_dtype), nnx.initializers.normal(cfg.init_std)
        self.w_patch_od = Einsum((O, D), (None, axes.EMBED), rngs=rngs, init=init, param_dtype=pd)
        self.b_patch_d = _zeros((D,), (axes.EMBED,), pd)
        self.pos_td = param(init(rngs.params(), (T, D), pd), (None, axes.EMBED))
        self.encoder = Encoder(cfg, rngs=rngs)
        self.final_norm = _norm(cfg)
        self.head = MAPHead(cfg, rngs=rngs) if cfg.use_head else None

    def __call__(self, pixel_values: jax.Array, *, hidden_states: bool = False) -> VisionOutput:
        """Encodes ``pixel_values [B,C,H,W]`` (as HF's image processor makes them; any float dtype,
        cast to ``cfg.dtype``). ``hidden_states``: also return every layer's input/output."""
        check_pixels(pixel_values, self.cfg)
        dt = jnp.dtype(self.cfg.dtype)
        with jax.named_scope("patch_embed"):
            x = patchify(pixel_values.astype(dt), self.cfg.patch_size)  # [B,T,O]
            x = (
                self.w_patch_od("BTO,OD->BTD", x)
                + self.b_patch_d[...].astype(dt)
                + self.pos_td[...].astype(dt)
            )
            x = sharding.constrain(x, _ACTIVATION)
        y, per_layer = self.encoder(x, keep=hidden_states)
        out = self.final_norm(y).astype(dt)  # [B,T,D]
        pooled = None
        if self.head is not None:
            with jax.named_scope("map_head"):
                pooled = self.head(out)  # [B,D]
        stack = jnp.concatenate([x[None], per_layer]) if hidden_states else None  # [L+1,B,T,D]
        return VisionOutput(out, pooled, stack)
