"""Mixture-of-experts FFN block: Mixtral (arXiv 2401.04088) and DeepSeek-V3 (arXiv 2412.19437).

``MoE(d_model, moe_cfg, rngs=...)(x [B,T,D]) -> (y [B,T,D], aux)``:

    l = u W_r                       router logits [B,T,E]                (float32)
    s, TopK = route(l, b)           affinities s_i, the k experts chosen on s_i + b_i   (moe_routing)
    g_i = s_i / Σ_{TopK} s_j · route_scale   (DeepSeek-V3; Mixtral: softmax over the k logits)
    y = Σ_{i∈TopK} g_i · FFN_i(u) + Σ_shared FFN_s(u)

Routed experts are SwiGLU FFNs stacked on an expert axis, ``w_gate_edf, w_up_edf [E,D,F]`` and
``w_down_efd [E,F,D]``; the shared experts are one SwiGLU of width ``num_shared_experts·F``. How the
routed experts are computed is ``MoEConfig.strategy`` (``moe_dispatch``), on one device or, under a
mesh, in a ``shard_map`` with the experts split over the ``expert`` axis (``moe_parallel``).

The bias ``b_i`` (DeepSeek-V3's ``e_score_correction_bias``) is an ``ExpertBias`` variable, not a
parameter: gradients never touch it (a train step splits it into the non-trainable ``rest``). With
``bias_update_rate`` γ > 0 the train step calls ``Transformer.update_state(aux)`` after the update,
which applies ``b_i += γ·sign(mean load − load_i)`` from the ``"load"`` this layer put in ``aux``.

``aux`` (stacked over a scanned run's layers): ``loss`` (the weighted balance, sequence-wise and
z-losses), ``load`` ``[E]`` (assignments per expert), ``dropped`` (assignments over capacity), and
``metrics`` (``expert_load`` fractions ``[E]``, ``load_ratio`` max/mean, ``dropped_fraction``).
Every token position counts, padding included: the layer does not see the loss mask.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from llmarch import axes, sharding
from llmarch.checks import check_layer
from llmarch.layers import moe_dispatch as dispatch
from llmarch.layers import moe_parallel
from llmarch.layers import moe_routing as routing
from llmarch.layers.configs import MoEConfig
from llmarch.layers.einsum import Einsum
from llmarch.layers.ffn import SwiGLU
from llmarch.layers.moe_dispatch import ExpertWeights


class ExpertBias(nnx.Variable):
    """Non-trainable router state: the per-expert bias ``b_i`` of auxiliary-loss-free balancing."""


class MoE(nnx.Module):
    """A routed-expert FFN (plus shared experts) of width ``d_model``, configured by a
    ``MoEConfig``; see the module doc."""

    def __init__(
        self,
        d_model: int,
        cfg: MoEConfig,
        *,
        rngs: nnx.Rngs,
        init_std: float = 0.02,
        param_dtype: jnp.dtype = jnp.float32,
        impl: str = "auto",
    ):
        check_layer("MoE", cfg, MoEConfig, d_model=d_model, init_std=init_std, param_dtype=param_dtype)
        m = cfg
        D, E, F = d_model, m.num_experts, m.expert_dim
        mesh, table = sharding.ambient()
        if not mesh.empty and table:  # fail before anything is placed on the mesh
            moe_parallel.check_experts_divide(m, mesh, table)
        self.moe, self.impl = m, impl
        init = nnx.initializers.normal(init_std)
        pd = jnp.dtype(param_dtype)
        self.w_router_de = Einsum((D, E), (axes.EMBED, None), rngs=rngs, init=init, param_dtype=pd)
        self.w_gate_edf = Einsum(
            (E, D, F), (axes.EXPERT, axes.EMBED, axes.MLP), rngs=rngs, init=init, param_dtype=pd
        )
        self.w_up_edf = Einsum(
            (E, D, F), (axes.EXPERT, axes.EMBED, axes.MLP), rngs=rngs, init=init, param_dtype=pd
        )
        self.w_down_efd = Einsum(
            (E, F, D), (axes.EXPERT, axes.MLP, axes.EMBED), rngs=rngs, init=init, param_dtype=pd
        )
        self.shared = (
            SwiGLU(D, m.shared_dim, rngs=rngs, init_std=init_std, param_dtype=pd)
            if m.num_shared_experts
            else None
        )
        self.bias_e = ExpertBias(jnp.zeros((E,), jnp.float32)) if m.router_bias else None

    def weights(self) -> ExpertWeights:
        # weight(): a quantized model's experts (llmarch.quant) are dequantized here, in the step
        return ExpertWeights(self.w_gate_edf.weight(), self.w_up_edf.weight(), self.w_down_efd.weight())

    def route(self, x: jax.Array, *, impl: str | None = None) -> routing.Routing:
        """The routing of ``x [B,T,D]``: experts and gates ``[B,T,k]``, all in float32; ``impl``
        (of the top-k selections, ``llmarch.ops.top_k``) overrides ``self.impl``."""
        w = self.w_router_de.w[...].astype(jnp.float32)
        logits = jnp.einsum("BTD,DE->BTE", x.astype(jnp.float32), w)  # l = u W_r
        bias = None if self.bias_e is None else self.bias_e[...]
        return routing.route(logits, bias, self.moe, impl=self.impl if impl is None else impl)

    def __call__(
        self, x: jax.Array, *, strategy: str | None = None, impl: str | None = None
    ) -> tuple[jax.Array, dict]:
        """``(y [B,T,D], aux)``; ``strategy`` overrides ``MoEConfig.strategy`` and ``impl`` (of the
        grouped matmuls and the routing's top-k) ``cfg.impl`` for this call."""
        m = self.moe
        impl = self.impl if impl is None else impl
        B, T, D = x.shape
        with jax.named_scope("router"):
            r = self.route(x, impl=impl)
        strategy = m.strategy if strategy is None else strategy
        with jax.named_scope("experts"):
            y, dropped = self.experts(
                x.reshape(B * T, D),
                r.experts.reshape(B * T, m.top_k),
                r.gates.reshape(B * T, m.top_k),
                strategy=strategy,
                impl=impl,
            )
        y = y.reshape(B, T, D)  # [B,T,D]
        if self.shared is not None:
            with jax.named_scope("shared_experts"):
                y = y + self.shared(x)
        return y, self._aux(r, dropped)

    def experts(
        self, x: jax.Array, experts: jax.Array, gates: jax.Array, *, strategy: str, impl: str | None = None
    ) -> tuple[jax.Array, jax.Array]:
        """``(Σ_k g·FFN_{e_k}(x) [n,D], dropped)`` for flat tokens ``x [n,D]`` and routing ``[n,k]``."""
        m, w = self.moe, self.weights()
        mesh, table = sharding.ambient()
        if strategy == "dense":
            return dispatch.dense_all_experts(x, experts, gates, w), jnp.zeros((), jnp.int32)
        if not mesh.empty and table:
            _, _, ep, shards = moe_parallel.layout(mesh, table)
            if ep > 1 or (shards > 1 and x.shape[0] % shards == 0):
                exchange = None if m.ep_exchange == "auto" else m.ep_exchange
                return moe_parallel.parallel_moe(
                    x,
                    experts,
                    gates,
                    w,
                    m,
                    strategy=strategy,
                    mesh=mesh,
                    table=table,
                    impl=impl,
                    exchange=exchange,
                )
        if strategy == "dropless":
            return dispatch.dropless(x, experts, gates, w, impl=impl), jnp.zeros((), jnp.int32)
        capacity = dispatch.capacity_of(x.shape[0], m.top_k, m.num_experts, m.capacity_factor)
        return dispatch.capacity_compute(x, experts, gates, w, capacity)

    def _aux(self, r: routing.Routing, dropped: jax.Array) -> dict:
        m = self.moe
        load = routing.expert_counts(r.experts, m.num_experts)  # c_i [E]
        loss = jnp.zeros((), jnp.float32)
        if m.aux_loss_coef:
            loss += m.aux_loss_coef * routing.balance_loss(r.experts, r.scores, m.num_experts)
        if m.seq_aux_loss_coef:
            loss += m.seq_aux_loss_coef * routing.sequence_balance_loss(r.experts, r.scores, m.num_experts)
        if m.z_loss_coef:
            loss += m.z_loss_coef * routing.router_z_loss(r.logits)
        total = r.experts.size
        return {
            "loss": loss,
            "load": load,
            "dropped": dropped,
            "metrics": {
                "expert_load": load / total,
                "load_ratio": routing.load_ratio(load),
                "dropped_fraction": dropped.astype(jnp.float32) / total,
            },
        }

    def update_state(self, aux: dict) -> None:
        """After a train step: ``b += γ·sign(mean load − load)`` from this layer's ``aux["load"]``
        (a scanned run's variables and aux both carry the layers axis)."""
        if self.bias_e is not None and self.moe.bias_update_rate > 0:
            self.bias_e.set_value(
                routing.updated_bias(self.bias_e[...], aux["load"], self.moe.bias_update_rate)
            )
