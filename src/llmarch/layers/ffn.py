"""The SwiGLU feed-forward block (Shazeer 2020), as in Llama.

With ``collective_matmul=True`` under a mesh whose rules split ``mlp`` over a mesh axis of size
``n > 1`` (tensor parallelism), the block runs as one ``shard_map`` in Megatron's sequence-parallel
pattern, its communication decomposed into rings that overlap the matmuls
(``llmarch.collective_matmul``): the input's sequence split ``n`` ways, ``all_gather_matmul`` for
gate and up (``[B,T/n,D] -> [B,T,F/n]``), ``silu(gate)·up``, then ``matmul_reduce_scatter`` for
down (``[B,T,F/n] -> [B,T/n,D]``); the output leaves sequence-split. Without such a mesh the
switch changes nothing, so one config runs on one device and on a mesh.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec

from llmarch import axes, sharding
from llmarch import collective_matmul as cm
from llmarch.checks import check_layer
from llmarch.layers.einsum import Einsum, apply_shared


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
        collective_matmul: bool = False,
    ):
        check_layer(
            "SwiGLU", None, d_model=d_model, hidden=hidden, init_std=init_std, param_dtype=param_dtype
        )
        if not isinstance(collective_matmul, bool):
            raise TypeError(f"SwiGLU collective_matmul={collective_matmul!r} is invalid: must be a bool")
        self.collective_matmul = collective_matmul  # static: in the graphdef
        D, F = d_model, hidden
        init = nnx.initializers.normal(init_std)
        pd = jnp.dtype(param_dtype)
        self.w_gate_df = Einsum((D, F), (axes.EMBED, axes.MLP), rngs=rngs, init=init, param_dtype=pd)
        self.w_up_df = Einsum((D, F), (axes.EMBED, axes.MLP), rngs=rngs, init=init, param_dtype=pd)
        self.w_down_fd = Einsum((F, D), (axes.MLP, axes.EMBED), rngs=rngs, init=init, param_dtype=pd)

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.collective_matmul and (axis := cm.ring_axis("SwiGLU", axes.MLP)) is not None:
            return self._collective(x, axis)
        gate, up = apply_shared(x, [(self.w_gate_df, "BTD,DF->BTF"), (self.w_up_df, "BTD,DF->BTF")])
        return self.w_down_fd("BTF,FD->BTD", jax.nn.silu(gate) * up)

    def _collective(self, x: jax.Array, axis: str) -> jax.Array:
        """The sequence-parallel block over mesh axis ``axis`` (see the module docstring)."""
        cm.check_sequence("SwiGLU", axis, x.shape[1])
        layers = {"w_gate_df": self.w_gate_df, "w_up_df": self.w_up_df, "w_down_fd": self.w_down_fd}
        cm.check_plain("SwiGLU", layers)
        batch = sharding.batch_axes(x.shape[0], axis)
        seq = PartitionSpec(batch or None, axis)  # [B,T,D]: T split n ways
        w_gate, w_up, w_down = (layer.w[...].astype(x.dtype) for layer in layers.values())

        def block(x, w_gate, w_up, w_down):  # x [B,T/n,D]; w_gate, w_up [D,F/n]; w_down [F/n,D]
            gate, up = cm.all_gather_matmul(x, (w_gate, w_up), axis, eqn="BTD,DF->BTF")  # [B,T,F/n]
            return cm.matmul_reduce_scatter(jax.nn.silu(gate) * up, w_down, axis, eqn="BTF,FD->BTD")

        run = jax.shard_map(
            block,
            in_specs=(seq, PartitionSpec(None, axis), PartitionSpec(None, axis), PartitionSpec(axis)),
            out_specs=seq,
            axis_names={axis, *batch},
        )
        # The residual stream's layout on both sides: otherwise XLA propagates the ring's sequence
        # split into the attention around it, and in the backward pass gathers attention's weights.
        x = sharding.constrain(x, cm.RESIDUAL)
        return sharding.constrain(run(x, w_gate, w_up, w_down), cm.RESIDUAL)
