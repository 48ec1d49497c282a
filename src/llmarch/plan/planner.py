"""The cost model: one training step of a layout on an accelerator, as a roofline of FLOPs, HBM
traffic and collectives, the pipeline bubble, the predicted MFU and the energy.

  T_compute  = max(hardware FLOPs / (peak · matmul_efficiency), HBM bytes / HBM bandwidth)
  T_work     = T_compute + exposed collectives (tensor, expert)
  T_pipeline = T_work / (1 − bubble),  bubble = ((p−1)/v) / (m + (p−1)/v)
               (GPipe and 1F1B: (p−1)/(m+p−1), Huang et al. 2019, Narayanan et al. 2021;
               interleaved 1F1B: the fill divided by the v virtual stages)
  T_step     = max(T_pipeline, overlapped collectives) + T_optimizer
  MFU        = model FLOPs / (T_step · devices · peak_bf16)

Model FLOPs are ``accounting.train_flops_per_token`` (6·N_active + causal attention) per token;
hardware FLOPs add what remat recomputes (``full``: the forward again, a third more; ``dots``:
only elementwise work, no FLOPs counted). FP8 policies run the blocks' linear layers at
``peak_fp8`` and the rest (attention scores, the LM head) at bf16. HBM traffic: each microbatch
reads the weights it multiplies once forward and twice backward (and once more under full remat)
and writes then reads its saved activations; the optimizer update reads and writes parameters,
state and gradients once. Energy is the rated power of every device for the step (an upper
bound: devices draw less than TDP while they wait).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from llmarch import accounting
from llmarch.config import ModelConfig
from llmarch.plan.collectives import Collective, collectives
from llmarch.plan.hardware import Hardware
from llmarch.plan.layout import OPTIMIZER_STATES, Layout, check_model
from llmarch.plan.memory import Memory, activation_bytes, memory, microbatches_in_flight
from llmarch.train.precision import policy


@dataclasses.dataclass(frozen=True)
class Plan:
    """What one training step of ``layout`` costs on ``hardware`` (times in seconds, bytes and
    FLOPs per device unless named global)."""

    model: str
    hardware: Hardware
    layout: Layout
    memory: Memory
    model_flops: float  # global, per step
    hardware_flops: float  # per device, per step (with recompute)
    flops_seconds: float
    hbm_bytes: float
    hbm_seconds: float
    optimizer_seconds: float
    collectives: tuple[Collective, ...]
    bubble: float

    @property
    def fits(self) -> bool:
        return self.memory.total <= self.hardware.hbm_bytes

    @property
    def compute_seconds(self) -> float:
        return max(self.flops_seconds, self.hbm_seconds)

    @property
    def exposed_seconds(self) -> float:
        return sum(c.seconds for c in self.collectives if not c.overlapped)

    @property
    def overlapped_seconds(self) -> float:
        return sum(c.seconds for c in self.collectives if c.overlapped)

    @property
    def step_seconds(self) -> float:
        pipeline = (self.compute_seconds + self.exposed_seconds) / (1 - self.bubble)
        return max(pipeline, self.overlapped_seconds) + self.optimizer_seconds

    @property
    def bound(self) -> str:
        """What sets the step time: compute, HBM, or a named collective."""
        pipeline = (self.compute_seconds + self.exposed_seconds) / (1 - self.bubble)
        if self.overlapped_seconds > pipeline:
            return "overlapped collectives"
        if self.exposed_seconds > self.compute_seconds:
            return "exposed collectives"
        return "HBM" if self.hbm_seconds > self.flops_seconds else "compute"

    @property
    def mfu(self) -> float:
        """Model FLOPs over the bf16 peak of every device for the step."""
        return self.model_flops / (self.step_seconds * self.layout.devices * self.hardware.peak_bf16)

    @property
    def tokens_per_second(self) -> float:
        return self.layout.tokens / self.step_seconds

    @property
    def energy_joules(self) -> float | None:
        """Rated power x devices x step time; None where the hardware's power is unpublished."""
        if self.hardware.watts is None:
            return None
        return self.hardware.watts * self.layout.devices * self.step_seconds

    @property
    def joules_per_token(self) -> float | None:
        energy = self.energy_joules
        return None if energy is None else energy / self.layout.tokens


def peaks(hw: Hardware, layout: Layout) -> tuple[float, float]:
    """``(peak of the blocks' linear layers, peak of the rest)`` for the layout's precision."""
    prec = policy(layout.precision)
    if prec.compute_dtype == "float32":
        if hw.peak_fp32 is None:
            raise ValueError(
                f"precision={layout.precision!r} computes in float32, for which {hw.name} publishes no "
                "peak; use a bfloat16 policy (bf16, pure-bf16)"
            )
        return hw.peak_fp32, hw.peak_fp32
    rest = hw.peak_bf16 * hw.matmul_efficiency
    if prec.fp8 is not None:
        if hw.peak_fp8 is None:
            raise ValueError(
                f"precision={layout.precision!r} needs FP8 matmuls, which {hw.name} does not have; use bf16"
            )
        return hw.peak_fp8 * hw.matmul_efficiency, rest
    return rest, rest


def plan(cfg: ModelConfig, layout: Layout, hw: Hardware) -> Plan:
    """The cost of one training step of ``cfg`` laid out as ``layout`` on ``hw`` (module docstring).
    Raises ValueError naming the field when the layout cannot split the model or the hardware
    cannot run the precision."""
    check_model(layout, cfg)
    prec = policy(layout.precision)
    cb = jnp.dtype(prec.compute_dtype).itemsize
    pb = jnp.dtype(prec.param_dtype).itemsize
    per_token = accounting.train_flops_per_token(cfg, layout.seq_len, causal=True)
    counts = accounting.active_param_counts(cfg)
    linear = 6.0 * (counts.attention + counts.ffn + counts.memory)  # the blocks' linear layers
    rest = per_token - linear  # the LM head and the attention scores
    recompute = 4 / 3 if layout.remat == "full" else 1.0
    model_flops = per_token * layout.tokens
    ways = layout.devices
    linear_peak, rest_peak = peaks(hw, layout)
    flops_seconds = recompute * layout.tokens / ways * (linear / linear_peak + rest / rest_peak)
    mem = memory(cfg, layout)
    # HBM: the weights a device multiplies (gathered over fsdp), read 3 times per microbatch (4
    # with full remat); the saved activations written once and read once.
    gathered = mem.params / pb * layout.mesh["fsdp"] * cb
    passes = (4 if layout.remat == "full" else 3) * layout.microbatches
    saved = activation_bytes(cfg, layout) / microbatches_in_flight(layout) * layout.microbatches
    hbm_bytes = gathered * passes + 2 * saved
    states = OPTIMIZER_STATES[layout.optimizer]
    optimizer_bytes = mem.params * (2 + 1 + 2 * states)  # params r/w, grads r, states r/w
    p, m, v = layout.stages, layout.microbatches, layout.virtual_stages
    fill = (p - 1) / v
    return Plan(
        model=cfg.name,
        hardware=hw,
        layout=layout,
        memory=mem,
        model_flops=model_flops,
        hardware_flops=recompute * per_token * layout.tokens / ways,
        flops_seconds=flops_seconds,
        hbm_bytes=hbm_bytes,
        hbm_seconds=hbm_bytes / hw.hbm_bandwidth,
        optimizer_seconds=optimizer_bytes / hw.hbm_bandwidth,
        collectives=tuple(collectives(cfg, layout, hw)),
        bubble=fill / (m + fill),
    )
