"""The SwiGLU feed-forward block (Shazeer 2020), as in Llama."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from llmarch import axes
from llmarch.checks import check_layer
from llmarch.layers.einsum import Einsum


class SwiGLU(nnx.Module):
    """``down(silu(x W_gate) * (x W_up))`` with ``W_gate, W_up [D,F]`` and ``W_down [F,D]``."""

    def __init__(
        self,
        d_model: int,
        hidden: int,
        *,
        rngs: nnx.Rngs,
        init_std: float = 0.02,
        param_dtype: jnp.dtype = jnp.float32,
    ):
        check_layer(
            "SwiGLU", None, d_model=d_model, hidden=hidden, init_std=init_std, param_dtype=param_dtype
        )
        D, F = d_model, hidden
        init = nnx.initializers.normal(init_std)
        pd = jnp.dtype(param_dtype)
        self.w_gate_df = Einsum((D, F), (axes.EMBED, axes.MLP), rngs=rngs, init=init, param_dtype=pd)
        self.w_up_df = Einsum((D, F), (axes.EMBED, axes.MLP), rngs=rngs, init=init, param_dtype=pd)
        self.w_down_fd = Einsum((F, D), (axes.MLP, axes.EMBED), rngs=rngs, init=init, param_dtype=pd)

    def __call__(self, x: jax.Array) -> jax.Array:
        gate = self.w_gate_df("BTD,DF->BTF", x)
        up = self.w_up_df("BTD,DF->BTF", x)
        return self.w_down_fd("BTF,FD->BTD", jax.nn.silu(gate) * up)
