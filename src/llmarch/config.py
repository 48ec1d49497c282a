"""The model's configuration: ``ModelConfig`` and its ``BlockConfig`` layout, frozen and validated on
construction, with a JSON round trip.

Every field is checked in ``__post_init__``; a bad value raises ``ValueError`` naming the field, the
value and what is allowed, before any array is built or anything compiles. The layers' own configs
(``AttentionConfig``, ``MLAConfig``, ``MoEConfig``, ``MemoryConfig``, ...) live in
``llmarch.layers.configs`` and are re-exported here; which kinds a block may use, and which
sub-config each needs, is the kind registry's (``llmarch.layers.kinds``).
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

from llmarch.checks import article, check_choice, check_int, check_positive, fail
from llmarch.json_config import build as _build
from llmarch.layers import kinds
from llmarch.layers.configs import (  # noqa: F401  (re-exported: configs are built from here)
    MEMORY_SCORES,
    MLA_PATHS,
    MOE_ROUTERS,
    MOE_STRATEGIES,
    AttentionConfig,
    MemoryConfig,
    MLAConfig,
    MoEConfig,
    RopeScaling,
    YarnScaling,
)

REMAT_POLICIES = ("none", "full", "dots")
DTYPES = ("float32", "bfloat16", "float16")
IMPLS = ("auto", "xla", "pallas")
# ModelConfig fields that hold one kind's sub-config: None unless a block (or skip) kind needs it.
SUB_CONFIGS = ("mla", "moe", "memory")
# The accounting.ParamCounts fields a factorized weight (LowRankWeight.counted_as) can belong to.
LOW_RANK_COUNTS = ("attention", "ffn", "memory", "lm_head")


@dataclasses.dataclass(frozen=True)
class BlockConfig:
    """Which attention and which FFN one decoder block uses."""

    attention: str = "mha"
    ffn: str = "swiglu"

    def __post_init__(self):
        check_choice("BlockConfig", "attention", self.attention, kinds.names("attention"))
        check_choice("BlockConfig", "ffn", self.ffn, kinds.names("ffn"))


def moe_blocks(
    num_layers: int, first_k_dense_replace: int = 0, attention: str = "mha"
) -> tuple[BlockConfig, ...]:
    """DeepSeek's layout: the first ``first_k_dense_replace`` blocks dense SwiGLU, the rest MoE."""
    if not 0 <= first_k_dense_replace <= num_layers:
        fail(
            "moe_blocks",
            "first_k_dense_replace",
            first_k_dense_replace,
            f"must be in [0, num_layers={num_layers}]",
        )
    return tuple(
        BlockConfig(attention=attention, ffn="swiglu" if i < first_k_dense_replace else "moe")
        for i in range(num_layers)
    )


