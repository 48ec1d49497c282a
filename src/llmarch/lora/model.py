"""A ``Transformer`` with adapters on its linear weights, its split for training, and the merge back.

``apply_lora(model, lcfg, rngs=...)`` returns a copy of a plain (float) model whose targeted
``Einsum`` weights are ``LoRAEinsum`` (with ``lcfg.base_quant``: every linear weight quantized
first, the targeted ones ``QLoRAEinsum``). Which weights are linears, and which of their axes the
input contracts, is ``llmarch.quant.targets``' tracing of one forward pass: the same weights that
quantization and low-rank factorization see.

``split(model)`` is ``(graphdef, adapters, frozen, rest)``: the ``nnx.LoRAParam`` adapters (what
the optimizer sees), the frozen base (every other ``nnx.Param`` and the quantized weights'
``QuantParam``), and the remaining state (e.g. the MoE expert bias, the adapters' dropout seeds).

``merge_lora(model)`` is the plain model again, each adapted weight replaced by
``W + (alpha/r)·A·B`` (a QLoRA base dequantized first, every other quantized weight too): a model
that ``llmarch.hf.save_pretrained``, the ``Engine`` and every reader of plain checkpoints take.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from llmarch import axes
from llmarch.layers.einsum import Einsum
from llmarch.lora.config import LoraConfig
from llmarch.lora.layer import LoRAEinsum, QLoRAEinsum
from llmarch.lowrank.layer import LowRankEinsum, install, locate
from llmarch.quant.config import QuantConfig
from llmarch.quant.linear import QuantizedEinsum, QuantParam
from llmarch.quant.targets import is_quantized, linears

ADAPTERS = nnx.LoRAParam
FROZEN = nnx.Any(nnx.Param, QuantParam)  # after ADAPTERS in a split: the base's weights
_SEED_STRIDE = 1 << 16  # dropout seeds: weight i's layers take i·stride + 0, 1, ...


def role(path: str) -> str:
    """The role of the weight at ``path`` (``".../attention/w_q_dnh"`` -> ``"q"``, ``"lm_head"``)."""
    name = path.rsplit("/", 1)[-1]
    if name == "lm_head" or not name.startswith("w_") or name.count("_") < 2:
        return name
    return name[2:].rsplit("_", 1)[0]


def is_adapted(model: nnx.Module) -> bool:
    return any(isinstance(m, LoRAEinsum | QLoRAEinsum) for _, m in nnx.iter_modules(model))


def apply_lora(model: nnx.Module, lcfg: LoraConfig, *, rngs: nnx.Rngs) -> nnx.Module:
    """A copy of the plain ``Transformer`` ``model`` with adapters on the weights ``lcfg`` targets.

    Raises:
      ValueError: a model already adapted, quantized or factorized; targets that name no weight of
        this model (naming the roles it has); a rank above some weight's ``min(K, N)``.
    """
    if not isinstance(lcfg, LoraConfig):
        raise TypeError(f"lcfg must be a LoraConfig, got {type(lcfg).__name__}")
    if is_adapted(model):
        raise ValueError("the model already has adapters: merge them first (llmarch.lora.merge_lora)")
    if is_quantized(model):
        raise ValueError(
            "the model is quantized: give its float weights (LoraConfig.base_quant quantizes them)"
        )
    if any(isinstance(m, LowRankEinsum) for _, m in nnx.iter_modules(model)):
        raise ValueError("the model is factorized (llmarch.lowrank): adapters need dense weights")
    cfg = model.cfg
    found = linears(model, cfg, QuantConfig(include_lm_head=True))
    chosen = [t for t in found if not t.layout.batch and role(t.path) in lcfg.targets]
    if not chosen:
        roles = sorted({role(t.path) for t in found if not t.layout.batch})
        raise ValueError(
            f"LoraConfig.targets={lcfg.targets} names no weight of model {cfg.name!r}; its linear weights' "
            f"roles are {roles}"
        )
    plan = {t.path: (tuple(sorted(t.layout.perm[: t.layout.contracted])), t.lead) for t in chosen}
    if lcfg.base_quant is not None:
        from llmarch.quant.model import quantize

        model = quantize(model, cfg, lcfg.base_quant, progress=False)
    else:
        model = nnx.merge(*nnx.split(model))  # new module objects over the same arrays
    dtype = jnp.dtype(cfg.param_dtype)
    common = dict(rank=lcfg.rank, alpha=lcfg.alpha, dropout=lcfg.dropout, rngs=rngs)
    for i, (path, (contracted, lead)) in enumerate(plan.items()):
        parent, key, module = locate(model, path)
        seed = i * _SEED_STRIDE
        try:
            if isinstance(module, QuantizedEinsum):
                layer = QLoRAEinsum(module, lead=lead, seed=seed, param_dtype=dtype, **common)
            else:
                layer = LoRAEinsum(module, contracted=contracted, lead=lead, seed=seed, **common)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
        install(parent, key, layer)
    model.lora_config = lcfg
    return model


def split(model: nnx.Module) -> tuple[nnx.GraphDef, nnx.State, nnx.State, nnx.State]:
    """``(graphdef, adapters, frozen, rest)`` of an adapted model (see the module docstring)."""
    return nnx.split(model, ADAPTERS, FROZEN, ...)


def adapter_count(model: nnx.Module) -> int:
    """How many numbers the adapters hold (what the optimizer trains)."""
    _, adapters, _, _ = split(model)
    return sum(x.size for x in jax.tree.leaves(adapters))


def merge_lora(model: nnx.Module) -> nnx.Module:
    """The plain model: each adapted weight ``W + (alpha/r)·A·B`` in the base's dtype, a QLoRA
    base's quantized weights dequantized to ``cfg.param_dtype``. ``model`` is left unchanged."""
    model = nnx.merge(*nnx.split(model))  # new module objects over the same arrays
    dtype = jnp.dtype(model.cfg.param_dtype)
    layers = [(path, m) for path, m in nnx.iter_modules(model) if path]
    for path, module in layers:
        if isinstance(module, LoRAEinsum):
            value = module.weight()
        elif isinstance(module, QLoRAEinsum):
            value = module.merged_weight().astype(dtype)
        elif isinstance(module, QuantizedEinsum) and getattr(model, "lora_config", None) is not None:
            value = _dequantized_weight(module).astype(dtype)
        else:
            continue
        parent, key, _ = locate(model, "/".join(map(str, path)))
        install(parent, key, _plain(value, module))
    if hasattr(model, "lora_config"):
        del model.lora_config
    if hasattr(model, "quant_config"):  # a QLoRA base: every weight is float again
        del model.quant_config
    return model


def _dequantized_weight(module: QuantizedEinsum) -> jax.Array:
    if module.q[...].ndim == len(module.matrix_shape):
        return module.weight()
    from llmarch.lora.layer import _dequantized

    zero = None if module.zero is None else module.zero[...]
    return jax.vmap(lambda s: _dequantized(module, s))((module.q[...], module.scale[...], zero))


def _plain(value: jax.Array, module: nnx.Module) -> Einsum:
    """An ``Einsum`` holding ``value`` with the weight's logical axis names."""
    if isinstance(module, Einsum):
        names = tuple(module.w.get_metadata().get("out_sharding") or (None,) * value.ndim)
    else:  # a quantized weight: its layout's names, behind any layers axis
        lead = value.ndim - len(module.layout.shape)
        names = (*((axes.LAYERS,) * lead), *module.layout.names)
    with nnx.use_eager_sharding(False):
        layer = Einsum(value.shape, names, rngs=nnx.Rngs(0), init=lambda *_: value, param_dtype=value.dtype)
    return layer
