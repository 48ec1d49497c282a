"""``EngineConfig``: the budgets and buckets of an ``Engine``, validated before anything is built."""

from __future__ import annotations

import dataclasses

from llmarch.checks import check_int
from llmarch.inference import placement
from llmarch.inference.scheduler import ADMISSION
from llmarch.layers.kv_quant import KV_CACHE_DTYPES


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """Budgets and buckets of an ``Engine``.

    Attributes:
      page_size: tokens per cache page.
      num_pages: pages in the pool, the trash page included (None: from ``kv_cache_memory`` when
        given, else enough for ``max_num_seqs`` sequences of ``max_len`` tokens).
      kv_cache_dtype: how the cache stores keys and values (``llmarch.layers.kv_quant``):
        "auto" (the model's compute dtype), "float32", "bfloat16", or quantized per token and
        KV head (MLA: per token's latent and RoPE key) "int8" or "fp8_e4m3".
      kv_cache_memory: bytes the page pools may take, scales included; sets ``num_pages``
        (``accounting.pages_for_memory``), so a smaller ``kv_cache_dtype`` buys more pages.
      max_num_seqs: sequences running at once (the batch budget).
      max_num_batched_tokens: tokens per step, decode and prefill together (<= the model's
        max_seq_len: a step is one row of the model).
      max_prefill_chunk: prompt tokens of one sequence per step (chunked prefill).
      max_prefill_rows: sequences prefilling in one step.
      max_len: prompt + generated tokens per sequence (None: the model's max_seq_len).
      max_logprobs: the most alternatives ``SamplingParams.logprobs`` may ask for.
      min_decode_rows, min_tokens, min_chunk: the smallest buckets (fewer programs to compile).
      fixed_shapes: every step at the largest bucket: one program, more padding.
      decode_steps: decode steps per dispatch when a step only decodes and no request waits
        (one program loops over them on the device, feeding each step's tokens to the next);
        1: one step per dispatch. Tokens then arrive in bursts of up to this many.
      unstack_layers: run the layers one after another over per-layer copies of their weights
        (``llmarch.model.with_unstacked_layers``) instead of a scan over the stacked ones; None:
        when the weights live on CPU, where a scan copies every layer's weights each step.
      watermark: fraction of the pages kept free when admitting new sequences while others run.
      admission: the order waiting requests are admitted in (``llmarch.inference.scheduler``):
        "shortest" (fewest prompt tokens first: lower time to first token when requests queue
        together) or "fcfs" (first come first served).
      max_wait_steps: under "shortest", steps after which a waiting request goes ahead of
        shorter ones (so none starves).
      enable_prefix_caching: keep the full pages of computed tokens and let later sequences
        whose tokens start the same reuse them instead of prefilling them again (automatic
        prefix caching, ``llmarch.inference.prefix_cache``). Outputs are unchanged; the engine
        leaves it off for models whose pages depend on more than their prefix (MoE with
        ``strategy="capacity"``) and says why in ``Engine.prefix_caching_off``.
      mesh: devices to split the model over, e.g. "tensor=2" or "tensor=2,expert=2"
        (``llmarch.inference.placement``: heads, FFN units and the vocabulary over ``tensor``, MoE
        experts over ``expert``, the KV pages by head); None: one device.
      seed: draws the seeds of requests that give none.
    """

    page_size: int = 16
    num_pages: int | None = None
    kv_cache_dtype: str = "auto"
    kv_cache_memory: int | None = None
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 256
    max_prefill_chunk: int = 128
    max_prefill_rows: int = 4
    max_len: int | None = None
    max_logprobs: int = 5
    min_decode_rows: int = 4
    min_tokens: int = 16
    min_chunk: int = 16
    watermark: float = 0.01
    admission: str = "shortest"
    max_wait_steps: int = 64
    fixed_shapes: bool = False
    decode_steps: int = 8
    unstack_layers: bool | None = None
    enable_prefix_caching: bool = True
    mesh: str | None = None
    seed: int = 0

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in (
                "watermark",
                "num_pages",
                "max_len",
                "seed",
                "max_logprobs",
                "fixed_shapes",
                "unstack_layers",
                "kv_cache_dtype",
                "kv_cache_memory",
                "admission",
                "enable_prefix_caching",
                "mesh",
            ):
                continue
            check_int("EngineConfig", f.name, value)
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(
                f"EngineConfig.kv_cache_dtype={self.kv_cache_dtype!r} is invalid: must be one of "
                f"{list(KV_CACHE_DTYPES)}"
            )
        if self.admission not in ADMISSION:
            raise ValueError(
                f"EngineConfig.admission={self.admission!r} is invalid: must be one of {list(ADMISSION)}"
            )
        if self.num_pages is not None and self.kv_cache_memory is not None:
            raise ValueError(
                f"EngineConfig.kv_cache_memory={self.kv_cache_memory!r} is invalid with "
                f"num_pages={self.num_pages!r}: give one of them"
            )
        for name in ("num_pages", "max_len", "kv_cache_memory"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise ValueError(
                    f"EngineConfig.{name}={value!r} is invalid: must be None or a positive integer"
                )
        if not isinstance(self.max_logprobs, int) or self.max_logprobs < 0:
            raise ValueError(f"EngineConfig.max_logprobs={self.max_logprobs!r} is invalid: must be >= 0")
        if not isinstance(self.enable_prefix_caching, bool):
            raise ValueError(
                f"EngineConfig.enable_prefix_caching={self.enable_prefix_caching!r} is invalid: "
                "must be True or False"
            )
        if self.mesh is not None and not isinstance(self.mesh, str):
            raise ValueError(f"EngineConfig.mesh={self.mesh!r} is invalid: must be None or e.g. 'tensor=2'")
        placement.check_mesh_spec(self.mesh)
        if self.unstack_layers not in (None, True, False):
            raise ValueError(
                f"EngineConfig.unstack_layers={self.unstack_layers!r} is invalid: must be None, True or False"
            )
        if not 0 <= self.watermark < 1:
            raise ValueError(f"EngineConfig.watermark={self.watermark!r} is invalid: must be in [0, 1)")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(
                f"EngineConfig.max_num_batched_tokens={self.max_num_batched_tokens} is invalid: "
                f"must be >= max_num_seqs={self.max_num_seqs} (one decode token each)"
            )
        if self.max_prefill_chunk > self.max_num_batched_tokens:
            raise ValueError(
                f"EngineConfig.max_prefill_chunk={self.max_prefill_chunk} is invalid: must be "
                f"<= max_num_batched_tokens={self.max_num_batched_tokens}"
            )