@dataclasses.dataclass(frozen=True)
class LowRankWeight:
    """One linear weight stored factorized (``llmarch.lowrank``): ``W [*shape]``, viewed as the
    matrix ``[K, N]`` of its ``contracted`` axes (K) and the others (N), held as ``A [*K, r]`` and
    ``B [r, *N]``. ``Transformer`` builds a ``LowRankEinsum`` at ``path`` from this record.

    Attributes:
      path: the weight's ``Einsum`` in the model, as ``nnx.state`` names it
        (``"runs/0/layers/attention/w_q_dnh"``, ``"lm_head"``).
      shape: one layer's weight shape (without a scanned run's layers axis).
      contracted: the axes of ``shape`` the model contracts (K), increasing; the rest are N.
      ranks: each stacked layer's rank (one entry for a weight outside a scanned run). The run's
        layers share one array shape, so all are stored at the largest, ``rank``; a layer's
        columns of A and rows of B beyond its own rank are zero.
      counted_as: the ``accounting.ParamCounts`` field the weight belongs to.
    """

    path: str
    shape: tuple[int, ...]
    contracted: tuple[int, ...]
    ranks: tuple[int, ...]
    counted_as: str

    def __post_init__(self):
        owner = "LowRankWeight"
        if not isinstance(self.path, str) or not self.path:
            fail(owner, "path", self.path, "must be a non-empty string (a module path)")
        where = f"{owner}[{self.path}]"
        if not _ints(self.shape) or not self.shape or min(self.shape) < 1:
            fail(where, "shape", self.shape, "must be a non-empty tuple of positive ints")
        if (
            not _ints(self.contracted)
            or not self.contracted
            or list(self.contracted) != sorted(set(self.contracted))
            or self.contracted[0] < 0
            or self.contracted[-1] >= len(self.shape)
            or len(self.contracted) >= len(self.shape)
        ):
            fail(
                where,
                "contracted",
                self.contracted,
                f"must be increasing axis indices of shape {self.shape}, leaving at least one output axis",
            )
        most = min(self.k, self.n)
        if not _ints(self.ranks) or not self.ranks or not all(1 <= r <= most for r in self.ranks):
            fail(where, "ranks", self.ranks, f"must be a non-empty tuple of ints in [1, min(K, N)={most}]")
        check_choice(where, "counted_as", self.counted_as, LOW_RANK_COUNTS)
        if (self.path == "lm_head") != (self.counted_as == "lm_head"):
            fail(where, "counted_as", self.counted_as, "must be 'lm_head' exactly for the path 'lm_head'")

    @property
    def rank(self) -> int:
        """The stored rank r: the largest of ``ranks``."""
        return max(self.ranks)

    @property
    def k(self) -> int:
        return math.prod(self.shape[i] for i in self.contracted)

    @property
    def n(self) -> int:
        return math.prod(d for i, d in enumerate(self.shape) if i not in self.contracted)

    @property
    def params_saved(self) -> int:
        """``layers·(K·N − r·(K+N))``: parameters (and multiply-adds per token) the factorization
        saves over the dense weight; negative when the stored rank costs more."""
        return len(self.ranks) * (self.k * self.n - self.rank * (self.k + self.n))


