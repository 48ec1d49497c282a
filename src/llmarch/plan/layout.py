"""A training layout to price: the mesh, the batch, remat, precision, optimizer and pipeline
schedule, validated against a model before anything is counted.

The mesh axes are ``llmarch.sharding``'s (``data, fsdp, tensor, expert, stage`` and ``context``),
with the meaning the rules give them: the batch split over ``data``, ``fsdp`` and ``expert``; the
weights (and their gradients and optimizer state) over ``fsdp`` (FSDP/ZeRO-3), ``tensor``
(Megatron heads/FFN/vocab), ``expert`` (routed experts) and ``stage`` (layers); the sequence over
``context``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

from llmarch.checks import check_choice, check_int, fail
from llmarch.config import REMAT_POLICIES, ModelConfig
from llmarch.pipeline_schedule import SCHEDULES, check_schedule_args
from llmarch.sharding import parse_mesh_spec
from llmarch.train.precision import POLICIES

AXES = ("data", "fsdp", "tensor", "expert", "stage", "context")
BATCH_AXES = ("data", "fsdp", "expert")
# Optimizer state per parameter, in units of the parameter dtype's bytes: AdamW keeps m and v,
# SGD with momentum one buffer, Adafactor factored second moments (~0 per parameter) and momentum
# off (optax.adafactor's default), Lion one momentum.
OPTIMIZER_STATES = {"adamw": 2, "sgd": 1, "lion": 1, "adafactor": 0}
# Where the axes sit, innermost (fastest link) first: the axes that move the most bytes per step,
# and exposed on the critical path, get the fast domain before the others (MaxText's ICI-first
# placement of tensor parallelism; DeepSeek-V3 keeps expert parallelism's all-to-all inside
# NVLink where it can).
PLACEMENT = ("tensor", "expert", "context", "fsdp", "data", "stage")


@dataclasses.dataclass(frozen=True)
class Layout:
    """One way to train a model on ``devices`` accelerators.

    Attributes:
      mesh: axis sizes, e.g. ``{"fsdp": 32, "tensor": 4}`` or ``"fsdp=32,tensor=4"``; axes left
        out have size 1. Stored as a dict of every axis in ``AXES``.
      batch: sequences per optimizer step (global).
      seq_len: tokens per sequence.
      remat: ``ModelConfig.remat``: none | full | dots.
      precision: a ``llmarch.train.precision`` policy name (bf16, pure-bf16, fp8, ...).
      optimizer: adamw | sgd | lion | adafactor (its state per parameter: ``OPTIMIZER_STATES``).
      schedule: the pipeline schedule over ``stage``: gpipe | 1f1b | interleaved.
      microbatches: pipeline microbatches per step, m (None: one sequence each, the most the
        batch allows); must be 1 without pipelining.
      virtual_stages: model chunks per device for the interleaved schedule, v.
    """

    mesh: Mapping[str, int] | str
    batch: int
    seq_len: int
    remat: str = "full"
    precision: str = "bf16"
    optimizer: str = "adamw"
    schedule: str = "1f1b"
    microbatches: int | None = None
    virtual_stages: int = 1

    def __post_init__(self):
        # unknown axes and sizes < 1 are refused there; a spec string is read as --mesh reads it
        sizes = parse_mesh_spec(self.mesh if isinstance(self.mesh, str) else dict(self.mesh))
        object.__setattr__(self, "mesh", {a: sizes.get(a, 1) for a in AXES})
        check_int("Layout", "batch", self.batch)
        check_int("Layout", "seq_len", self.seq_len)
        check_choice("Layout", "remat", self.remat, REMAT_POLICIES)
        check_choice("Layout", "precision", self.precision, tuple(POLICIES))
        check_choice("Layout", "optimizer", self.optimizer, tuple(OPTIMIZER_STATES))
        check_choice("Layout", "schedule", self.schedule, SCHEDULES)
        check_int("Layout", "virtual_stages", self.virtual_stages)
        if self.virtual_stages > 1 and self.schedule != "interleaved":
            fail("Layout", "virtual_stages", self.virtual_stages, "must be 1 unless schedule='interleaved'")
        replicas = self.replicas
        if self.batch % replicas:
            fail(
                "Layout",
                "batch",
                self.batch,
                f"must be divisible by data*fsdp*expert={replicas} (the batch is split over them)",
            )
        if self.seq_len % self.mesh["context"]:
            fail("Layout", "seq_len", self.seq_len, f"must be divisible by context={self.mesh['context']}")
        per_replica = self.batch // replicas
        if self.microbatches is None:
            object.__setattr__(self, "microbatches", per_replica if self.stages > 1 else 1)
        check_int("Layout", "microbatches", self.microbatches)
        if self.stages == 1 and self.microbatches != 1:
            fail("Layout", "microbatches", self.microbatches, "must be 1 without pipelining (stage=1)")
        if per_replica % self.microbatches:
            fail(
                "Layout",
                "microbatches",
                self.microbatches,
                f"must divide the {per_replica} sequences of each data replica (batch/(data*fsdp*expert))",
            )
        if self.stages > 1:  # the schedules llmarch.pipeline can build (interleaved: v >= 2, m % p == 0)
            check_schedule_args(
                self.schedule, self.stages, self.microbatches, self.virtual_stages, owner="Layout."
            )

    @property
    def devices(self) -> int:
        return math.prod(self.mesh.values())

    @property
    def replicas(self) -> int:
        """Ways the batch is split: ``data·fsdp·expert``."""
        return math.prod(self.mesh[a] for a in BATCH_AXES)

    @property
    def stages(self) -> int:
        return self.mesh["stage"]

    @property
    def tokens(self) -> int:
        """Tokens per optimizer step (global)."""
        return self.batch * self.seq_len

    @property
    def tokens_per_device(self) -> float:
        """Tokens one device computes on per step (a pipeline stage sees all of its replica's)."""
        return self.tokens / (self.replicas * self.mesh["context"])

    def spec(self) -> str:
        """``"fsdp=32,tensor=4"``: the axes of size > 1 (``"data=1"`` for one device)."""
        return ",".join(f"{a}={n}" for a, n in self.mesh.items() if n > 1) or "data=1"


def check_model(layout: Layout, cfg: ModelConfig) -> None:
    """Raises ValueError naming the axis when ``layout`` cannot split ``cfg``: tensor must divide
    the heads and the FFN widths, expert the routed experts; stage (times virtual stages) may be
    at most the layers; an expert axis needs an MoE."""
    m = layout.mesh
    heads = cfg.mla.num_heads if cfg.mla is not None else cfg.attention.num_heads
    widths = {"num_heads": heads, "ffn_dim": cfg.ffn_dim}
    if cfg.moe is not None:
        widths["moe.expert_dim"] = cfg.moe.expert_dim
    for field, size in widths.items():
        if size % m["tensor"]:
            fail(
                "Layout",
                "mesh",
                layout.spec(),
                f"tensor={m['tensor']} must divide {cfg.name}'s {field}={size}",
            )
    if m["expert"] > 1 and cfg.moe is None:
        fail("Layout", "mesh", layout.spec(), f"expert={m['expert']} needs an MoE model; {cfg.name} has none")
    if cfg.moe is not None and cfg.moe.num_experts % m["expert"]:
        fail(
            "Layout",
            "mesh",
            layout.spec(),
            f"expert={m['expert']} must divide {cfg.name}'s num_experts={cfg.moe.num_experts}",
        )
    chunks = layout.stages * layout.virtual_stages
    if chunks > cfg.num_layers:
        fail(
            "Layout",
            "mesh",
            layout.spec(),
            f"stage*virtual_stages={chunks} exceeds {cfg.name}'s num_layers={cfg.num_layers}",
        )


def stage_layers(cfg: ModelConfig, layout: Layout) -> int:
    """Blocks on the busiest pipeline stage: ``ceil(L/p)`` (a stage count that does not divide
    the layers, e.g. DeepSeek-V3's 61 over 16, leaves some stages a block short)."""
    return -(-cfg.num_layers // layout.stages)


def axis_links(layout: Layout, fast_domain: int) -> dict[str, bool]:
    """For each axis, whether its collectives stay in the fast domain (ICI / NVLink): axes are
    placed innermost first in ``PLACEMENT`` order, and an axis is fast when the devices it and
    every axis inside it span fit in one domain."""
    inner, fast = 1, {}
    for axis in PLACEMENT:
        inner *= layout.mesh[axis]
        fast[axis] = inner <= fast_domain
    return fast
