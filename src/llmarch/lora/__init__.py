"""LoRA and QLoRA: frozen linear weights with trainable low-rank adapters.

``TrainConfig(lora=LoraConfig(rank=8, alpha=16))`` (with ``init_from`` a run or a Hugging Face
directory) trains only the adapters: the optimizer holds the ``nnx.LoRAParam`` variables alone, the
frozen base gets no gradients and no optimizer state, and the run's checkpoints hold the adapters
(the base is re-read from ``init_from`` whenever the run is read). Every reader of the run (``eval``,
``generate``, ``serve``, ``export``) sees the merged model ``W + (alpha/r)·A·B``; ``llmarch export
--format run`` writes it as a plain run, ``--format hf`` as a Hugging Face directory.
``LoraConfig.base_quant`` stores the frozen base quantized (QLoRA, RTN or FP8).
"""

from llmarch.lora.config import ALL_LINEAR, TARGETS, LoraConfig
from llmarch.lora.layer import LoRAEinsum, LoRASeed, QLoRAEinsum, dropout_key
from llmarch.lora.model import (
    ADAPTERS,
    FROZEN,
    adapter_count,
    apply_lora,
    is_adapted,
    merge_lora,
    role,
    split,
)

__all__ = [
    "ADAPTERS",
    "ALL_LINEAR",
    "FROZEN",
    "TARGETS",
    "LoRAEinsum",
    "LoRASeed",
    "LoraConfig",
    "QLoRAEinsum",
    "adapter_count",
    "apply_lora",
    "dropout_key",
    "is_adapted",
    "merge_lora",
    "role",
    "split",
]
