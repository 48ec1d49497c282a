"""The block-kind registry: each attention, FFN and skip-layer kind declared once, by name.

A ``BlockConfig`` names its attention and FFN kinds (``"mha"``, ``"moe"``, ...), and
``ModelConfig.skip_kind`` the module of its skip-layer spans. Everything that depends on a kind
reads its record here and nowhere else: ``config`` (which names exist, which sub-config a kind
needs, cross-field checks), ``model`` (how to build the layer from a ``ModelConfig``, how to make
its decoding cache), ``inference.paged_cache`` (its paged cache), ``accounting`` (parameters,
FLOPs, KV-cache elements, decode traffic), and ``hf`` (which Hugging Face tables map it). So a new
kind is one record passed to ``register_attention``/``register_ffn``/``register_skip``, and a name
that was never registered is a clear ``ValueError`` everywhere.

The aux contract: a module whose kind declares ``aux`` keys returns ``(out, aux)`` with exactly
those keys (``"loss"`` joins the training objective, ``"metrics"`` is logged, anything else is for
its own ``update_state``); a kind with no ``aux`` returns ``out`` alone. ``model`` checks it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import jax.numpy as jnp
from flax import nnx

from llmarch.layers.attention import Attention
from llmarch.layers.configs import AttentionConfig, MemoryConfig, MLAConfig, MoEConfig
from llmarch.layers.ffn import SwiGLU
from llmarch.layers.memory import MemoryLayer, check_width
from llmarch.layers.mla import MLA
from llmarch.layers.moe import MoE
from llmarch.layers.paged import PagedKVCache, PagedLatentCache

if TYPE_CHECKING:  # annotations only: config imports this module
    from llmarch.config import ModelConfig

Builder = Callable[["ModelConfig", nnx.Rngs], nnx.Module]


@dataclasses.dataclass(frozen=True)
class AttentionKind:
    """An attention kind: ``module(x [B,T,D], positions, segment_ids, cache) -> (out, cache)``.

    Attributes:
      name: the ``BlockConfig.attention`` value.
      config_field: the ``ModelConfig`` field holding its sub-config, of type ``config_type``.
      build: ``(cfg, rngs) -> module``, translating the ``ModelConfig`` into the layer's arguments.
      init_cache: ``(cfg, batch, max_len, dtype) -> cache``: one layer's empty contiguous cache.
      params: ``cfg -> int``: one layer's parameters.
      score_flops: ``(cfg, keys) -> float``: one layer's training FLOPs per token for the scores
        and the weighted sum over ``keys`` visible keys (the ``12·N·H·S`` of PaLM's appendix B).
      kv_elements: ``cfg -> int``: numbers one layer's cache holds per token.
      paged_cache: the class of its paged cache (``empty(cfg, layers, num_pages, page_size, dtype)``
        and ``cls(*pools, meta=, layer=)``), or None when the engine cannot serve it paged.
    """

    name: str
    config_field: str
    config_type: type
    build: Builder
    init_cache: Callable[..., Any]
    params: Callable[[ModelConfig], int]
    score_flops: Callable[[ModelConfig, float], float]
    kv_elements: Callable[[ModelConfig], int]
    paged_cache: type | None = None

    def __post_init__(self):
        _check_record(self, ("build", "init_cache", "params", "score_flops", "kv_elements"))


@dataclasses.dataclass(frozen=True)
class FFNKind:
    """An FFN or skip-layer kind: ``module(x [B,T,D]) -> out [B,T,D]`` or ``(out, aux)``.

    Attributes:
      name: the ``BlockConfig.ffn`` (or ``ModelConfig.skip_kind``) value.
      build: ``(cfg, rngs) -> module``.
      params: ``(cfg, active) -> int``: one module's parameters; ``active``: only those one token
        uses (an MoE's k routed experts, a memory layer's read value rows).
      config_field, config_type: the ``ModelConfig`` sub-config it needs (None: only the model's
        own fields, e.g. ``ffn_dim``).
      counted_as: the ``accounting.ParamCounts`` field it adds to: ``"ffn"`` or ``"memory"``.
      decode_traffic: ``(cfg, batch) -> (dense, sparse)`` numbers one decode step of ``batch``
        tokens reads: weights read whatever the batch, and the expected share of sparse weights
        (experts, value rows) the batch touches. None: ``(params(cfg, False), 0)``.
      aux: the keys of the aux dict the module returns (empty: it returns ``out`` alone).
      check: ``cfg -> None``, raising ValueError for cross-field settings the kind cannot take.
    """

    name: str
    build: Builder
    params: Callable[[ModelConfig, bool], int]
    config_field: str | None = None
    config_type: type | None = None
    counted_as: str = "ffn"
    decode_traffic: Callable[[ModelConfig, int], tuple[float, float]] | None = None
    aux: frozenset[str] = frozenset()
    check: Callable[[ModelConfig], None] | None = None

    def __post_init__(self):
        _check_record(self, ("build", "params") + (("decode_traffic",) if self.decode_traffic else ()))
        if not isinstance(self.aux, frozenset) or not all(isinstance(k, str) for k in self.aux):
            raise TypeError(f"FFNKind {self.name!r}: aux={self.aux!r} must be a frozenset of key names")
        if self.counted_as not in ("ffn", "memory"):
            raise ValueError(f"FFNKind.counted_as={self.counted_as!r} is invalid: must be 'ffn' or 'memory'")
        if (self.config_field is None) != (self.config_type is None):
            raise ValueError(f"FFNKind {self.name!r}: give config_field and config_type together")

    def traffic(self, cfg: ModelConfig, batch: int) -> tuple[float, float]:
        if self.decode_traffic is None:
            return float(self.params(cfg, False)), 0.0
        return self.decode_traffic(cfg, batch)


def _check_record(kind: Any, functions: tuple[str, ...]) -> None:
    owner = type(kind).__name__
    if not isinstance(kind.name, str) or not kind.name:
        raise ValueError(f"{owner}.name={kind.name!r} is invalid: must be a non-empty string")
    for field in functions:
        if not callable(getattr(kind, field)):
            raise TypeError(f"{owner} {kind.name!r}: {field}={getattr(kind, field)!r} must be callable")
    if kind.config_type is not None and not isinstance(kind.config_type, type):
        raise TypeError(f"{owner} {kind.name!r}: config_type={kind.config_type!r} must be a class")


def build(kind: AttentionKind | FFNKind, cfg: ModelConfig, rngs: nnx.Rngs) -> nnx.Module:
    """``kind.build(cfg, rngs)``, checked to give a module (model code calls this, not ``build``)."""
    module = kind.build(cfg, rngs)
    if not isinstance(module, nnx.Module):
        raise TypeError(f"kind {kind.name!r}: build returned {type(module).__name__}, not an nnx.Module")
    return module


_REGISTRIES: dict[str, dict[str, Any]] = {"attention": {}, "ffn": {}, "skip": {}}


def _register(role: str, kind: Any, kind_type: type) -> Any:
    if not isinstance(kind, kind_type):
        raise TypeError(f"register_{role} takes an {kind_type.__name__}, got {type(kind).__name__}")
    table = _REGISTRIES[role]
    if kind.name in table:
        raise ValueError(f"{role} kind {kind.name!r} is already registered")
    table[kind.name] = kind
    return kind


def register_attention(kind: AttentionKind) -> AttentionKind:
    return _register("attention", kind, AttentionKind)


def register_ffn(kind: FFNKind) -> FFNKind:
    return _register("ffn", kind, FFNKind)


def register_skip(kind: FFNKind) -> FFNKind:
    return _register("skip", kind, FFNKind)


def unregister(role: str, name: str) -> None:
    """Removes a kind (tests that register their own); built-in kinds stay removable too."""
    _lookup(role, name)  # a clear error for an unknown role or name
    del _REGISTRIES[role][name]


def names(role: str) -> tuple[str, ...]:
    """The registered kinds of ``role`` ("attention", "ffn" or "skip"), in registration order."""
    if role not in _REGISTRIES:
        raise ValueError(f"role={role!r} is invalid: must be one of {tuple(_REGISTRIES)}")
    return tuple(_REGISTRIES[role])


def _lookup(role: str, name: str) -> Any:
    names(role)  # a clear error for an unknown role
    table = _REGISTRIES[role]
    if name not in table:
        raise ValueError(f"{role} kind {name!r} is not registered: registered are {tuple(table)}")
    return table[name]


def attention(name: str) -> AttentionKind:
    return _lookup("attention", name)


def ffn(name: str) -> FFNKind:
    return _lookup("ffn", name)


def skip(name: str) -> FFNKind:
    return _lookup("skip", name)


def users_of(config_field: str) -> list[str]:
    """The registered kinds that need the ``ModelConfig`` sub-config ``config_field``, as
    ``"attention 'mla'"``, ``"skip_kind 'ultramem'"``, ... (for error messages)."""
    return [
        f"{'skip_kind' if role == 'skip' else role} {name!r}"
        for role, table in _REGISTRIES.items()
        for name, kind in table.items()
        if kind.config_field == config_field
    ]


def expected_distinct(n: int, draws: float, p: float) -> float:
    """Expected distinct items among ``n`` when each of ``draws`` independent draws picks a given
    item with probability ``p``: ``n·(1 − (1 − p)^draws)``."""
    return n * (1.0 - (1.0 - p) ** draws)


# -- the built-in kinds ----------------------------------------------------------------------------


def _options(cfg: ModelConfig, *, impl: bool = True) -> dict[str, Any]:
    """The ``ModelConfig`` fields every layer takes as keyword arguments."""
    out: dict[str, Any] = dict(init_std=cfg.init_std, param_dtype=jnp.dtype(cfg.param_dtype))
    return out | ({"impl": cfg.impl} if impl else {})


def _mha_params(cfg: ModelConfig) -> int:  # q and o: D·N·H each; k and v: D·K·H each
    a = cfg.attention
    return (
        2 * cfg.d_model * a.num_heads * a.head_dim
        + 2 * cfg.d_model * a.num_kv_heads * a.head_dim
        + (2 * a.head_dim if a.qk_norm else 0)
    )  # Qwen3's q_norm and k_norm scales [H]


def _mha_score_flops(cfg: ModelConfig, keys: float) -> float:
    a = cfg.attention
    seen = keys if a.sliding_window is None else min(keys, a.sliding_window)
    return 12.0 * a.num_heads * a.head_dim * seen


def _mla_params(cfg: ModelConfig) -> int:  # the latent norms (Q and A scales) are counted here too
    m, D = cfg.mla, cfg.d_model
    N, A, R, H, Hv = m.num_heads, m.kv_lora_rank, m.qk_rope_head_dim, m.qk_nope_head_dim, m.v_head_dim
    q = (
        D * N * (H + R)
        if m.q_lora_rank is None
        else (D * m.q_lora_rank + m.q_lora_rank + m.q_lora_rank * N * (H + R))
    )  # W_DQ, norm, W_UQ|W_QR
    kv = D * A + A + D * R + A * N * (H + Hv)  # W_DKV, norm, W_KR, W_UK|W_UV
    return q + kv + N * Hv * D  # + W_O


register_attention(
    AttentionKind(
        name="mha",  # MHA, GQA and MQA, through num_kv_heads
        config_field="attention",
        config_type=AttentionConfig,
        build=lambda cfg, rngs: Attention(
            cfg.d_model, cfg.attention, rngs=rngs, collective_matmul=cfg.collective_matmul, **_options(cfg)
        ),
        init_cache=lambda cfg, batch, max_len, dtype: Attention.init_cache(
            cfg.attention, batch, max_len, dtype
        ),
        params=_mha_params,
        score_flops=_mha_score_flops,
        kv_elements=lambda cfg: 2 * cfg.attention.num_kv_heads * cfg.attention.head_dim,  # 2·K·H
        paged_cache=PagedKVCache,
    )
)

register_attention(
    AttentionKind(
        name="mla",
        config_field="mla",
        config_type=MLAConfig,
        build=lambda cfg, rngs: MLA(cfg.d_model, cfg.mla, rngs=rngs, **_options(cfg)),
        init_cache=lambda cfg, batch, max_len, dtype: MLA.init_cache(cfg.mla, batch, max_len, dtype),
        params=_mla_params,
        # the naive path: QKᵀ over H+R dims, PV over H_v
        score_flops=lambda cfg, keys: (
            6.0 * cfg.mla.num_heads * (cfg.mla.qk_head_dim + cfg.mla.v_head_dim) * keys
        ),
        kv_elements=lambda cfg: (
            cfg.mla.kv_lora_rank + cfg.mla.qk_rope_head_dim
        ),  # A + R (DeepSeek-V2, Table 1)
        paged_cache=PagedLatentCache,
    )
)


def _swiglu(cfg: ModelConfig, rngs: nnx.Rngs) -> SwiGLU:
    return SwiGLU(
        cfg.d_model,
        cfg.ffn_dim,
        rngs=rngs,
        collective_matmul=cfg.collective_matmul,
        **_options(cfg, impl=False),
    )


def _swiglu_params(cfg: ModelConfig, active: bool) -> int:  # gate, up [D,F] and down [F,D]
    return 3 * cfg.d_model * cfg.ffn_dim


def _moe_params(cfg: ModelConfig, active: bool) -> int:
    """Router [D,E], routed experts 3·D·F each (k of them when ``active``), shared 3·D·F_shared."""
    m, D = cfg.moe, cfg.d_model
    routed = m.top_k if active else m.num_experts
    return D * m.num_experts + routed * 3 * D * m.expert_dim + 3 * D * m.shared_dim


def _moe_traffic(cfg: ModelConfig, batch: int) -> tuple[float, float]:
    """The router and shared experts, and the ``E·(1 − (1 − k/E)^B)`` experts a batch wakes up."""
    m, D = cfg.moe, cfg.d_model
    woken = expected_distinct(m.num_experts, batch, m.top_k / m.num_experts)
    return float(D * m.num_experts + 3 * D * m.shared_dim), woken * 3 * D * m.expert_dim


def _memory_params(cfg: ModelConfig, active: bool, *, skip: bool) -> int:
    """One memory layer; ``active``: the value rows one token reads (heads × top-m) instead of the
    whole table. Queries, keys, cores and projections count whole: every token multiplies by all
    of them (the keys too: each query is scored against all 2·P)."""
    m, D = cfg.memory, cfg.d_model
    Z, U, W = max(m.tucker_rank, 1), m.width(D), m.virtual_blocks
    rows = min(m.reads_per_token, m.physical_rows) if active else m.physical_rows
    return (
        2 * D * m.num_heads * m.key_dim
        + 2 * m.key_dim  # W_q row/col, query LayerNorm
        + 2 * m.num_heads * m.num_keys * Z * m.key_dim
        + (2 * m.key_dim if m.key_norm else 0)
        + (m.num_cores * m.num_heads * Z * Z if m.tucker_rank else 0)
        + rows * U
        + (D * W * U if m.gate else 0)
        + (W * U * D if m.output_proj else 0)
        + (D if skip else 0)
    )  # a skip-layer memory's own RMSNorm


def _memory_traffic(cfg: ModelConfig, batch: int, *, skip: bool) -> tuple[float, float]:
    """Everything but the value rows, and the ``M·(1 − (1 − 1/M)^{B·J})`` ≈ ``B·J`` rows of ``U``
    numbers a batch reads (J = heads × top-m): sparse bytes grow with the batch."""
    m = cfg.memory
    U, M, J = m.width(cfg.d_model), m.physical_rows, m.reads_per_token
    dense = _memory_params(cfg, True, skip=skip) - min(J, M) * U
    return float(dense), expected_distinct(M, batch * J, 1.0 / M) * U


def _memory_kind(name: str, *, skip: bool) -> FFNKind:
    def build(cfg: ModelConfig, rngs: nnx.Rngs) -> MemoryLayer:
        # a skip-layer memory normalizes the stream it reads; an FFN-position one gets the block's
        return MemoryLayer(
            cfg.d_model, cfg.memory, rngs=rngs, pre_norm=skip, norm_eps=cfg.norm_eps, **_options(cfg)
        )

    return FFNKind(
        name=name,
        build=build,
        params=lambda cfg, active: _memory_params(cfg, active, skip=skip),
        config_field="memory",
        config_type=MemoryConfig,
        counted_as="memory",
        decode_traffic=lambda cfg, batch: _memory_traffic(cfg, batch, skip=skip),
        aux=frozenset({"loss"}),
        check=lambda cfg: check_width(cfg.d_model, cfg.memory),
    )


register_ffn(FFNKind(name="swiglu", build=_swiglu, params=_swiglu_params))
register_ffn(
    FFNKind(
        name="moe",
        build=lambda cfg, rngs: MoE(cfg.d_model, cfg.moe, rngs=rngs, **_options(cfg)),
        params=_moe_params,
        config_field="moe",
        config_type=MoEConfig,
        decode_traffic=_moe_traffic,
        aux=frozenset({"loss", "load", "dropped", "metrics"}),
    )
)
register_ffn(_memory_kind("pkm", skip=False))

# Skip-layer modules (UltraMem's wiring, ModelConfig.skip_layers): a module reads the stream
# entering block i and its output joins the stream leaving block j.
register_skip(FFNKind(name="swiglu", build=_swiglu, params=_swiglu_params))
register_skip(_memory_kind("pkm", skip=True))
register_skip(_memory_kind("ultramem", skip=True))
