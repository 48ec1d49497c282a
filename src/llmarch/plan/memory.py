"""Per-device memory of a training layout: parameters, gradients, optimizer state, activations
(by remat policy and pipeline schedule), and the KV cache the same mesh would hold for serving.

Counts come from ``llmarch.accounting`` (parameters, KV bytes); what this module adds is how a
layout splits them and what training keeps alive:

- Weights: dense weights split over ``fsdp·tensor·stage``; routed experts also over ``expert``;
  the embedding and the LM head over ``fsdp·tensor`` on the stage that holds them. Gradients take
  the parameters' dtype and split; the optimizer keeps ``OPTIMIZER_STATES`` buffers of that dtype
  per parameter. Mixed precision (policy ``bf16``: float32 parameters, gradients, m and v) is
  ZeRO's 16 bytes per parameter (Rajbhandari et al. 2020, §3.1: 2+2+12 with a bf16 copy; here
  the same 16 as 4+4+8, the bf16 copy being transient).
- Activations: what the backward pass reads, counted per token per layer from the block's
  tensors (below), in the compute dtype, the head- and FFN-sized ones split over ``tensor``
  (Megatron without sequence parallelism: the ``D``-sized ones are replicated).
  ``none`` keeps them all; ``dots`` keeps matmul outputs and recomputes the elementwise ones
  (norms, the SwiGLU product); ``full`` keeps each layer's input only and rebuilds one layer's
  set at a time in the backward pass.
- Pipelining (Narayanan et al. 2021; Korthikanti et al. 2022 §4.2.3): the first stage holds the
  activations of m microbatches under GPipe, of min(m, p) under 1F1B, and of
  ``p·(1 + (p−1)/(p·v))`` under interleaved 1F1B with v virtual stages.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from llmarch import accounting
from llmarch.config import ModelConfig
from llmarch.plan.layout import OPTIMIZER_STATES, Layout, stage_layers
from llmarch.train.precision import policy


@dataclasses.dataclass(frozen=True)
class Memory:
    """Bytes per device (the busiest one: the first pipeline stage for activations)."""

    params: float
    grads: float
    optimizer: float
    activations: float  # saved for the backward pass, logits included
    kv_cache: float  # serving the layout's batch x seq_len from the same mesh (not in ``total``)
    kv_bytes_per_token: int  # all layers, the compute dtype, unsharded

    @property
    def total(self) -> float:
        """Training: parameters + gradients + optimizer state + activations."""
        return self.params + self.grads + self.optimizer + self.activations


@dataclasses.dataclass(frozen=True)
class ParamSplit:
    """The model's parameters by how a layout shards them (counts, not bytes)."""

    dense: int  # attention, norms, dense FFNs, routers, shared experts, MTP blocks' dense parts
    routed: int  # routed experts (MoE)
    embedding: int
    lm_head: int

    @property
    def total(self) -> int:
        return self.dense + self.routed + self.embedding + self.lm_head


def param_split(cfg: ModelConfig) -> ParamSplit:
    counts = accounting.param_counts(cfg)
    total = counts.total + accounting.mtp_param_counts(cfg).total  # MTP modules train too
    routed = 0
    if cfg.moe is not None:
        moe_blocks = sum(b.ffn == "moe" for b in cfg.layer_blocks)
        moe_blocks += cfg.mtp_depth if cfg.mtp_depth and cfg.mtp_block_config.ffn == "moe" else 0
        routed = moe_blocks * cfg.moe.num_experts * 3 * cfg.d_model * cfg.moe.expert_dim
    return ParamSplit(
        dense=total - routed - counts.embedding - counts.lm_head,
        routed=routed,
        embedding=counts.embedding,
        lm_head=counts.lm_head,
    )


def params_per_device(cfg: ModelConfig, layout: Layout) -> float:
    """Parameters one device holds: dense over fsdp·tensor·stage, routed experts also over
    expert; the embedding and head over fsdp·tensor, on the first and last stage."""
    m, split = layout.mesh, param_split(cfg)
    weights = m["fsdp"] * m["tensor"] * m["stage"]
    ends = split.embedding + split.lm_head if m["stage"] == 1 else max(split.embedding, split.lm_head)
    return split.dense / weights + split.routed / (weights * m["expert"]) + ends / (m["fsdp"] * m["tensor"])


def _split(n: int, ways: int) -> float:
    """A head- or width-sized tensor under tensor parallelism: split when ``ways`` divides it."""
    return n / ways if n % ways == 0 else float(n)


