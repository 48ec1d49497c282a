"""``llmarch export --format peft``: a LoRA run's adapters as a Hugging Face PEFT adapter directory.

The directory holds ``adapter_config.json`` and ``adapter_model.safetensors`` as ``peft``'s
``save_pretrained`` writes them, so ``PeftModel.from_pretrained(base, out)`` over the run's base
(``init_from``, loaded with transformers; ``base_model_name_or_path`` names it) is the run's merged
model: PEFT computes ``W x + (lora_alpha / r) · B A x`` where llmarch merges ``W + (alpha/r)·A·B``.

Layout. Which Hugging Face tensor each llmarch weight is, and how its axes become torch's
``[out, in]``, is the tensor plan of ``llmarch.hf`` (``llmarch.hf.plan``), read here, not
restated. An adapted weight must be one plain ``nn.Linear`` there (a ``rules.Linear`` entry):
our ``w [*K, *N]`` whose first ``in_axes`` axes meet the input is HF's ``W.reshape(K, N).T``.
Its adapters ``A [L, *K, r]`` and ``B [L, r, *N]`` (``L``: the run's stacked layers axis, absent
for the LM head) become, for layer ``i`` of HF module ``m`` (e.g. ``model.layers.{i}.self_attn.q_proj``)::

    base_model.model.{m}.lora_A.weight = A[i].reshape(K, r).T   # [r, in]
    base_model.model.{m}.lora_B.weight = B[i].reshape(r, N).T   # [out, r]

so ``B_hf @ A_hf = (A·B).reshape(K, N).T``, the update in the base tensor's own layout: the
``[D, N, H]`` head axes of ``w_q_dnh`` flatten to q_proj's ``N*H`` rows, ``w_o_nhd [N, H, D]``'s
two input axes to o_proj's ``N*H`` columns, exactly as ``llmarch export --format hf`` lays out
the merged weight. ``target_modules`` holds the HF module's last name (``q_proj``, ``down_proj``,
``lm_head``) where that picks out exactly the adapted modules, else their full names (e.g. when
a routed expert, never adapted, shares the name).

Refused before anything is written (ValueError naming the field): a source that is not a LoRA
run, a run without ``init_from`` (its base is the seed's random model), a model no Hugging Face
architecture holds, an adapted weight that is part of a fused tensor (DeepSeek-V3's MLA
``kv_a_proj_with_mqa``, ``kv_b_proj``, ``q_b_proj``) or has no tensor at all, and a scale other
than ``alpha / rank``. A QLoRA run's adapters are written as they are: over the float base they
give the merged model up to the quantization of the base they were trained against.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from llmarch import hf, sources
from llmarch.hf import architectures
from llmarch.hf.plan import tensor_plan
from llmarch.hf.rules import Linear
from llmarch.lora import LoraConfig, LoRAEinsum, QLoRAEinsum, role

ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."  # PeftModel wraps a LoraModel wrapping the transformers model


def adapter_tensors(model: nnx.Module) -> tuple[dict[str, np.ndarray], list[str]]:
    """``(tensors, target_modules)`` of an adapted model (``llmarch.lora.apply_lora``): the PEFT
    tensors by name, as contiguous numpy arrays, and the ``target_modules`` that select them.

    Raises:
      ValueError: a model no Hugging Face architecture holds, an adapted weight with no ``nn.Linear``
        of its own, or adapters whose scale is not ``alpha / rank``.
    """
    cfg, lcfg = model.cfg, getattr(model, "lora_config", None)
    if not isinstance(lcfg, LoraConfig):
        raise ValueError("the model has no adapters (llmarch.lora.apply_lora): there is nothing to export")
    arch = architectures.of_config(cfg)
    try:
        plan = tensor_plan(cfg, arch, hf.config_to_hf(cfg))
    except ValueError as e:
        raise ValueError(f"the run's base has no Hugging Face architecture for PEFT to load: {e}") from None
    linears: dict[tuple, list] = {}  # our module path -> [(HF module, layer, Linear)]
    others: dict[tuple, str] = {}  # our module path -> the fused or per-expert HF tensor
    every = set()  # every HF module holding a weight of ours: what a target name may also match
    for e in plan:
        if e.path[-1] != "w":
            continue
        every.add(e.name.removesuffix(".weight"))
        if isinstance(e.transform, Linear):
            linears.setdefault(e.path[:-1], []).append((e.name.removesuffix(".weight"), e.layer, e.transform))
        else:
            others.setdefault(e.path[:-1], e.name)  # the first layer's, for the message
    allowed = sorted({role("/".join(map(str, p))) for p in linears})
    tensors: dict[str, np.ndarray] = {}
    adapted: set[str] = set()
    for path, layer in nnx.iter_modules(model):
        if not isinstance(layer, LoRAEinsum | QLoRAEinsum):
            continue
        name = "/".join(map(str, path))
        if path not in linears:
            where = f"part of {arch.hf_class}'s {others[path]}" if path in others else "in no tensor"
            raise ValueError(
                f"LoraConfig.targets={lcfg.targets} adapts {name} (role {role(name)!r}), which is {where}: "
                f"a PEFT adapter needs a torch nn.Linear of its own; allowed roles for this model: {allowed}"
            )
        rank = layer.rank
        if rank != lcfg.rank or not np.isclose(layer.lora_scale, lcfg.alpha / rank, rtol=1e-6, atol=0):
            raise ValueError(
                f"{name}: rank {rank} with scale {layer.lora_scale} cannot be expressed as PEFT's "
                f"lora_alpha / r with LoraConfig.rank={lcfg.rank}, alpha={lcfg.alpha}; allowed: "
                "scale = alpha / rank on every adapter"
            )
        a = np.asarray(jax.device_get(layer.lora_a[...]))  # [*lead, *K, r]
        b = np.asarray(jax.device_get(layer.lora_b[...]))  # [*lead, r, *N]
        for module, index, transform in linears[path]:
            if layer.contracted != tuple(range(transform.in_axes)):
                raise ValueError(
                    f"{name}: its input axes {layer.contracted} are not the leading {transform.in_axes} "
                    f"that {module} takes as nn.Linear's input"
                )
            a_i, b_i = (a, b) if index is None else (a[index], b[index])
            a_i = a_i.reshape(-1, rank)  # [K, r], K flattened as Linear.to_hf flattens the input
            b_i = b_i.reshape(rank, -1)  # [r, N]
            tensors[f"{PREFIX}{module}.lora_A.weight"] = np.ascontiguousarray(a_i.T)  # [r, in]
            tensors[f"{PREFIX}{module}.lora_B.weight"] = np.ascontiguousarray(b_i.T)  # [out, r]
            adapted.add(module)
    if not adapted:
        raise ValueError("the model has no adapted weights: there is nothing to export")
    return tensors, _target_modules(adapted, every)


def _target_modules(adapted: set[str], every: set[str]) -> list[str]:
    """Last names where each selects adapted modules only (PEFT matches a name against the end of
    a module's path), the full names of the adapted modules otherwise."""
    targets = set()
    for module in adapted:
        last = module.rsplit(".", 1)[-1]
        same = {m for m in every if m.rsplit(".", 1)[-1] == last}
        targets.add(last if same <= adapted else module)
    return sorted(targets)


def adapter_config(lcfg: LoraConfig, target_modules: list[str], base: str | None) -> dict[str, Any]:
    """The ``adapter_config.json`` fields of a PEFT ``LoraConfig`` (those PEFT >= 0.13 reads; the
    rest keep PEFT's defaults, which are what llmarch computes)."""
    alpha = int(lcfg.alpha) if float(lcfg.alpha).is_integer() else lcfg.alpha
    return {
        "alpha_pattern": {},
        "base_model_name_or_path": base,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "layers_pattern": None,
        "layers_to_transform": None,
        "lora_alpha": alpha,
        "lora_dropout": lcfg.dropout,
        "modules_to_save": None,
        "peft_type": "LORA",
        "r": lcfg.rank,
        "rank_pattern": {},
        "revision": None,
        "target_modules": target_modules,
        "task_type": "CAUSAL_LM",
        "use_dora": False,
        "use_rslora": False,
    }


def _adapted_model(root: Path) -> tuple[nnx.Module, int]:
    """The run's newest checkpoint as an adapted model; its base is the seed's (never read: only
    the adapters are exported), so ``init_from`` is not loaded."""
    from llmarch.train.evaluate import restore_run

    _, graphdef, state, step = restore_run(root, seed_base=True)
    return nnx.merge(graphdef, state.params, state.rest_and_frozen()), step


def export_peft(
    checkpoint: str | os.PathLike, out: str | os.PathLike, *, dtype: Any = None
) -> dict[str, Any]:
    """Writes the LoRA run ``checkpoint``'s adapters as the PEFT adapter directory ``out``; returns
    a summary. ``dtype``: the adapters' (``"float32"``, ``"bfloat16"``, ``"float16"``); None: as
    trained.

    Raises:
      FileNotFoundError: no such checkpoint.
      ValueError: not a LoRA run, a run without ``init_from``, ``out`` not new or empty, a bad
        ``dtype``, or adapters PEFT cannot hold (see the module docstring).
    """
    name = None if dtype is None else hf.dtype_name(dtype)
    src = sources.source(checkpoint, what="--checkpoint")
    train = src.train
    if train is None or train.get("lora") is None:
        what = "a Hugging Face checkpoint" if train is None else "a run with TrainConfig.lora=None"
        raise ValueError(
            f"--checkpoint {src.root} is {what}: --format peft writes a LoRA run's adapters; allowed: "
            "a run of `llmarch train` with lora (export other checkpoints with --format hf)"
        )
    base = train.get("init_from")
    if base is None:
        raise ValueError(
            f"--checkpoint {src.root} has TrainConfig.init_from=None: its base is the seed's random model, "
            "which no Hugging Face checkpoint holds; allowed: a LoRA run with init_from"
        )
    out = sources.check_out(out)
    model, step = _adapted_model(src.root)
    tensors, targets = adapter_tensors(model)
    if name is not None:
        tensors = {k: v.astype(np.dtype(jax.numpy.dtype(name))) for k, v in tensors.items()}
    config = adapter_config(model.lora_config, targets, base)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        save_file(tensors, staging / ADAPTER_WEIGHTS_FILE, metadata={"format": "pt"})
        (staging / ADAPTER_CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if out.exists():  # check_out let only an empty directory through
            out.rmdir()
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    quant = model.lora_config.base_quant
    return {
        "format": "peft",
        "source": str(src.root),
        "out": str(out),
        "step": step,
        "base": base,
        "r": config["r"],
        "lora_alpha": config["lora_alpha"],
        "target_modules": targets,
        "tensors": len(tensors),
        # QLoRA: trained against this quantized base; over the float one the model differs by its error
        "quantized_base": None if quant is None else quant.method,
        "dtype": str(next(iter(tensors.values())).dtype),
        "bytes": sum((out / f).stat().st_size for f in (ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE)),
    }
