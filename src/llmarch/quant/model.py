"""``quantize(model, cfg, qcfg)``: every linear weight of a ``Transformer`` replaced by a quantized one.

Which weights, and how each is viewed as a matrix ``[*batch, K, N]``: ``llmarch.quant.targets``.
RTN and FP8 quantize each weight on its own; GPTQ and AWQ (``llmarch.quant.gptq``, ``awq``) walk
the model block by block on calibration data (``llmarch.quant.calibrate``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from flax import nnx
from tqdm.auto import tqdm

from llmarch.config import ModelConfig
from llmarch.quant import awq, gptq
from llmarch.quant.config import QuantConfig
from llmarch.quant.targets import Linear, is_quantized, linears
from llmarch.quant.tensor import QuantizedTensor
from llmarch.quant.tensor import quantize as quantize_tensor

__all__ = ["is_quantized", "linears", "quantize"]


def quantize(
    model: nnx.Module,
    cfg: ModelConfig,
    qcfg: QuantConfig,
    calibration: Any = None,
    *,
    progress: bool = True,
) -> nnx.Module:
    """A copy of ``model`` whose linear weights are quantized as ``qcfg`` says.

    Args:
      model: a ``Transformer`` of ``cfg`` (float weights; left unchanged).
      qcfg: the method and format. ``"rtn"`` and ``"fp8"`` need no data; ``"gptq"`` and ``"awq"``
        take ``calibration`` (token batches, see ``llmarch.quant.calibrate``).
      progress: a progress bar over the weights.

    Returns:
      The quantized model (``QuantizedEinsum`` layers; ``model.quant_config`` is ``qcfg``): its
      forward, ``generate`` and the ``Engine`` run on it unchanged.

    Raises:
      ValueError: an already quantized model, or a group size not dividing a weight's K (naming
        the weight).
    """
    if getattr(cfg, "mtp_depth", 0):
        raise ValueError(
            f"ModelConfig.mtp_depth={cfg.mtp_depth}: quantize does not cover multi-token-prediction modules "
            "(only some of their weights would change); allowed: a model without them, "
            "llmarch.model.without_mtp(model)"
        )
    if not isinstance(qcfg, QuantConfig):
        raise TypeError(f"qcfg must be a QuantConfig, got {type(qcfg).__name__}")
    if is_quantized(model):
        raise ValueError("the model is already quantized: quantize its float checkpoint instead")
    model = nnx.clone(model)
    targets = linears(model, cfg, qcfg)
    if qcfg.method in ("gptq", "awq"):
        algorithm = gptq if qcfg.method == "gptq" else awq
        algorithm.quantize_model(model, cfg, qcfg, targets, calibration, progress=progress)
    else:
        for t in tqdm(targets, desc=f"quantize {qcfg.method}", disable=not progress, leave=False):
            qt = quantize_tensor(
                t.matrix(),
                method=qcfg.method,
                bits=qcfg.bits,
                group_size=qcfg.group_size,
                symmetric=qcfg.symmetric,
                fp8_block=qcfg.fp8_block,
            )
            t.install(_with_static_shape(qt, t))
    model.quant_config = qcfg
    return model


def _with_static_shape(qt: QuantizedTensor, t: Linear) -> QuantizedTensor:
    """``qt`` of a stacked weight describes one layer: its static shape drops the layers axis."""
    return dataclasses.replace(qt, shape=t.layout.matrix_shape)
