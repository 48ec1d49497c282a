"""Hugging Face tensor tables and config fields shared by the architectures (``llmarch.hf``).

Tensor names map through tables (HF name -> llmarch state path, transform): one for the model's
ends, one for the norms every block has, and one per attention kind and per FFN kind, so a new
block kind adds its own rows. ``hf_llama``, ``hf_deepseek`` and ``hf_mixtral`` hold the
architecture-specific tables and config translations and register them here on import
(``llmarch.hf`` imports all three). Our RoPE uses the rotate-half layout of HF Llama, so q/k need
no permutation; DeepSeek fuses some MLA weights (``Part``); MoE checkpoints store one tensor per
expert (``Expert``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from llmarch.config import BlockConfig, ModelConfig, RopeScaling, YarnScaling
from llmarch.model import run_layout

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


@dataclasses.dataclass(frozen=True)
class Expert:
    """Expert ``index`` of our ``[E, ...]`` weight is the HF tensor of that one expert (HF stores
    one tensor per expert, e.g. ``mlp.experts.3.gate_proj.weight [F,D]`` of ``w_gate_edf [E,D,F]``);
    ``inner`` maps the expert's slice."""

    index: int
    inner: Same | Linear

    def hf_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return self.inner.hf_shape(shape)

    def to_hf(self, w: np.ndarray) -> np.ndarray:
        return self.inner.to_hf(w)

    def from_hf(self, w: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        return self.inner.from_hf(w, shape)


Transform = Same | Linear | Part | Expert
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


# A kind's table, or a function (cfg, rope_interleave) -> table where names depend on the config.
ATTENTION_TENSORS: dict[str, dict[str, Rule] | Callable[..., dict[str, Rule | list[Rule]]]] = {
    "mha": {
        "self_attn.q_proj.weight": (("attention", "w_q_dnh", "w"), Linear()),
        "self_attn.k_proj.weight": (("attention", "w_k_dkh", "w"), Linear()),
        "self_attn.v_proj.weight": (("attention", "w_v_dkh", "w"), Linear()),
        "self_attn.o_proj.weight": (("attention", "w_o_nhd", "w"), Linear(in_axes=2)),
    },
}
# MoE tensors are named per architecture (Mixtral's block_sparse_moe.experts.e.w1, DeepSeek's
# mlp.experts.e.gate_proj): architecture -> function (cfg) -> table, registered by hf_mixtral/hf_deepseek.
MOE_TENSORS: dict[str, Callable[[ModelConfig], dict[str, Rule | list[Rule]]]] = {}


def architecture(cfg: ModelConfig) -> str:
    """The transformers ``model_type`` a config exports as: MLA -> deepseek_v3, MoE -> mixtral."""
    if cfg.mla is not None:
        return "deepseek_v3"
    return "mixtral" if any(b.ffn == "moe" for b in cfg.layer_blocks) else "llama"


def _moe_tensors(cfg: ModelConfig) -> dict[str, Rule | list[Rule]]:
    arch = architecture(cfg)
    if arch not in MOE_TENSORS:
        raise ValueError(f"MoE blocks have no Hugging Face mapping for architecture {arch!r}; "
                         f"supported: {sorted(MOE_TENSORS)}")
    return MOE_TENSORS[arch](cfg)


FFN_TENSORS: dict[str, dict[str, Rule] | Callable[[ModelConfig], dict[str, Rule | list[Rule]]]] = {
    "moe": _moe_tensors,
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
    ffn = FFN_TENSORS[kinds.ffn]
    return {**BLOCK_TENSORS, **attention, **(ffn(cfg) if callable(ffn) else ffn)}


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


def _field(hf: Mapping[str, Any], key: str, default: Any, prefix: str) -> Any:
    """``hf[key]``, with JSON null read as absent; required when ``default`` is None."""
    value = hf.get(key)
    if value is not None:
        return value
    if default is None:
        raise ValueError(f"config.json has no {prefix}{key!r}: the model needs it")
    return default


def _int(hf: Mapping[str, Any], key: str, default: int | None = None, *, minimum: int = 1,
         prefix: str = "") -> int:
    """``hf[key]`` as an integer >= ``minimum`` (see ``_field``). A string, a fraction or a bool
    is refused naming the field: ``int("8")`` would hide a broken config, and a zero dimension
    would fail far from here (in a division, or a shape)."""
    value = _field(hf, key, default, prefix)
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # 4096.0, as some tools write it
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        allowed = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ValueError(f"config.json {prefix}{key}={value!r} is invalid: must be {allowed}")
    return value


def _float(hf: Mapping[str, Any], key: str, default: float | None = None, *, prefix: str = "") -> float:
    """``hf[key]`` as a float (see ``_field``); a string or a bool is refused naming the field.
    Ranges are checked by the config dataclasses."""
    value = _field(hf, key, default, prefix)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"config.json {prefix}{key}={value!r} is invalid: must be a finite number")
    return float(value)


def _bool(hf: Mapping[str, Any], key: str, default: bool) -> bool:
    """``hf[key]`` as a bool (JSON null: ``default``); ``"false"`` would read as true, so refused."""
    value = hf.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ValueError(f"config.json {key}={value!r} is invalid: must be true or false")
    return value


def _object(hf: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    """``hf[key]`` as a JSON object, ``{}`` for null or absent."""
    value = hf.get(key)
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ValueError(f"config.json {key}={value!r} is invalid: must be an object or null")
    return value


def _rope(hf: Mapping[str, Any], scaled: str = "llama3") -> tuple[float, RopeScaling | None]:
    """RoPE theta and scaling (of rope_type ``scaled``) from either transformers layout.

    transformers 5 writes ``rope_parameters = {"rope_type", "rope_theta", ...}``; 4.x wrote
    top-level ``rope_theta`` and ``rope_scaling = {"rope_type" (or legacy "type"), ...}``.
    """
    params, scaling = _object(hf, "rope_parameters"), _object(hf, "rope_scaling")
    if params.get("rope_theta") is not None:
        theta = _float(params, "rope_theta", prefix="rope_parameters.")
    else:
        theta = _float(hf, "rope_theta", 10_000.0)
    source = params if "rope_type" in params or "type" in params else scaling
    field = "rope_parameters" if source is params else "rope_scaling"
    kind = source.get("rope_type", source.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind != scaled:
        raise ValueError(f"config.json {field}.rope_type={kind!r} is not supported; "
                         f"allowed: 'default', {scaled!r}")
    if scaled == "yarn":
        return theta, _yarn(source, field, _int(hf, "max_position_embeddings", 4096))
    keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    missing = [k for k in keys if source.get(k) is None]
    if missing:
        raise ValueError(f"config.json {field} (rope_type 'llama3') lacks {missing}")
    at = f"{field}."
    return theta, RopeScaling(
        factor=_float(source, "factor", prefix=at),
        low_freq_factor=_float(source, "low_freq_factor", prefix=at),
        high_freq_factor=_float(source, "high_freq_factor", prefix=at),
        original_max_position_embeddings=_int(source, "original_max_position_embeddings", prefix=at))


def _yarn(source: Mapping[str, Any], field: str, max_positions: int) -> YarnScaling:
    """DeepSeek's YaRN parameters, with transformers' defaults for absent ones."""
    if source.get("factor") is None:
        raise ValueError(f"config.json {field} (rope_type 'yarn') lacks 'factor'")
    for key, allowed in (("attention_factor", None), ("truncate", True)):
        if source.get(key, allowed) != allowed:
            raise ValueError(f"config.json {field}.{key}={source[key]!r} is not supported; "
                             f"allowed: {allowed}")
    at = f"{field}."
    omp = _int(source, "original_max_position_embeddings", max_positions, prefix=at)
    return YarnScaling(
        factor=_float(source, "factor", prefix=at), original_max_position_embeddings=omp,
        beta_fast=_float(source, "beta_fast", 32.0, prefix=at) or 32.0,
        beta_slow=_float(source, "beta_slow", 1.0, prefix=at) or 1.0,
        mscale=_float(source, "mscale", 0.0, prefix=at),
        mscale_all_dim=_float(source, "mscale_all_dim", 0.0, prefix=at))


_ARCHITECTURES = {"llama": "LlamaForCausalLM", "deepseek_v3": "DeepseekV3ForCausalLM",
                  "mixtral": "MixtralForCausalLM"}


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
        vocab_size=_int(hf, "vocab_size"), d_model=_int(hf, "hidden_size"),
        num_layers=_int(hf, "num_hidden_layers"), ffn_dim=_int(hf, "intermediate_size"),
        max_seq_len=_int(hf, "max_position_embeddings", max_positions),
        norm_eps=_float(hf, "rms_norm_eps", 1e-6),  # LlamaConfig's and DeepseekV3's default
        tie_embeddings=_bool(hf, "tie_word_embeddings", False),
        init_std=_float(hf, "initializer_range", 0.02), name=name, **kw)


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
