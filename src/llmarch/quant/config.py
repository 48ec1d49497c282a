"""``QuantConfig``: how a model's linear weights are quantized (method, bits, groups, options)."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from llmarch.checks import check_choice, check_int, check_number, fail
from llmarch.json_config import build

METHODS = ("rtn", "gptq", "awq", "fp8")
BITS = (8, 4, 3)
GROUP_SIZES = (None, 32, 64, 128)


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """Weight-only quantization of a model's linear (``Einsum``) weights.

    Attributes:
      method: ``"rtn"`` (round to nearest), ``"gptq"`` (Frantar et al. 2023), ``"awq"`` (Lin et
        al. 2024) or ``"fp8"`` (float8_e4m3fn weights; ``bits``/``symmetric`` do not apply).
      bits: 8, 4 or 3 for the integer methods (int3 is stored in 4-bit nibbles: it changes the
        accuracy, not the bytes, of int4).
      group_size: None (one scale per output channel) or 32/64/128 input rows per scale; must
        divide each weight's contracted (input) dimension K.
      symmetric: scales only (``q·s``) or scales and zero points (``(q - z)·s``).
      include_embeddings: also quantize the embedding table (used as a ``[V,D]`` weight).
      include_lm_head: also quantize the untied LM head.
      fp8_block: FP8 only: None (one scale per output column) or the side of square
        ``fp8_block × fp8_block`` scale blocks (DeepSeek-V3 ships 128).
      gptq_damp, gptq_block, gptq_act_order: GPTQ's dampening (fraction of the mean Hessian
        diagonal), lazy-batch width and activation ordering.
      awq_grid, awq_clip: AWQ's number of α grid points in [0, 1) and whether it searches a
        weight-clipping ratio.
    """

    method: str = "rtn"
    bits: int = 8
    group_size: int | None = None
    symmetric: bool = True
    include_embeddings: bool = False
    include_lm_head: bool = False
    fp8_block: int | None = None
    gptq_damp: float = 0.01
    gptq_block: int = 128
    gptq_act_order: bool = False
    awq_grid: int = 20
    awq_clip: bool = True

    def __post_init__(self):
        owner = "QuantConfig"
        check_choice(owner, "method", self.method, METHODS)
        if self.bits not in BITS or isinstance(self.bits, bool):
            fail(owner, "bits", self.bits, f"must be one of {BITS}")
        if self.group_size not in GROUP_SIZES or isinstance(self.group_size, bool):
            fail(owner, "group_size", self.group_size, f"must be one of {GROUP_SIZES}")
        for name in ("symmetric", "include_embeddings", "include_lm_head", "gptq_act_order", "awq_clip"):
            if not isinstance(getattr(self, name), bool):
                fail(owner, name, getattr(self, name), "must be true or false")
        if self.fp8_block is not None:
            check_int(owner, "fp8_block", self.fp8_block)
            if self.method != "fp8":
                fail(owner, "fp8_block", self.fp8_block, f"applies to method='fp8' only, not {self.method!r}")
        if self.method == "fp8" and self.group_size is not None:
            fail(owner, "group_size", self.group_size, "must be None for method='fp8' (use fp8_block)")
        check_number(owner, "gptq_damp", self.gptq_damp, "must be in [0, 1]", lambda v: 0 <= v <= 1)
        check_int(owner, "gptq_block", self.gptq_block)
        check_int(owner, "awq_grid", self.awq_grid, low=2)

    def replace(self, **changes: Any) -> QuantConfig:
        return dataclasses.replace(self, **changes)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str, where: str = "QuantConfig") -> QuantConfig:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where} is not valid JSON: {e}") from None
        return build(cls, data, where)
