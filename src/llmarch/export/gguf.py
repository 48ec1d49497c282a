"""GGUF export for llama.cpp: a model's weights, hyperparameters and vocabulary in one file.

The weights come out under their Hugging Face names (``llmarch.hf.to_hf_tensors``, for the
architecture ``cfg`` exports as) and are renamed with the ``gguf`` package's own table
(``gguf.get_tensor_name_map``), as llama.cpp's ``convert_hf_to_gguf.py`` does; the hyperparameters
are read from the ``config.json`` llmarch would write (``llmarch.hf.config_to_hf``) into the
converter's keys, so a file written here is the one the converter would make of
``save_pretrained``'s output. Three changes to the tensors, all the converter's:

- llama.cpp's ``llama`` architecture (Llama and Mixtral) rotates adjacent pairs of a head's
  dimensions (RoPE "normal" type, Meta's original layout), while transformers and llmarch rotate
  its two halves (``llmarch.layers.rope``). So the rows of ``q_proj`` and ``k_proj`` are permuted
  within each head (``rope_pairs_rows``): row j of the first half and row j of the second become
  rows 2j and 2j+1. Queries and keys move together, so scores and logits are unchanged. Qwen3's
  architectures rotate halves (NeoX type): no permutation.
- An MoE layer's per-expert tensors are stacked into one ``[E, out, in]`` tensor per projection.
- Llama-3 RoPE scaling becomes a ``rope_freqs`` tensor: for each frequency, the factor llama.cpp
  divides it by (llmarch's unscaled over its scaled inverse frequencies).

``dtype``: ``"f32"``, ``"f16"``, or ``"q8_0"`` (llama.cpp's blocks of 32 weights along a row with one
float16 scale each, quantized by ``gguf.quants``, bit-exact with ggml's reference quantizer). As in
the converter, norms and other 1-D tensors, the MoE router and ``rope_freqs`` stay F32, and a
matrix whose rows are not whole Q8_0 blocks is written F16 (``GGUFExport.fallbacks`` lists them).

What llama.cpp has no architecture for, or this writer does not map, is refused before anything is
computed: factorized (``llmarch.lowrank``) or quantized (``llmarch.quant``) models, memory layers
(PKM/UltraMem) and skip-layer modules, MLA (llama.cpp's ``deepseek2`` exists, but its tensors are
not mapped here), sliding-window attention, and Llama-3 RoPE scaling on Qwen3 architectures.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from llmarch.config import ModelConfig
from llmarch.export.gguf_vocab import gguf_vocab
from llmarch.hf import architectures, config_to_hf, to_hf_tensors
from llmarch.layers.rope import inverse_frequencies
from llmarch.model import Transformer
from llmarch.quant.targets import is_quantized

log = logging.getLogger(__name__)

DTYPES = ("f32", "f16", "q8_0")
_FILE_TYPES = {
    "f32": gguf.LlamaFileType.ALL_F32,
    "f16": gguf.LlamaFileType.MOSTLY_F16,
    "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
}
_QTYPES = {
    "f32": gguf.GGMLQuantizationType.F32,
    "f16": gguf.GGMLQuantizationType.F16,
    "q8_0": gguf.GGMLQuantizationType.Q8_0,
}
# One routed expert's tensor, e.g. model.layers.3.block_sparse_moe.experts.7.w1.weight (Mixtral) or
# model.layers.3.mlp.experts.7.gate_proj.weight (Qwen3-MoE); stacked under the name without ".7".
_EXPERT = re.compile(r"(?P<stack>model\.layers\.\d+\.\w+\.experts)\.(?P<e>\d+)\.(?P<proj>\w+)\.weight")
_ROPE_FREQS = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"


@dataclasses.dataclass(frozen=True)
class GGUFArchitecture:
    """How one ``llmarch.hf`` architecture is written as a llama.cpp architecture.

    Attributes:
      arch: llama.cpp's architecture (``general.architecture``).
      rope_pairs: llama.cpp rotates adjacent pairs (q/k rows permuted), not halves.
      rope_freqs: llama.cpp reads Llama-3 RoPE scaling from a ``rope_freqs`` tensor.
      all_moe: llama.cpp's architecture has an MoE FFN in every layer and none without.
    """

    arch: gguf.MODEL_ARCH
    rope_pairs: bool
    rope_freqs: bool
    all_moe: bool = False

    @property
    def name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.arch]


# llmarch.hf model_type -> its llama.cpp architecture (convert_hf_to_gguf's choice for that class).
ARCHITECTURES: dict[str, GGUFArchitecture] = {
    "llama": GGUFArchitecture(gguf.MODEL_ARCH.LLAMA, rope_pairs=True, rope_freqs=True),
    "mixtral": GGUFArchitecture(gguf.MODEL_ARCH.LLAMA, rope_pairs=True, rope_freqs=True, all_moe=True),
    "qwen3": GGUFArchitecture(gguf.MODEL_ARCH.QWEN3, rope_pairs=False, rope_freqs=False),
    "qwen3_moe": GGUFArchitecture(gguf.MODEL_ARCH.QWEN3MOE, rope_pairs=False, rope_freqs=False, all_moe=True),
}


@dataclasses.dataclass(frozen=True)
class GGUFExport:
    """What ``write_gguf`` wrote.

    Attributes:
      path: the GGUF file.
      architecture: llama.cpp's architecture name, e.g. ``"llama"``.
      dtype: the requested type (``DTYPES``).
      tensor_types: GGUF tensor name -> its GGML type name (``"F32"``, ``"Q8_0"`` ...), in file order.
      fallbacks: the matrices written F16 under ``"q8_0"`` because a row is not whole Q8_0 blocks.
    """

    path: Path
    architecture: str
    dtype: str
    tensor_types: dict[str, str]
    fallbacks: tuple[str, ...]


def rope_pairs_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """``w [heads·H, ...]`` with each head's rows in halves order (transformers, llmarch) -> pairs
    order (llama.cpp's ``llama``): rows j and H/2+j of a head become its rows 2j and 2j+1."""
    rows = w.shape[0]
    return w.reshape(heads, 2, rows // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def rope_halves_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """The inverse of ``rope_pairs_rows``: a GGUF ``llama`` q/k weight back in halves order."""
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _fail(field: str, value: Any, why: str) -> None:
    raise ValueError(f"{field}={value!r} cannot be written as GGUF: {why}")


def gguf_architecture(model: Transformer, cfg: ModelConfig) -> tuple[GGUFArchitecture, dict[str, Any]]:
    """``(llama.cpp architecture, config.json dict)`` for ``model`` of ``cfg``.

    Raises:
      ValueError: naming the feature llama.cpp (or this writer) cannot represent, or when ``cfg``
        does not describe ``model``.
    """
    if cfg.low_rank is not None:
        _fail(
            "ModelConfig.low_rank",
            f"<{len(cfg.low_rank)} factorized weights>",
            "llama.cpp's architectures hold dense matrices; allowed: None (export the model "
            "before llmarch.lowrank factorizes it)",
        )
    if is_quantized(model):
        _fail(
            "model",
            f"<quantized by llmarch.quant: {getattr(model, 'quant_config', None)}>",
            "GGUF export takes float weights; allowed: the float model, with dtype='q8_0' for "
            "llama.cpp's own 8-bit blocks",
        )
    if cfg.memory is not None or cfg.skip_layers:
        _fail(
            "ModelConfig.memory" if cfg.memory is not None else "ModelConfig.skip_layers",
            cfg.skip_kind or type(cfg.memory).__name__,
            "llama.cpp has no memory layers (PKM/UltraMem) or skip-layer modules; allowed: None",
        )
    if cfg.mla is not None:
        _fail(
            "ModelConfig.mla",
            "<MLAConfig>",
            "multi-head latent attention (DeepSeek) is not mapped to llama.cpp's 'deepseek2' "
            f"tensors by this writer; allowed model types: {sorted(ARCHITECTURES)}",
        )
    if cfg.attention.sliding_window is not None:
        _fail(
            "AttentionConfig.sliding_window",
            cfg.attention.sliding_window,
            "llama.cpp's llama and qwen3 architectures attend to the whole context; allowed: None",
        )
    model_type = architectures.of_config(cfg).model_type
    if model_type not in ARCHITECTURES:
        _fail("architecture", model_type, f"allowed: {sorted(ARCHITECTURES)}")
    spec = ARCHITECTURES[model_type]
    if spec.all_moe and any(b.ffn != "moe" for b in cfg.layer_blocks):
        _fail(
            "ModelConfig.blocks",
            [b.ffn for b in cfg.layer_blocks],
            f"llama.cpp's {spec.name!r} has an MoE FFN in every layer; allowed: ffn 'moe' in every block",
        )
    if spec.all_moe and not cfg.moe.norm_topk:
        _fail(
            "MoEConfig.norm_topk",
            cfg.moe.norm_topk,
            f"llama.cpp's {spec.name!r} always renormalizes the top-k gates to sum 1; allowed: True",
        )
    if cfg.attention.rope_scaling is not None and not spec.rope_freqs:
        _fail(
            "AttentionConfig.rope_scaling",
            cfg.attention.rope_scaling,
            f"llama.cpp's {spec.name!r} has no Llama-3 RoPE scaling; allowed: None",
        )
    hf = config_to_hf(cfg, architecture=model_type)  # raises for what the HF architecture lacks
    if config_to_hf(model.cfg, architecture=model_type) != hf:
        raise ValueError(
            "cfg does not describe model: their Hugging Face configs differ "
            f"(cfg.name={cfg.name!r}, model.cfg.name={model.cfg.name!r})"
        )
    return spec, hf


def _rope_freqs(cfg: ModelConfig) -> np.ndarray:
    """``[H/2]`` factors llama.cpp divides each RoPE frequency by to apply Llama-3 scaling."""
    a = cfg.attention
    plain = inverse_frequencies(a.head_dim, a.rope_theta).astype(np.float64)
    scaled = inverse_frequencies(a.head_dim, a.rope_theta, a.rope_scaling).astype(np.float64)
    return (plain / scaled).astype(np.float32)


def gguf_tensors(model: Transformer, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """The model's weights as float32 arrays under GGUF names, in GGUF's layout (the HF ``[out, in]``
    one, q/k rows permuted for the ``llama`` architecture, experts stacked), in file order."""
    spec, hf = gguf_architecture(model, cfg)
    names = gguf.get_tensor_name_map(spec.arch, cfg.num_layers)

    def gguf_name(hf_name: str) -> str:
        name = names.get_name(hf_name, try_suffixes=(".weight",))
        if name is None:  # a table of llmarch.hf that gguf's map lacks: a bug here, not bad input
            raise ValueError(f"tensor {hf_name} has no GGUF name in llama.cpp's {spec.name!r}")
        return name

    out: dict[str, np.ndarray | None] = {}
    if cfg.attention.rope_scaling is not None:
        out[_ROPE_FREQS] = _rope_freqs(cfg)
    experts: dict[str, dict[int, np.ndarray]] = {}
    for hf_name, w in to_hf_tensors(model, cfg, architecture=hf["model_type"]).items():
        w = np.asarray(w, np.float32)
        if m := _EXPERT.fullmatch(hf_name):
            stacked = gguf_name(f"{m['stack']}.{m['proj']}.weight")
            experts.setdefault(stacked, {})[int(m["e"])] = w
            out.setdefault(stacked, None)  # its place in the file: where its first expert was
            continue
        if spec.rope_pairs and hf_name.endswith("self_attn.q_proj.weight"):
            w = rope_pairs_rows(w, cfg.attention.num_heads)
        elif spec.rope_pairs and hf_name.endswith("self_attn.k_proj.weight"):
            w = rope_pairs_rows(w, cfg.attention.num_kv_heads)
        out[gguf_name(hf_name)] = w
    for name, by_expert in experts.items():
        out[name] = np.stack([by_expert[e] for e in range(len(by_expert))])  # [E, out, in]
    return out  # type: ignore[return-value]  (every None was filled above)


def _tensor_type(name: str, w: np.ndarray, dtype: str) -> gguf.GGMLQuantizationType:
    """The converter's rule: 1-D tensors, norms, the MoE router and ``rope_freqs`` in F32."""
    keep_f32 = w.ndim <= 1 or name.endswith("_norm.weight") or ".ffn_gate_inp." in name
    return gguf.GGMLQuantizationType.F32 if keep_f32 else _QTYPES[dtype]


def _add_hparams(
    writer: gguf.GGUFWriter, cfg: ModelConfig, hf: dict[str, Any], spec: GGUFArchitecture, dtype: str
) -> None:
    """The converter's hyperparameter keys, from the ``config.json`` llmarch would write."""
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(cfg.name)
    writer.add_context_length(hf["max_position_embeddings"])
    writer.add_embedding_length(hf["hidden_size"])
    writer.add_block_count(hf["num_hidden_layers"])
    writer.add_feed_forward_length(hf["intermediate_size"])
    writer.add_head_count(hf["num_attention_heads"])
    writer.add_head_count_kv(hf["num_key_value_heads"])
    writer.add_key_length(hf["head_dim"])
    writer.add_value_length(hf["head_dim"])
    writer.add_rope_dimension_count(hf["head_dim"])
    writer.add_rope_freq_base(float(hf["rope_theta"]))
    writer.add_layer_norm_rms_eps(float(hf["rms_norm_eps"]))
    writer.add_vocab_size(hf["vocab_size"])
    if spec.all_moe:
        writer.add_expert_count(hf.get("num_local_experts", hf.get("num_experts")))
        writer.add_expert_used_count(hf["num_experts_per_tok"])
        if "moe_intermediate_size" in hf:  # Qwen3-MoE: experts narrower than intermediate_size
            writer.add_expert_feed_forward_length(hf["moe_intermediate_size"])
    writer.add_file_type(_FILE_TYPES[dtype])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def write_gguf(
    model: Transformer,
    cfg: ModelConfig,
    tokenizer: Any,
    path: str | os.PathLike,
    *,
    dtype: str = "f32",
    tokenizer_pre: str | None = None,
) -> GGUFExport:
    """Writes ``model`` (of ``cfg``) and ``tokenizer`` as one GGUF file that llama.cpp loads.

    Args:
      model: a float ``Transformer`` of a Llama, Mixtral, Qwen3 or Qwen3-MoE shape (the
        architecture ``cfg`` exports as to Hugging Face, ``llmarch.hf.architectures.of_config``).
      cfg: its config.
      tokenizer: llmarch's ``ByteTokenizer`` or a byte-level ``BPETokenizer`` (``gguf_vocab``).
      path: the file to write (parent directories are made); replaced whole only once written.
      dtype: ``"f32"``, ``"f16"`` or ``"q8_0"`` (see the module docstring).
      tokenizer_pre: llama.cpp's name of a BPE tokenizer's pre-tokenizer, needed only when it is
        not GPT-2's byte-level split (e.g. ``"llama-bpe"``, ``"qwen2"``).
    Returns:
      A ``GGUFExport`` naming every tensor's type.
    Raises:
      ValueError: a dtype outside ``DTYPES``, a model or tokenizer GGUF cannot hold (naming the
        field), or ``cfg`` not describing ``model``; before anything is computed or written.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported for GGUF; allowed: {DTYPES}")
    spec, hf = gguf_architecture(model, cfg)
    vocab = gguf_vocab(tokenizer, cfg.vocab_size, tokenizer_pre)
    tensors = gguf_tensors(model, cfg)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")  # renamed to path only once whole
    writer = gguf.GGUFWriter(str(partial), spec.name)
    _add_hparams(writer, cfg, hf, spec, dtype)
    vocab.add_to(writer)
    types, fallbacks = {}, []
    block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0]
    for name, w in tensors.items():
        qtype = _tensor_type(name, w, dtype)
        if qtype == gguf.GGMLQuantizationType.Q8_0 and w.shape[-1] % block:
            qtype = gguf.GGMLQuantizationType.F16  # the converter's fallback for partial blocks
            fallbacks.append(name)
        writer.add_tensor(name, gguf.quants.quantize(w, qtype), raw_dtype=qtype)
        types[name] = qtype.name
    if fallbacks:
        log.warning("q8_0: rows not a multiple of %d, written F16: %s", block, ", ".join(fallbacks))
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(partial, path)
    except BaseException:
        writer.close()
        partial.unlink(missing_ok=True)
        raise
    return GGUFExport(path, spec.name, dtype, types, tuple(fallbacks))