def _attention_elements(cfg: ModelConfig, kind: str, tp: int, remat: str) -> float:
    """Elements the attention half of a block saves per token (flash attention: no S² scores;
    its float32 log-sum-exp counts as two elements per head)."""
    D = cfg.d_model
    if kind == "mha":
        a = cfg.attention
        matmul_outputs = 2 * _split(a.num_heads * a.head_dim, tp) + 2 * _split(
            a.num_kv_heads * a.head_dim, tp
        )
        elementwise = D  # the norm's output (q, k, v, out are matmul or attention outputs)
        heads = a.num_heads
    elif kind == "mla":
        a = cfg.mla
        qk = a.qk_nope_head_dim + a.qk_rope_head_dim
        latents = (a.q_lora_rank or 0) + a.kv_lora_rank + a.qk_rope_head_dim  # c_q, c_KV, k_R
        matmul_outputs = latents + _split(a.num_heads * (2 * qk + 2 * a.v_head_dim), tp)  # q, k, v, out
        elementwise = D + (a.q_lora_rank or 0) + a.kv_lora_rank  # the three norms' outputs
        heads = a.num_heads
    else:
        raise ValueError(f"plan: attention kind {kind!r} has no activation model; supported: mha, mla")
    saved = D + matmul_outputs + 2 * heads / tp + elementwise  # the block input, ..., the lse
    return saved - (elementwise if remat == "dots" else 0)


def _ffn_elements(cfg: ModelConfig, kind: str, tp: int, remat: str) -> float:
    D = cfg.d_model
    if kind == "swiglu":
        width = _split(cfg.ffn_dim, tp)
        saved, elementwise = 2 * D + 3 * width, D + width  # x, norm(x), gate, up, silu(gate)*up
    elif kind == "moe":
        m = cfg.moe
        routed = m.top_k * (2 * D + 3 * _split(m.expert_dim, tp))  # each copy: in, out, gate, up, h
        shared = 3 * _split(m.shared_dim, tp) if m.shared_dim else 0
        saved = 2 * D + 2 * m.num_experts + routed + shared  # + float32 router scores
        elementwise = D + m.top_k * _split(m.expert_dim, tp) + shared / 3
    else:
        raise ValueError(f"plan: ffn kind {kind!r} has no activation model; supported: swiglu, moe")
    return saved - (elementwise if remat == "dots" else 0)


def layer_elements(cfg: ModelConfig, tp: int, remat: str) -> list[float]:
    """Per block: elements saved per token under ``remat`` ('none' or 'dots') and ``tp``."""
    return [
        _attention_elements(cfg, b.attention, tp, remat) + _ffn_elements(cfg, b.ffn, tp, remat)
        for b in cfg.layer_blocks
    ]


def microbatches_in_flight(layout: Layout) -> float:
    """Microbatches whose activations the first stage holds at the peak (module docstring)."""
    p, m, v = layout.stages, layout.microbatches, layout.virtual_stages
    if p == 1 or layout.schedule == "gpipe":
        return float(m)
    held = min(m, p)
    if layout.schedule == "interleaved":
        held = min(float(m), p * (1 + (p - 1) / (p * v)))
    return float(held)


def activation_bytes(cfg: ModelConfig, layout: Layout) -> float:
    """Activations one device keeps for its backward pass (the first stage under pipelining),
    plus the logits and their gradient for one microbatch, which the last stage holds: added to
    the first stage's, an upper bound for either."""
    prec = policy(layout.precision)
    nbytes = jnp.dtype(prec.compute_dtype).itemsize
    tp = layout.mesh["tensor"]
    tokens = layout.tokens_per_device / layout.microbatches  # one microbatch on this device
    per_layer = layer_elements(cfg, tp, "dots" if layout.remat == "dots" else "none")
    first = per_layer[: stage_layers(cfg, layout)]  # the first stage's blocks
    if layout.remat == "full":
        kept = len(first) * cfg.d_model + max(first)  # the inputs + one layer rebuilt
    else:
        kept = sum(first)
    blocks = kept * tokens * nbytes * microbatches_in_flight(layout)
    out = jnp.dtype(prec.output_dtype).itemsize
    logits = tokens * _split(cfg.vocab_size, tp) * (out + 4)  # the logits and a float32 gradient
    return blocks + logits


def kv_cache_bytes(cfg: ModelConfig, layout: Layout) -> tuple[float, int]:
    """``(bytes per device, bytes per token)``: the cache for ``batch`` sequences of ``seq_len``
    tokens in the compute dtype, split as the serving rules split it (sequences over the batch
    axes, layers over stage, KV heads over tensor when it divides them; MLA's latent has no head
    axis and is replicated over tensor)."""
    dtype = policy(layout.precision).compute_dtype
    per_token = accounting.kv_cache_bytes_per_token(cfg, dtype)
    heads = cfg.attention.num_kv_heads if all(b.attention == "mha" for b in cfg.layer_blocks) else 0
    tp = layout.mesh["tensor"] if heads and heads % layout.mesh["tensor"] == 0 else 1
    ways = layout.replicas * layout.stages * layout.mesh["context"] * tp
    return per_token * layout.tokens / ways, per_token


def memory(cfg: ModelConfig, layout: Layout) -> Memory:
    """The per-device memory of training ``cfg`` with ``layout`` (see the module docstring)."""
    prec = policy(layout.precision)
    pbytes = jnp.dtype(prec.param_dtype).itemsize
    params = params_per_device(cfg, layout)
    kv, per_token = kv_cache_bytes(cfg, layout)
    return Memory(
        params=params * pbytes,
        grads=params * pbytes,
        optimizer=params * pbytes * OPTIMIZER_STATES[layout.optimizer],
        activations=activation_bytes(cfg, layout),
        kv_cache=kv,
        kv_bytes_per_token=per_token,
    )