def _ints(value: Any) -> bool:
    return isinstance(value, tuple) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A decoder-only transformer.

    ``blocks`` gives each layer's kinds; ``None`` means ``num_layers`` default blocks. Runs of
    identical consecutive blocks are stacked and scanned, so compile time stays flat in depth.
    """

    vocab_size: int  # V
    d_model: int  # D
    num_layers: int  # L
    ffn_dim: int  # F
    attention: AttentionConfig
    max_seq_len: int = 2048
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    blocks: tuple[BlockConfig, ...] | None = None
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    logits_dtype: str = "float32"  # the output's dtype; the loss upcasts to float32 anyway
    remat: str = "none"
    impl: str = "auto"  # kernel implementation for every op, see llmarch.ops
    init_std: float = 0.02
    name: str = "custom"
    mla: MLAConfig | None = None  # used by the blocks whose attention is "mla"
    moe: MoEConfig | None = None  # used by the blocks whose ffn is "moe"
    memory: MemoryConfig | None = None  # ffn "pkm" blocks; skip_kind "pkm"/"ultramem"
    # Skip-layer modules (UltraMem's wiring): for each (i, j), a module of kind `skip_kind`
    # reads the residual stream entering block i and adds its output to the stream leaving
    # block j (i <= j). Spans may not overlap.
    skip_layers: tuple[tuple[int, int], ...] = ()
    skip_kind: str | None = None
    # The Hugging Face model_type this config was imported from (llmarch.hf), so that export writes
    # the same architecture back; None: llmarch.hf picks one from the blocks (see its docs).
    hf_model_type: str | None = None
    # Linear weights stored as low-rank factors (llmarch.lowrank.factorize_model writes it; the
    # Transformer builds those weights factorized). None: every weight dense.
    low_rank: tuple[LowRankWeight, ...] | None = None
    # DeepSeek-V3's multi-token prediction (V3 §2.2, ``llmarch.layers.mtp``): ``mtp_depth`` sequential
    # modules after the decoder, module k predicting the token k+1 beyond the next one; each has its
    # own block (of ``mtp_block``'s kinds; None: the last decoder block's) and shares the embedding
    # and output head. 0: none. Inference drops them unless asked (``llmarch.mtp`` runs them).
    mtp_depth: int = 0
    mtp_block: BlockConfig | None = None
    # Tensor parallelism's SwiGLU FFN and MHA/GQA projections as collective matmuls
    # (``llmarch.collective_matmul``): under a mesh whose rules split ``mlp``/``heads`` n > 1 ways,
    # the all-gather and reduce-scatter around them become ppermute rings that overlap their
    # matmuls (sequence split n ways, T % n == 0; attention with a KV cache stays plain). No effect
    # without such a mesh. Rules ``tp_sp``/``fsdp_tp_sp`` keep the residual stream sequence-split.
    collective_matmul: bool = False

    def __post_init__(self):
        check_positive(
            "ModelConfig",
            vocab_size=self.vocab_size,
            d_model=self.d_model,
            num_layers=self.num_layers,
            ffn_dim=self.ffn_dim,
            max_seq_len=self.max_seq_len,
        )
        if not isinstance(self.attention, AttentionConfig):
            fail("ModelConfig", "attention", self.attention, "must be an AttentionConfig")
        if not 0 < self.norm_eps < 1:
            fail("ModelConfig", "norm_eps", self.norm_eps, "must be in (0, 1)")
        if not self.init_std > 0:
            fail("ModelConfig", "init_std", self.init_std, "must be > 0")
        check_choice("ModelConfig", "dtype", self.dtype, DTYPES)
        check_choice("ModelConfig", "param_dtype", self.param_dtype, DTYPES)
        check_choice("ModelConfig", "logits_dtype", self.logits_dtype, DTYPES)
        check_choice("ModelConfig", "remat", self.remat, REMAT_POLICIES)
        check_choice("ModelConfig", "impl", self.impl, IMPLS)
        if self.blocks is not None:
            if not isinstance(self.blocks, tuple) or not all(isinstance(b, BlockConfig) for b in self.blocks):
                fail("ModelConfig", "blocks", self.blocks, "must be a tuple of BlockConfig or None")
            if len(self.blocks) != self.num_layers:
                fail(
                    "ModelConfig",
                    "blocks",
                    f"<{len(self.blocks)} blocks>",
                    f"must have num_layers={self.num_layers} entries",
                )
        if self.hf_model_type is not None and (
            not isinstance(self.hf_model_type, str) or not self.hf_model_type
        ):
            fail(
                "ModelConfig",
                "hf_model_type",
                self.hf_model_type,
                "must be a non-empty string (a transformers model_type) or None",
            )
        if not isinstance(self.collective_matmul, bool):
            fail("ModelConfig", "collective_matmul", self.collective_matmul, "must be a bool")
        blocks = (*self.layer_blocks, *((self.mtp_block_config,) if self.mtp_depth else ()))
        if self.collective_matmul and not any(b.ffn == "swiglu" or b.attention == "mha" for b in blocks):
            fail(
                "ModelConfig",
                "collective_matmul",
                True,
                "applies to 'swiglu' FFN and 'mha' attention blocks, and no block has either (MoE, "
                "memory and MLA layers keep their own exchanges)",
            )
        self._check_skip_layers()
        self._check_mtp()
        self._check_kinds()
        self._check_low_rank()

    def used_kinds(self) -> list[tuple[str, kinds.AttentionKind | kinds.FFNKind]]:
        """``(what uses it, kind record)`` for every distinct kind the model uses, e.g.
        ``("blocks use ffn 'moe'", <FFNKind moe>)``, in layer order, the skip kind last."""
        used: dict[str, kinds.AttentionKind | kinds.FFNKind] = {}
        for b in self.layer_blocks:
            used.setdefault(f"blocks use attention {b.attention!r}", kinds.attention(b.attention))
            used.setdefault(f"blocks use ffn {b.ffn!r}", kinds.ffn(b.ffn))
        if self.skip_kind is not None:
            used[f"skip_kind {self.skip_kind!r}"] = kinds.skip(self.skip_kind)
        if self.mtp_depth:
            b = self.mtp_block_config
            used.setdefault(f"mtp_block uses attention {b.attention!r}", kinds.attention(b.attention))
            used.setdefault(f"mtp_block uses ffn {b.ffn!r}", kinds.ffn(b.ffn))
        return list(used.items())

    @property
    def mtp_block_config(self) -> BlockConfig:
        """The kinds of each multi-token-prediction module's block: ``mtp_block``, or the last
        decoder block's (DeepSeek-V3's MTP layer is an MoE block like its last layer)."""
        return self.mtp_block if self.mtp_block is not None else self.layer_blocks[-1]

    def _check_mtp(self) -> None:
        check_int("ModelConfig", "mtp_depth", self.mtp_depth, low=0)
        if self.mtp_block is not None and not isinstance(self.mtp_block, BlockConfig):
            fail("ModelConfig", "mtp_block", self.mtp_block, "must be a BlockConfig or None")
        if self.mtp_block is not None and not self.mtp_depth:
            fail(
                "ModelConfig",
                "mtp_block",
                self.mtp_block,
                "must be None with mtp_depth=0 (there are no multi-token-prediction modules)",
            )
        if self.mtp_depth >= self.max_seq_len:
            fail(
                "ModelConfig",
                "mtp_depth",
                self.mtp_depth,
                f"must be < max_seq_len={self.max_seq_len} (module k predicts k+1 tokens ahead)",
            )

    def _check_kinds(self) -> None:
        """Each sub-config is given exactly when a used kind needs it, then each kind's own checks."""
        used = self.used_kinds()
        for field in SUB_CONFIGS:
            value = getattr(self, field)
            users = [(who, k) for who, k in used if k.config_field == field]
            cls = users[0][1].config_type if users else None
            if users and not isinstance(value, cls):
                allowed = f"must be {article(cls)}: {users[0][0]}"
                fail("ModelConfig", field, value, allowed)
            if value is not None and not users:
                fail(
                    "ModelConfig",
                    field,
                    f"<{type(value).__name__}>",
                    f"must be None: no block uses {' or '.join(kinds.users_of(field))}",
                )
        for who, kind in used:
            if kind.config_field not in (*SUB_CONFIGS, "attention", None):
                raise ValueError(
                    f"{who}, whose kind needs ModelConfig.{kind.config_field}, which ModelConfig does not "
                    f"have: a kind's sub-config must be one of {('attention', *SUB_CONFIGS)}"
                )
            if getattr(kind, "check", None) is not None:
                kind.check(self)

    def _check_low_rank(self) -> None:
        """A non-empty tuple of ``LowRankWeight`` with distinct paths; the LM head only when it is
        not tied. That each record matches its weight's shape is checked when a model is built."""
        if self.low_rank is None:
            return
        value = self.low_rank
        if not isinstance(value, tuple) or not value or not all(isinstance(w, LowRankWeight) for w in value):
            fail("ModelConfig", "low_rank", value, "must be None or a non-empty tuple of LowRankWeight")
        paths = [w.path for w in value]
        if len(set(paths)) != len(paths):
            fail("ModelConfig", "low_rank", paths, "must name each weight path once")
        if self.tie_embeddings and "lm_head" in paths:
            fail("ModelConfig", "low_rank", "lm_head", "names no weight: tie_embeddings=True has no LM head")

    def _check_skip_layers(self) -> None:
        if not isinstance(self.skip_layers, tuple):
            fail("ModelConfig", "skip_layers", self.skip_layers, "must be a tuple of (i, j) pairs")
        for pair in self.skip_layers:
            if (
                not isinstance(pair, tuple)
                or len(pair) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in pair)
            ):
                fail("ModelConfig", "skip_layers", pair, "each entry must be a pair of ints (i, j)")
            i, j = pair
            if not 0 <= i <= j < self.num_layers:
                fail("ModelConfig", "skip_layers", pair, f"needs 0 <= i <= j < num_layers={self.num_layers}")
        spans = sorted(self.skip_layers)
        for (i0, j0), (i1, j1) in zip(spans, spans[1:], strict=False):
            if i1 <= j0:
                fail(
                    "ModelConfig",
                    "skip_layers",
                    self.skip_layers,
                    f"spans ({i0}, {j0}) and ({i1}, {j1}) overlap; they must be disjoint",
                )
        allowed = kinds.names("skip")
        if self.skip_layers and self.skip_kind not in allowed:
            fail("ModelConfig", "skip_kind", self.skip_kind, f"must be one of {allowed} with skip_layers")
        if not self.skip_layers and self.skip_kind is not None:
            fail("ModelConfig", "skip_kind", self.skip_kind, "must be None without skip_layers")

    @property
    def layer_blocks(self) -> tuple[BlockConfig, ...]:
        return self.blocks if self.blocks is not None else (BlockConfig(),) * self.num_layers

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    # JSON round trip ----------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        return _build(cls, data, "ModelConfig")

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        return cls.from_dict(json.loads(text))
