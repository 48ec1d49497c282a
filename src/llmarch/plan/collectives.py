"""The collectives one training step of a layout issues, each with its bytes, its mesh axis, the
link that axis sits on and the time it takes there.

Costs are the ring algorithm's (Patarasuk & Yuan 2009; Thakur et al. 2005), for ``V`` bytes per
device (the full operand: the gathered array for an all-gather, the unreduced one for a
reduce-scatter) over ``n`` devices at ``B`` bytes/s one way per device:

  all-reduce       2·(n−1)/n · V / B   (a reduce-scatter, then an all-gather)
  all-gather       (n−1)/n · V / B
  reduce-scatter   (n−1)/n · V / B
  all-to-all       (n−1)/n · V / B through a switch (every pair has its own path); on a torus ring
                   the average message travels n/4 hops each way, so max((n−1)/n, n/4) · V / B
  send (ppermute)  V / B

``B`` is the fast link (``Hardware.fast_link`` times ``fast_links_per_axis``: a torus axis is a
bidirectional ring) when the axis fits in a fast domain (``layout.axis_links``), else the slow
one (DCN, InfiniBand). What is counted per step:

- ``data``: the gradients' all-reduce (over the shard each device keeps after FSDP); ``expert``
  carries batch too, so the dense gradients are also all-reduced over it.
- ``fsdp`` (ZeRO-3): the weights all-gathered in the compute dtype before the forward and again
  before the backward (a full-remat recompute reuses the backward's), the gradients
  reduce-scattered once.
- ``tensor`` (Megatron): 2 all-reduces of the ``[tokens, D]`` activations per block forward and
  2 backward (+2 when ``remat='full'`` repeats the forward).
- ``expert``: a dispatch and a combine all-to-all of ``top_k`` copies per token per MoE block,
  forward and backward (+2 with full remat).
- ``stage``: each microbatch's activations sent forward and their gradient back, at every chunk
  boundary (``virtual_stages`` of them per device).
- ``context``: ring attention passes K and V around the ring once forward, K, V and their
  gradients once backward.

Data, FSDP, pipeline and ring-attention traffic is issued asynchronously beside compute (XLA's
async collectives; 1F1B's sends between microbatches; the ring's overlap) and counted as
overlapped; tensor- and expert-parallel traffic sits between a block's matmuls and is exposed
(unless collective matmul or COMET-style overlap hides it, which the planner does not assume).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from llmarch.config import ModelConfig
from llmarch.plan.hardware import Hardware
from llmarch.plan.layout import Layout, axis_links, stage_layers
from llmarch.plan.memory import param_split, params_per_device
from llmarch.train.precision import policy

OPS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "send")


def wire_factor(op: str, n: int, *, torus: bool) -> float:
    """Bytes each device moves per operand byte, by the ring algorithm (module docstring)."""
    if op == "all-reduce":
        return 2 * (n - 1) / n
    if op in ("all-gather", "reduce-scatter"):
        return (n - 1) / n
    if op == "all-to-all":
        return max((n - 1) / n, n / 4) if torus else (n - 1) / n
    if op == "send":
        return 1.0
    raise ValueError(f"op={op!r} is unknown; allowed: {OPS}")


@dataclasses.dataclass(frozen=True)
class Collective:
    what: str  # e.g. "gradients", "weights (fwd+bwd)"
    axis: str
    op: str
    n: int  # devices along the axis
    operand_bytes: float  # V summed over the step's calls
    link: str  # ICI, DCN, NVLink, InfiniBand
    bandwidth: float  # bytes/s one way per device on that link
    overlapped: bool
    torus: bool

    @property
    def wire_bytes(self) -> float:
        return wire_factor(self.op, self.n, torus=self.torus) * self.operand_bytes

    @property
    def seconds(self) -> float:
        return self.wire_bytes / self.bandwidth


def collectives(cfg: ModelConfig, layout: Layout, hw: Hardware) -> list[Collective]:
    """Every collective of one step of ``layout`` on ``hw`` with an axis of size > 1."""
    m = layout.mesh
    prec = policy(layout.precision)
    cb = jnp.dtype(prec.compute_dtype).itemsize
    gb = jnp.dtype(prec.param_dtype).itemsize  # gradients are reduced in the parameters' dtype
    fast = axis_links(layout, hw.fast_domain)
    params = params_per_device(cfg, layout)
    routed = param_split(cfg).routed / (m["fsdp"] * m["tensor"] * m["stage"] * m["expert"])
    tokens = layout.tokens_per_device
    layers = stage_layers(cfg, layout)  # the busiest stage's
    moe_layers = -(-sum(b.ffn == "moe" for b in cfg.layer_blocks) // layout.stages)
    again = 1 if layout.remat == "full" else 0  # the forward's collectives repeat in the recompute
    found: list[Collective] = []

    def add(what: str, axis: str, op: str, nbytes: float, overlapped: bool) -> None:
        n = m[axis]
        if n > 1 and nbytes > 0:
            link = hw.fast_name if fast[axis] else hw.slow_name
            bandwidth = hw.fast_link * hw.fast_links_per_axis if fast[axis] else hw.slow_link
            torus = hw.torus and fast[axis]
            found.append(Collective(what, axis, op, n, nbytes, link, bandwidth, overlapped, torus))

    add("gradients", "data", "all-reduce", params * gb, True)
    add("dense gradients", "expert", "all-reduce", (params - routed) * gb, True)
    add("weights (fwd+bwd)", "fsdp", "all-gather", 2 * params * m["fsdp"] * cb, True)
    add("gradients", "fsdp", "reduce-scatter", params * m["fsdp"] * gb, True)
    activations = tokens * cfg.d_model * cb  # one [tokens, D] per device
    add("block outputs", "tensor", "all-reduce", (4 + 2 * again) * layers * activations, False)
    if cfg.moe is not None:
        copies = activations * cfg.moe.top_k
        add("dispatch+combine", "expert", "all-to-all", (4 + 2 * again) * moe_layers * copies, False)
    add("stage boundaries", "stage", "send", 2 * layout.virtual_stages * activations, True)
    if m["context"] > 1:
        if cfg.mla is not None:
            a = cfg.mla
            kv = a.num_heads * (a.qk_nope_head_dim + a.qk_rope_head_dim + a.v_head_dim)
        else:
            kv = 2 * cfg.attention.num_kv_heads * cfg.attention.head_dim
        ring = (m["context"] - 1) * tokens * kv * cb * layers
        add("K/V ring (fwd+bwd)", "context", "send", 3 * ring, True)  # K,V fwd; K,V and dK,dV bwd
    return found
