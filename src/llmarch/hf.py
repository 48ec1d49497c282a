"""Hugging Face Llama and DeepSeek-V3 checkpoints: ``config.json`` plus safetensors weights.

``load_pretrained(dir)`` reads what transformers' ``LlamaForCausalLM.save_pretrained`` (or
``DeepseekV3ForCausalLM``'s with all layers dense: MLA + SwiGLU) wrote (one ``model.safetensors``
or shards with ``model.safetensors.index.json``); ``save_pretrained`` writes a directory that
``from_pretrained`` of the same class loads. transformers is not needed.

Tensor names map through tables (HF name -> llmarch state path, transform): one for the model's
ends, one for the norms every block has, and one per attention kind and per FFN kind, so a new
block kind (MLA, MoE) adds its own rows. Our RoPE uses the rotate-half layout of HF Llama, so
q/k need no permutation. DeepSeek fuses some MLA weights (``Part``) and with ``rope_interleave``
stores RoPE columns in interleaved pairs: permuted to rotate-half on import, back on export.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx
from flax.core import spmd as flax_spmd
from safetensors import safe_open
from safetensors.numpy import save_file

from llmarch import sharding
from llmarch.config import (
    DTYPES,
    AttentionConfig,
    BlockConfig,
    MLAConfig,
    ModelConfig,
    RopeScaling,
    YarnScaling,
)
from llmarch.model import Transformer, run_layout

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
SHARD_FILE = "model-{:05d}-of-{:05d}.safetensors"
_SHARD_PATTERN = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
# Old checkpoints carry RoPE's inverse frequencies as buffers; we recompute them from the config.
_IGNORED = re.compile(r".*\.rotary_emb\.inv_freq")
_ACTIVATIONS = ("silu", "swish")  # the same function under two names in transformers

# Transforms between our weight layout and the HF (torch) one -------------------------------


@dataclasses.dataclass(frozen=True)
class Same:
    """Stored identically on both sides: norm scales, the embedding table ``[V,D]``."""

    def hf_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return shape

    def to_hf(self, w: np.ndarray) -> np.ndarray:
        return w

    def from_hf(self, w: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        return w


@dataclasses.dataclass(frozen=True)
class Linear:
    """A torch ``nn.Linear`` weight ``[out, in]`` against our einsum weight ``[*in, *out]``.

    ``in_axes`` is how many leading axes of ours are contracted with the input: 1 for
    ``w_q_dnh [D,N,H]`` (HF ``[N*H, D]``), 2 for ``w_o_nhd [N,H,D]`` (HF ``[D, N*H]``).
    """

    in_axes: int = 1

    def hf_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return (math.prod(shape[self.in_axes:]), math.prod(shape[: self.in_axes]))

    def to_hf(self, w: np.ndarray) -> np.ndarray:
        return w.reshape(math.prod(w.shape[: self.in_axes]), -1).T  # [out, in]

    def from_hf(self, w: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        return w.T.reshape(shape)


@dataclasses.dataclass(frozen=True)
class Part:
    """Our ``[in, *heads, sizes[index]]`` weight as a slice of a fused HF linear ``[(*heads, sum(sizes)),
    in]``, e.g. ``w_uk_anh [A,N,H]`` and ``w_uv_anh [A,N,H_v]`` in ``kv_b_proj [N*(H+H_v), A]``.
    ``interleave``: HF holds the slice's RoPE pairs as ``(x0,x1),(x2,x3)..``, we rotate halves."""

    sizes: tuple[int, ...]
    index: int
    interleave: bool = False

    def hf_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return (math.prod(shape[1:-1]) * sum(self.sizes), shape[0])

    def _order(self, n: int) -> np.ndarray:  # our column j is HF column order[j]
        return np.r_[0:n:2, 1:n:2] if self.interleave else np.arange(n)

    def from_hf(self, w: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        start = sum(self.sizes[: self.index])
        full = w.T.reshape(*shape[:-1], sum(self.sizes))  # [in, *heads, sum(sizes)]
        return full[..., start:start + shape[-1]][..., self._order(shape[-1])]

    def to_hf_slice(self, w: np.ndarray) -> np.ndarray:
        """Our weight in HF column order; ``to_hf_tensors`` concatenates the slices."""
        return w[..., np.argsort(self._order(w.shape[-1]))]


Transform = Same | Linear | Part
Rule = tuple[tuple[str, ...], Transform]  # (llmarch state path, transform)

LM_HEAD = "lm_head.weight"
MODEL_TENSORS: dict[str, Rule] = {
    "model.embed_tokens.weight": (("embed", "table_vd"), Same()),
    "model.norm.weight": (("final_norm", "scale"), Same()),
    LM_HEAD: (("lm_head", "w"), Linear()),  # [V,D] vs [D,V]; absent with tied embeddings
}
LAYER_PREFIX = "model.layers.{}."
# Below: names after LAYER_PREFIX -> path inside one block (the run adds the layers axis).
BLOCK_TENSORS: dict[str, Rule] = {
    "input_layernorm.weight": (("attn_norm", "scale"), Same()),
    "post_attention_layernorm.weight": (("ffn_norm", "scale"), Same()),
}


def mla_tensors(cfg: ModelConfig, rope_interleave: bool = True) -> dict[str, Rule | list[Rule]]:
    """transformers ``DeepseekV3Attention``'s tensors for ``cfg.mla``; a fused one maps to a list."""
    m = cfg.mla
    H, R, Hv, A = m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim, m.kv_lora_rank

    def at(name: str) -> tuple[str, ...]:
        return ("attention", name, "w")

    qk = [(at("w_uq_qnh" if m.q_lora_rank else "w_q_dnh"), Part((H, R), 0)),
          (at("w_qr_qnr" if m.q_lora_rank else "w_qr_dnr"), Part((H, R), 1, rope_interleave))]
    q = {"self_attn.q_proj.weight": qk} if m.q_lora_rank is None else {
        "self_attn.q_a_proj.weight": (at("w_dq_dq"), Linear()),
        "self_attn.q_a_layernorm.weight": (("attention", "q_norm", "scale"), Same()),
        "self_attn.q_b_proj.weight": qk}
    return {**q,
            "self_attn.kv_a_proj_with_mqa.weight": [(at("w_dkv_da"), Part((A, R), 0)),
                                                    (at("w_kr_dr"), Part((A, R), 1, rope_interleave))],
            "self_attn.kv_a_layernorm.weight": (("attention", "kv_norm", "scale"), Same()),
            "self_attn.kv_b_proj.weight": [(at("w_uk_anh"), Part((H, Hv), 0)),
                                           (at("w_uv_anh"), Part((H, Hv), 1))],
            "self_attn.o_proj.weight": (at("w_o_nhd"), Linear(in_axes=2))}


# A kind's table, or a function (cfg, rope_interleave) -> table where names depend on the config.
ATTENTION_TENSORS: dict[str, dict[str, Rule] | Callable[..., dict[str, Rule | list[Rule]]]] = {
    "mla": mla_tensors,
    "mha": {
        "self_attn.q_proj.weight": (("attention", "w_q_dnh", "w"), Linear()),
        "self_attn.k_proj.weight": (("attention", "w_k_dkh", "w"), Linear()),
        "self_attn.v_proj.weight": (("attention", "w_v_dkh", "w"), Linear()),
        "self_attn.o_proj.weight": (("attention", "w_o_nhd", "w"), Linear(in_axes=2)),
    },
}
FFN_TENSORS: dict[str, dict[str, Rule]] = {
    "swiglu": {
        "mlp.gate_proj.weight": (("ffn", "w_gate_df", "w"), Linear()),
        "mlp.up_proj.weight": (("ffn", "w_up_df", "w"), Linear()),
        "mlp.down_proj.weight": (("ffn", "w_down_fd", "w"), Linear()),
    },
}


def block_tensors(kinds: BlockConfig, cfg: ModelConfig,
                  rope_interleave: bool = True) -> dict[str, Rule | list[Rule]]:
    """The HF tensors of one block of ``kinds`` (of ``cfg``), by name after ``LAYER_PREFIX``."""
    if kinds.attention not in ATTENTION_TENSORS:
        raise ValueError(f"BlockConfig.attention={kinds.attention!r} has no Hugging Face mapping; "
                         f"supported: {sorted(ATTENTION_TENSORS)}")
    if kinds.ffn not in FFN_TENSORS:
        raise ValueError(f"BlockConfig.ffn={kinds.ffn!r} has no Hugging Face mapping; "
                         f"supported: {sorted(FFN_TENSORS)}")
    attention = ATTENTION_TENSORS[kinds.attention]
    attention = attention(cfg, rope_interleave) if callable(attention) else attention
    return {**BLOCK_TENSORS, **attention, **FFN_TENSORS[kinds.ffn]}


@dataclasses.dataclass(frozen=True)
class Entry:
    """One HF tensor: ``layer`` indexes the run's stacked layers axis (None: not stacked)."""

    name: str
    path: tuple[str | int, ...]
    layer: int | None
    transform: Transform


def tensor_plan(cfg: ModelConfig, rope_interleave: bool = True) -> list[Entry]:
    """Every HF tensor of a model of ``cfg`` (fused ones once per ``Part``) and where it lives."""
    plan = [Entry(name, path, None, t) for name, (path, t) in MODEL_TENSORS.items()
            if not (name == LM_HEAD and cfg.tie_embeddings)]
    if cfg.skip_layers:
        raise ValueError(f"ModelConfig.skip_layers={cfg.skip_layers} has no Hugging Face equivalent; "
                         "allowed: ()")
    for r, (kinds, first, count) in enumerate(run_layout(cfg)):
        table = block_tensors(kinds, cfg, rope_interleave)
        for j in range(count):
            prefix = LAYER_PREFIX.format(first + j)
            plan += [Entry(prefix + suffix, ("runs", r, "layers", *sub), j, t)
                     for suffix, rules in table.items()
                     for sub, t in (rules if isinstance(rules, list) else [rules])]
    return plan


# Configs --------------------------------------------------------------------------------


def _get(hf: Mapping[str, Any], key: str, default: Any = None) -> Any:
    """``hf[key]``, with JSON null read as absent; required when ``default`` is None."""
    value = hf.get(key)
    if value is not None:
        return value
    if default is None:
        raise ValueError(f"config.json has no {key!r}: the model needs it")
    return default


def _rope(hf: Mapping[str, Any], scaled: str = "llama3") -> tuple[float, RopeScaling | None]:
    """RoPE theta and scaling (of rope_type ``scaled``) from either transformers layout.

    transformers 5 writes ``rope_parameters = {"rope_type", "rope_theta", ...}``; 4.x wrote
    top-level ``rope_theta`` and ``rope_scaling = {"rope_type" (or legacy "type"), ...}``.
    """
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    theta = float(params.get("rope_theta") or hf.get("rope_theta") or 10_000.0)
    source = params if "rope_type" in params or "type" in params else scaling
    field = "rope_parameters" if source is params else "rope_scaling"
    kind = source.get("rope_type", source.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind != scaled:
        raise ValueError(f"config.json {field}.rope_type={kind!r} is not supported; "
                         f"allowed: 'default', {scaled!r}")
    if scaled == "yarn":
        return theta, _yarn(source, field, int(_get(hf, "max_position_embeddings", 4096)))
    keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    missing = [k for k in keys if source.get(k) is None]
    if missing:
        raise ValueError(f"config.json {field} (rope_type 'llama3') lacks {missing}")
    return theta, RopeScaling(
        factor=float(source["factor"]), low_freq_factor=float(source["low_freq_factor"]),
        high_freq_factor=float(source["high_freq_factor"]),
        original_max_position_embeddings=int(source["original_max_position_embeddings"]))


def _yarn(source: Mapping[str, Any], field: str, max_positions: int) -> YarnScaling:
    """DeepSeek's YaRN parameters, with transformers' defaults for absent ones."""
    if source.get("factor") is None:
        raise ValueError(f"config.json {field} (rope_type 'yarn') lacks 'factor'")
    for key, allowed in (("attention_factor", None), ("truncate", True)):
        if source.get(key, allowed) != allowed:
            raise ValueError(f"config.json {field}.{key}={source[key]!r} is not supported; "
                             f"allowed: {allowed}")
    omp = int(source.get("original_max_position_embeddings") or max_positions)
    return YarnScaling(
        factor=float(source["factor"]), original_max_position_embeddings=omp,
        beta_fast=float(source.get("beta_fast") or 32), beta_slow=float(source.get("beta_slow") or 1),
        mscale=float(source.get("mscale") or 0), mscale_all_dim=float(source.get("mscale_all_dim") or 0))


_ARCHITECTURES = {"llama": "LlamaForCausalLM", "deepseek_v3": "DeepseekV3ForCausalLM"}


def _model_type(hf: Mapping[str, Any]) -> str:
    kind, archs = hf.get("model_type"), hf.get("architectures") or []
    for name, arch in _ARCHITECTURES.items():
        if kind == name or (kind is None and arch in archs):
            return name
    raise ValueError(f"config.json model_type={kind!r} (architectures={archs}) is not supported; "
                     f"allowed: {', '.join(f'{k!r} ({a})' for k, a in _ARCHITECTURES.items())}")


def _check_llama(hf: Mapping[str, Any]) -> None:
    for field in ("attention_bias", "mlp_bias"):
        if hf.get(field):
            raise ValueError(f"config.json {field}={hf[field]!r} is not supported: llmarch "
                             "projections have no bias; allowed: false")
    act = hf.get("hidden_act", "silu")
    if act not in _ACTIVATIONS:
        raise ValueError(f"config.json hidden_act={act!r} is not supported; "
                         f"allowed: {_ACTIVATIONS}")


def _model_from_hf(hf: Mapping[str, Any], name: str, max_positions: int, **kw: Any) -> ModelConfig:
    return ModelConfig(
        vocab_size=int(_get(hf, "vocab_size")), d_model=int(_get(hf, "hidden_size")),
        num_layers=int(_get(hf, "num_hidden_layers")), ffn_dim=int(_get(hf, "intermediate_size")),
        max_seq_len=int(_get(hf, "max_position_embeddings", max_positions)),
        norm_eps=float(_get(hf, "rms_norm_eps", 1e-6)),  # LlamaConfig's and DeepseekV3's default
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        init_std=float(_get(hf, "initializer_range", 0.02)), name=name, **kw)


def _deepseek_from_hf(hf: Mapping[str, Any], name: str) -> ModelConfig:
    """A DeepseekV3 config whose layers are all dense: every block MLA + SwiGLU."""
    _check_llama(hf)  # the same bias and activation checks
    layers = int(_get(hf, "num_hidden_layers"))
    dense = 3 if hf.get("first_k_dense_replace") is None else int(hf["first_k_dense_replace"])
    if dense < layers:  # 3: DeepseekV3Config's default
        raise ValueError(f"config.json first_k_dense_replace={dense} is not supported: layers "
                         f"{dense}..{layers - 1} are MoE, which llmarch cannot load yet; "
                         f"allowed: >= num_hidden_layers={layers}")
    heads = int(_get(hf, "num_attention_heads"))
    if int(hf.get("num_key_value_heads") or heads) != heads:
        raise ValueError(f"config.json num_key_value_heads={hf['num_key_value_heads']!r} is not "
                         f"supported; allowed: num_attention_heads={heads}")
    theta, yarn = _rope(hf, scaled="yarn")
    q_rank = hf.get("q_lora_rank")
    mla = MLAConfig(num_heads=heads, q_lora_rank=None if q_rank is None else int(q_rank),
                    **{k: int(_get(hf, k)) for k in ("kv_lora_rank", "qk_nope_head_dim",
                                                     "qk_rope_head_dim", "v_head_dim")},
                    rope_theta=theta, rope_scaling=yarn)
    return _model_from_hf(hf, name, 4096, attention=mla.mha_baseline(), mla=mla,
                          blocks=(BlockConfig(attention="mla"),) * layers)


def config_from_hf(hf: Mapping[str, Any], *, name: str = "hf") -> ModelConfig:
    """The ModelConfig of a transformers Llama or (all-dense) DeepseekV3 ``config.json`` dict.

    Raises:
      ValueError: naming the field, for a model type or feature that llmarch cannot run.
    """
    if _model_type(hf) == "deepseek_v3":
        return _deepseek_from_hf(hf, name)
    _check_llama(hf)
    heads = int(_get(hf, "num_attention_heads"))
    theta, scaling = _rope(hf)
    attention = AttentionConfig(
        num_heads=heads, num_kv_heads=int(_get(hf, "num_key_value_heads", heads)),
        head_dim=int(_get(hf, "head_dim", int(_get(hf, "hidden_size")) // heads)), rope_theta=theta,
        rope_scaling=scaling)
    return _model_from_hf(hf, name, 2048, attention=attention)


def _model_to_hf(cfg: ModelConfig, arch: str, scaling: dict[str, Any] | None, theta: float,
                 **fields: Any) -> dict[str, Any]:
    return {
        "architectures": [_ARCHITECTURES[arch]], "model_type": arch,
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.num_layers, **fields, "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
        "initializer_range": cfg.init_std, "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": False,
        # transformers 5 reads rope_parameters; 4.x reads rope_theta and rope_scaling.
        "rope_parameters": {"rope_type": "default", **(scaling or {}), "rope_theta": theta},
        "rope_theta": theta, "rope_scaling": scaling,
        "dtype": cfg.param_dtype,  # the dtype the weights are stored in
    }


def _deepseek_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    m, s = cfg.mla, cfg.mla.rope_scaling
    if any(b.attention != "mla" for b in cfg.layer_blocks):
        raise ValueError("ModelConfig.blocks mix 'mla' with other attention kinds: no Hugging Face "
                         "architecture has that; allowed for export: all 'mla' or all 'mha'")
    for kinds in cfg.layer_blocks:
        block_tensors(kinds, cfg)  # raises for FFN kinds without a mapping
    yarn = None if s is None else {
        "rope_type": "yarn", "factor": s.factor, "beta_fast": s.beta_fast, "beta_slow": s.beta_slow,
        "mscale": s.mscale, "mscale_all_dim": s.mscale_all_dim,
        "original_max_position_embeddings": s.original_max_position_embeddings}
    return _model_to_hf(
        cfg, "deepseek_v3", yarn, m.rope_theta, first_k_dense_replace=cfg.num_layers,
        num_nextn_predict_layers=0, num_attention_heads=m.num_heads, num_key_value_heads=m.num_heads,
        q_lora_rank=m.q_lora_rank, kv_lora_rank=m.kv_lora_rank, qk_nope_head_dim=m.qk_nope_head_dim,
        qk_rope_head_dim=m.qk_rope_head_dim, v_head_dim=m.v_head_dim,
        rope_interleave=True)  # to_hf_tensors writes the RoPE columns interleaved


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """A ``config.json`` dict that transformers 4.56+ and 5 read as a LlamaForCausalLM, or (for
    an all-MLA model) as a DeepseekV3ForCausalLM whose layers are all dense."""
    if cfg.mla is not None:
        return _deepseek_to_hf(cfg)
    if cfg.attention.sliding_window is not None:
        raise ValueError(f"AttentionConfig.sliding_window={cfg.attention.sliding_window} has no "
                         "Llama equivalent; allowed for export: None")
    for kinds in cfg.layer_blocks:
        block_tensors(kinds, cfg)  # raises for block kinds without a mapping
    a = cfg.attention
    s = a.rope_scaling
    scaling = None if s is None else {
        "rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
        "high_freq_factor": s.high_freq_factor,
        "original_max_position_embeddings": s.original_max_position_embeddings}
    return _model_to_hf(cfg, "llama", scaling, a.rope_theta, num_attention_heads=a.num_heads,
                        num_key_value_heads=a.num_kv_heads, head_dim=a.head_dim, mlp_bias=False)


# Tensors <-> model ----------------------------------------------------------------------


def _listed(names: list[str], limit: int = 12) -> str:
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def to_hf_tensors(model: Transformer, cfg: ModelConfig | None = None) -> dict[str, np.ndarray]:
    """The model's weights as contiguous numpy arrays under HF Llama names (HF layouts)."""
    cfg = model.cfg if cfg is None else cfg
    flat = dict(nnx.to_flat_state(nnx.state(model)))
    plan = tensor_plan(cfg)
    unmapped = sorted(".".join(map(str, p)) for p in set(flat) - {e.path for e in plan})
    if unmapped:
        raise ValueError(f"model variables with no HF tensor name: {_listed(unmapped)}")
    host: dict[tuple, np.ndarray] = {}  # each stacked variable is fetched once
    out, slices = {}, {}
    for e in plan:
        if e.path not in flat:
            raise ValueError(f"{e.name}: the model has no variable {e.path} (does cfg match it?)")
        if e.path not in host:
            host[e.path] = np.asarray(jax.device_get(flat[e.path].get_value()))
        w = host[e.path] if e.layer is None else host[e.path][e.layer]
        if isinstance(e.transform, Part):
            slices.setdefault(e.name, {})[e.transform.index] = e.transform.to_hf_slice(w)
        else:
            out[e.name] = np.ascontiguousarray(e.transform.to_hf(w))
    for name, parts in slices.items():  # fused: [in, *heads, sum(sizes)] -> [out, in]
        full = np.concatenate([parts[i] for i in sorted(parts)], axis=-1)
        out[name] = np.ascontiguousarray(full.reshape(full.shape[0], -1).T)
    return out


def from_hf_tensors(tensors: Mapping[str, Any], cfg: ModelConfig, *,
                    rope_interleave: bool = True) -> Transformer:
    """A model of ``cfg`` holding ``tensors`` (HF names and layouts), with no random init.

    ``tensors`` may be lazy (read on access). Under ``llmarch.sharding.use(mesh, rules)`` the
    parameters are placed sharded; otherwise on the default device. ``rope_interleave``: the
    DeepSeek checkpoint's flag.

    Raises:
      ValueError: listing missing and unexpected tensor names, or naming a wrong shape.
    """
    plan = tensor_plan(cfg, rope_interleave)
    present = {k for k in tensors if not _IGNORED.fullmatch(k)}
    expected = {e.name for e in plan}
    missing, unexpected = sorted(expected - present), sorted(present - expected)
    if missing or unexpected:
        raise ValueError(f"checkpoint tensors do not match the config: missing "
                         f"[{_listed(missing)}]; unexpected [{_listed(unexpected)}]")
    # Eager sharding off: shapes only here (Transformer's own mesh checks cannot run traced);
    # _place shards the filled state by the same logical names.
    with nnx.use_eager_sharding(False):
        abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    variables = dict(nnx.to_flat_state(state))  # path -> Variable of a ShapeDtypeStruct
    values: dict[tuple, np.ndarray] = {}
    for e in plan:
        target = variables[e.path].get_value()
        shape = tuple(target.shape) if e.layer is None else tuple(target.shape[1:])
        w = np.asarray(tensors[e.name])
        if w.shape != e.transform.hf_shape(shape):
            raise ValueError(f"tensor {e.name} has shape {w.shape}: the config needs "
                             f"{e.transform.hf_shape(shape)}")
        w = e.transform.from_hf(w, shape).astype(target.dtype)
        if e.layer is None:
            values[e.path] = w
        else:  # fill the run's stack in place: no second copy of the layers
            values.setdefault(e.path, np.empty(target.shape, target.dtype))[e.layer] = w
    unfilled = sorted(".".join(map(str, p)) for p in set(variables) - set(values))
    if unfilled:
        raise ValueError(f"model variables with no HF tensor: {_listed(unfilled)}")
    state = nnx.from_flat_state([(p, v.replace(values[p])) for p, v in variables.items()])
    return nnx.merge(graphdef, _place(state))


def _place(state: nnx.State) -> nnx.State:
    mesh, rules = jax.sharding.get_abstract_mesh(), tuple(flax_spmd.get_logical_axis_rules())
    if mesh.empty or not rules:
        return jax.device_put(state)
    return sharding.shard_state(state, jax.sharding.get_mesh(), rules)


# Files ----------------------------------------------------------------------------------


class _CheckpointTensors(Mapping[str, np.ndarray]):
    """A checkpoint's tensors by name, each read from its file only when asked for."""

    def __init__(self, files: Mapping[str, Path]):
        self._files = dict(files)  # tensor name -> safetensors file

    def __getitem__(self, name: str) -> np.ndarray:
        # numpy cannot read bfloat16 from safetensors, flax can; reading onto the CPU keeps
        # the whole checkpoint off the accelerator until the final (maybe sharded) placement.
        with jax.default_device(jax.devices("cpu")[0]):
            with safe_open(self._files[name], framework="flax") as f:
                return np.asarray(f.get_tensor(name))

    def __iter__(self) -> Iterator[str]:
        return iter(self._files)

    def __len__(self) -> int:
        return len(self._files)


def _weight_files(root: Path) -> dict[str, Path]:
    """Tensor name -> file, from the shard index or the single weights file."""
    index = root / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index} has no 'weight_map' object")
        absent = sorted({f for f in weight_map.values() if not (root / f).is_file()})
        if absent:
            raise FileNotFoundError(f"{index} lists shards that do not exist: {_listed(absent)}")
        return {name: root / f for name, f in weight_map.items()}
    single = root / WEIGHTS_FILE
    if not single.is_file():
        raise FileNotFoundError(f"{root} has neither {WEIGHTS_FILE} nor {INDEX_FILE}; only "
                                "safetensors checkpoints are supported")
    with safe_open(single, framework="numpy") as f:
        return {name: single for name in f.keys()}


def _dtype_name(dtype: Any) -> str:
    name = np.dtype(jax.numpy.dtype(dtype)).name
    if name not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported; allowed: {DTYPES}")
    return name


def load_pretrained(path: str | os.PathLike, *,
                    dtype: Any = None) -> tuple[Transformer, ModelConfig]:
    """Loads a Hugging Face Llama or (all-dense) DeepSeek-V3 checkpoint directory.

    Args:
      path: a directory with ``config.json`` and ``model.safetensors`` (or its shards and
        ``model.safetensors.index.json``).
      dtype: dtype of the parameters and of the computation, e.g. ``"bfloat16"``; None keeps
        both float32 (whatever the checkpoint's dtype), as DESIGN.md's numerics ask.
    Returns:
      ``(model, cfg)``.
    Raises:
      FileNotFoundError: for a missing directory, config or weights file.
      ValueError: for an unsupported config, or tensors that do not match it.
    """
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"checkpoint directory {str(root)!r} does not exist")
    config_path = root / CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} does not exist: a checkpoint needs {CONFIG_FILE}")
    hf_config = json.loads(config_path.read_text())
    cfg = config_from_hf(hf_config, name=root.resolve().name)
    if dtype is not None:
        cfg = cfg.replace(dtype=_dtype_name(dtype), param_dtype=_dtype_name(dtype))
    interleave = hf_config.get("rope_interleave")  # DeepseekV3Config's default is True
    return from_hf_tensors(_CheckpointTensors(_weight_files(root)), cfg,
                           rope_interleave=interleave is None or bool(interleave)), cfg


def _shards(tensors: Mapping[str, np.ndarray], max_bytes: int) -> list[dict[str, np.ndarray]]:
    """Consecutive groups of at most ``max_bytes`` (a larger tensor gets a shard of its own)."""
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, w in tensors.items():
        if shards[-1] and size + w.nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = w
        size += w.nbytes
    return shards


def save_pretrained(model: Transformer, cfg: ModelConfig, path: str | os.PathLike, *,
                    max_shard_bytes: int = 5 * 10**9) -> None:
    """Writes ``config.json`` and safetensors weights that transformers' Llama (DeepseekV3 for an
    MLA model) loads.

    Over ``max_shard_bytes`` the weights are split into ``model-0000i-of-0000n.safetensors``
    with a ``model.safetensors.index.json``. Weight files left by an earlier save in ``path``
    are removed first, so that a stale index cannot shadow the new weights.
    """
    if isinstance(max_shard_bytes, bool) or not isinstance(max_shard_bytes, int) \
            or max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes={max_shard_bytes!r} is invalid: must be a positive int")
    hf_config = config_to_hf(cfg)
    if config_to_hf(model.cfg) != hf_config:
        raise ValueError("cfg does not describe model: their Hugging Face configs differ "
                         f"(cfg.name={cfg.name!r}, model.cfg.name={model.cfg.name!r})")
    tensors = to_hf_tensors(model, cfg)
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    for old in root.iterdir():
        if old.name in (WEIGHTS_FILE, INDEX_FILE) or _SHARD_PATTERN.fullmatch(old.name):
            old.unlink()
    (root / CONFIG_FILE).write_text(json.dumps(hf_config, indent=2) + "\n")
    metadata = {"format": "pt"}  # what transformers writes and checks: torch [out, in] layouts
    shards = _shards(tensors, max_shard_bytes)
    if len(shards) == 1:
        save_file(tensors, root / WEIGHTS_FILE, metadata=metadata)
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        file = SHARD_FILE.format(i + 1, len(shards))
        save_file(shard, root / file, metadata=metadata)
        weight_map.update(dict.fromkeys(shard, file))
    index = {"metadata": {"total_size": sum(w.nbytes for w in tensors.values())},
             "weight_map": weight_map}
    (root / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
