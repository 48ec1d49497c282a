"""DeepSeek-V3's published FP8 checkpoint layout: e4m3 weights with 128×128 ``weight_scale_inv`` blocks.

DeepSeek-V3 and R1 are published with ``config.json`` holding

    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "weight_block_size": [128, 128]}

and every quantized linear ``X.weight [out, in]`` stored as float8_e4m3fn beside a float32
``X.weight_scale_inv [ceil(out/128), ceil(in/128)]``: the weight is ``float32(q[i, j]) ·
scale_inv[i // 128, j // 128]``, a last partial block using its block's scale. Quantized are the
decoder layers' attention and FFN linears (``QUANTIZED``: q/kv projections, ``o_proj``, the dense,
shared and routed experts' ``gate/up/down_proj``, the MTP module's ``eh_proj``); the embedding, the
output head, the norms, the MoE router ``mlp.gate.weight`` and its ``e_score_correction_bias`` are
not. transformers reads the same layout as ``FineGrainedFP8Config`` (``quant_method: fp8``).

Loading dequantizes (``Fp8CheckpointTensors``): llmarch keeps float parameters, so the model holds
exactly ``q · scale_inv`` (float32, then the parameter dtype). Saving quantizes
(``quantize_tensors``) with ``llmarch.quant.fp8_blockwise``'s numerics, the ones of DeepSeek-V3's
recipe: per block ``s = max(amax · fl(1/448), 2^-126)``, ``q = e4m3(clip(w · fl(1/s), ±448))``, with
partial blocks zero-padded to 128 (which changes no block's amax) and cropped back.

transformers 5's CPU path (``dequantize=True``, chosen automatically without a GPU) derives the
block from the scale grid (``rows // scale_rows``), which is wrong for partial blocks (DeepSeek-V3's
``kv_a_proj_with_mqa`` has 576 rows): it loads llmarch's FP8 files correctly only where every
quantized dimension is a multiple of 128; its GPU path reads ``weight_block_size``.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from llmarch.hf.files import CheckpointTensors, listed
from llmarch.quant.fp8_blockwise import TILE, quantize_weight_blocks

SCALE_SUFFIX = "_scale_inv"  # X.weight -> X.weight_scale_inv
QUANT_METHOD = "fp8"
FMT = "e4m3"
E4M3 = np.dtype(jnp.float8_e4m3fn)
# The tensors DeepSeek-V3 stores in FP8 (the Llama family's and Mixtral's linears by the same rule).
QUANTIZED = re.compile(
    r"model\.layers\.\d+\.(self_attn\.\w+_proj(_with_mqa)?|eh_proj|"
    r"mlp\.(shared_experts\.|experts\.\d+\.)?(gate|up|down)_proj|block_sparse_moe\.experts\.\d+\.w[123])"
    r"\.weight"
)
_FIELD = "config.json quantization_config"


@dataclasses.dataclass(frozen=True)
class Fp8Format:
    """A checkpoint's FP8 layout: ``block`` is ``weight_block_size`` (rows, columns of ``[out, in]``)."""

    block: tuple[int, int] = (TILE, TILE)

    def hf_config(self) -> dict[str, Any]:
        """``config.json``'s ``quantization_config``, as DeepSeek publishes it."""
        return {
            "activation_scheme": "dynamic",
            "fmt": FMT,
            "quant_method": QUANT_METHOD,
            "weight_block_size": list(self.block),
        }

    def scale_shape(self, shape: tuple[int, ...]) -> tuple[int, int]:
        """``weight_scale_inv``'s shape for a weight ``[out, in]``: one scale per (partial) block."""
        return (-(-shape[0] // self.block[0]), -(-shape[1] // self.block[1]))


def _check(field: str, value: Any, allowed: Any, default: Any) -> None:
    if value is not default and value != allowed:
        raise ValueError(f"{_FIELD}.{field}={value!r} is not supported; allowed: {allowed!r}")


def read_format(hf_config: Mapping[str, Any]) -> Fp8Format | None:
    """The FP8 layout ``config.json`` declares; None for a checkpoint of float weights.

    Raises:
      ValueError: naming the field, for a quantization other than DeepSeek's blockwise FP8 (e4m3,
        dynamic activation scales, float32 scales) or a ``weight_block_size`` that is not two
        positive ints.
    """
    q = hf_config.get("quantization_config")
    if q is None:
        return None
    if not isinstance(q, Mapping):
        raise ValueError(f"{_FIELD}={q!r} is invalid: must be an object with quant_method {QUANT_METHOD!r}")
    _check("quant_method", q.get("quant_method"), QUANT_METHOD, None)
    missing = object()
    _check("fmt", q.get("fmt", missing), FMT, missing)
    _check("activation_scheme", q.get("activation_scheme", missing), "dynamic", missing)
    _check("scale_fmt", q.get("scale_fmt", missing), "float", missing)  # transformers' field (V4: ue8m0)
    _check("expert_dtype", q.get("expert_dtype", missing), "fp8", missing)  # transformers' field (V4: fp4)
    block = q.get("weight_block_size", [TILE, TILE])
    if (
        not isinstance(block, list | tuple)
        or len(block) != 2
        or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)
    ):
        raise ValueError(
            f"{_FIELD}.weight_block_size={block!r} is invalid: must be two positive ints, e.g. [128, 128]"
        )
    return Fp8Format(tuple(block))


def dequantize(q: np.ndarray, scale_inv: np.ndarray, block: tuple[int, int]) -> np.ndarray:
    """float32 ``q [out, in]`` times its block's scale from ``scale_inv [ceil(out/b0), ceil(in/b1)]``:
    the product ``llmarch.quant.fp8_blockwise.dequantize_weight_blocks`` forms, for any block and
    partial blocks."""
    rows, cols = q.shape
    s = np.repeat(np.repeat(scale_inv.astype(np.float32), block[0], 0), block[1], 1)[:rows, :cols]
    with np.errstate(over="ignore", invalid="ignore"):  # the loader reports non-finite results itself
        return q.astype(np.float32) * s


def quantize(w: np.ndarray, block: int = TILE) -> tuple[np.ndarray, np.ndarray]:
    """``(q, scale_inv)``: ``w [out, in]`` as float8_e4m3fn ``[out, in]`` and float32 scales
    ``[ceil(out/block), ceil(in/block)]``, by ``fp8_blockwise.quantize_weight_blocks`` on ``w``
    zero-padded to whole blocks (zeros change no block's amax), cropped back."""
    rows, cols = w.shape
    padded = np.zeros((-(-rows // block) * block, -(-cols // block) * block), np.float32)
    padded[:rows, :cols] = w
    q, s = quantize_weight_blocks(padded, block)
    return np.ascontiguousarray(np.asarray(q)[:rows, :cols]), np.asarray(s, np.float32)


def quantize_tensors(
    tensors: Mapping[str, np.ndarray], fmt: Fp8Format = Fp8Format()
) -> dict[str, np.ndarray]:
    """``tensors`` (HF names and layouts) in the FP8 layout: each ``QUANTIZED`` one as e4m3 followed
    by its ``weight_scale_inv``, the rest as they are."""
    if fmt.block[0] != fmt.block[1]:
        raise ValueError(f"weight_block_size={list(fmt.block)} is not supported for saving; allowed: square")
    out: dict[str, np.ndarray] = {}
    for name, w in tensors.items():
        if QUANTIZED.fullmatch(name) and w.ndim == 2:
            out[name], out[name + SCALE_SUFFIX] = quantize(w, fmt.block[0])
        else:
            out[name] = w
    return out


class Fp8CheckpointTensors(CheckpointTensors):
    """A checkpoint in the FP8 layout, by name: each weight with a ``weight_scale_inv`` is read
    dequantized to float32; the scales are consumed, not listed."""

    def __init__(self, root: Path, files: Mapping[str, Path], fmt: Fp8Format):
        scales = {name for name in files if name.endswith(SCALE_SUFFIX)}
        orphans = sorted(name for name in scales if name.removesuffix(SCALE_SUFFIX) not in files)
        if orphans:
            raise ValueError(f"checkpoint tensors in {root} scale a weight it lacks: {listed(orphans)}")
        super().__init__(root, {name: f for name, f in files.items() if name not in scales})
        self.scales = CheckpointTensors(root, {name: files[name] for name in scales})
        self.fmt = fmt

    def __getitem__(self, name: str) -> np.ndarray:
        w = super().__getitem__(name)
        scale_name = name + SCALE_SUFFIX
        if scale_name not in self.scales:
            if "float8" in w.dtype.name:
                raise ValueError(
                    f"tensor {name} in {self.file(name)} is {w.dtype.name} with no {scale_name}: an FP8 "
                    "weight needs its block scales"
                )
            return w
        if w.dtype != E4M3:
            raise ValueError(
                f"tensor {name} in {self.file(name)} has dtype {w.dtype.name}: quantization_config fmt "
                f"{FMT!r} needs float8_e4m3fn beside {scale_name}"
            )
        if w.ndim != 2:
            raise ValueError(
                f"tensor {name} in {self.file(name)} has shape {w.shape}: FP8 weights are 2-D [out, in]"
            )
        scale = self.scales[scale_name]
        need = self.fmt.scale_shape(w.shape)
        where = self.scales.file(scale_name)
        if scale.shape != need:
            raise ValueError(
                f"tensor {scale_name} has shape {scale.shape} in {where}: weight {name} {w.shape} in "
                f"{self.fmt.block[0]}x{self.fmt.block[1]} blocks needs {need}"
            )
        if scale.dtype.kind != "f" and scale.dtype != np.dtype(jnp.bfloat16):
            raise ValueError(f"tensor {scale_name} in {where} has dtype {scale.dtype.name}: must be float32")
        scale = scale.astype(np.float32)
        if not np.all(np.isfinite(scale)) or np.any(scale < 0):
            bad = np.argwhere(~np.isfinite(scale) | (scale < 0))[0]
            raise ValueError(
                f"tensor {scale_name} in {where} holds {scale[tuple(bad)]} at block "
                f"{tuple(int(i) for i in bad)}: block scales must be finite and >= 0"
            )
        out = dequantize(w, scale, self.fmt.block)
        if not np.all(np.isfinite(out)):  # e4m3's NaN bytes (0x7F, 0xFF), or a scale that overflows
            bad = np.argwhere(~np.isfinite(out))[0]
            block = tuple(int(i) // b for i, b in zip(bad, self.fmt.block, strict=True))
            raise ValueError(
                f"tensor {name} in {self.file(name)} dequantizes to {out[tuple(bad)]} at "
                f"{tuple(int(i) for i in bad)} (block {block}): weights must be finite"
            )
        return out


def checkpoint_tensors(root: Path, files: Mapping[str, Path], fmt: Fp8Format | None) -> CheckpointTensors:
    """A checkpoint's tensors by name: dequantized as read when ``config.json`` declares ``fmt``.

    Raises:
      ValueError: for block scales in a checkpoint whose ``config.json`` has no quantization_config.
    """
    if fmt is not None:
        return Fp8CheckpointTensors(root, files, fmt)
    scales = sorted(name for name in files if name.endswith(SCALE_SUFFIX))
    if scales:
        raise ValueError(
            f"checkpoint tensors in {root} are FP8 block scales ({listed(scales, 3)}) but its config.json "
            f"has no quantization_config: add {Fp8Format().hf_config()}"
        )
    return CheckpointTensors(root, files)
