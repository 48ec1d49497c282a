"""Weight-only quantization: RTN, GPTQ, AWQ and FP8 weights, served as ordinary models.

``quantize(model, cfg, QuantConfig(method="rtn", bits=4, group_size=128))`` replaces every linear
weight by a ``QuantizedEinsum`` holding a ``QuantizedTensor`` (packed integers or FP8 plus scales);
``save_quantized`` / ``load_quantized`` keep one on disk with its ``QuantConfig``.
"""

from llmarch.quant.config import QuantConfig
from llmarch.quant.linear import QuantizedEinsum, QuantParam
from llmarch.quant.model import is_quantized, linears, quantize
from llmarch.quant.tensor import QuantizedTensor, dequantize, fp8, nbytes, pack, rtn, unpack

__all__ = [
    "QuantConfig",
    "QuantParam",
    "QuantizedEinsum",
    "QuantizedTensor",
    "dequantize",
    "fp8",
    "is_quantized",
    "linears",
    "nbytes",
    "pack",
    "quantize",
    "rtn",
    "unpack",
]
