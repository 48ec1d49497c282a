"""Loading and saving Hugging Face checkpoint directories: the API at the top of ``llmarch.hf``."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llmarch.config import ModelConfig
from llmarch.hf.config_json import config_from_hf, config_to_hf
from llmarch.hf.convert import from_hf_tensors, to_hf_tensors
from llmarch.hf.fields import dtype_name
from llmarch.hf.files import CONFIG_FILE, HF_CHECKPOINT, weight_files, write_checkpoint
from llmarch.hf.fp8 import Fp8Format, checkpoint_tensors, quantize_tensors, read_format
from llmarch.hf.mtp import depth_held, skip_mtp_tensors
from llmarch.hf.tokenizer import token_ids, tokenizer_config, write_tokenizer
from llmarch.json_config import read_json
from llmarch.model import Transformer
from llmarch.run_format import existing_dir


@dataclasses.dataclass(frozen=True)
class Family:
    """A model family whose checkpoints are not a decoder-only ``Transformer``'s, by ``config.json``
    ``model_type``: ``load(root, dtype=) -> (model, cfg)``, ``save(model, path, max_shard_bytes=)``,
    and the class of its models. Families built on this package register themselves
    (``register_family``), since it cannot import them: ``llmarch.vision`` registers LLaVA, and
    ``import llmarch`` imports it, so ``load_pretrained`` reads every family once llmarch is imported.
    """

    model_type: str
    load: Callable[..., tuple[Any, Any]]
    save: Callable[..., None]
    model_class: type


FAMILIES: dict[str, Family] = {}


def register_family(family: Family) -> None:
    """Makes ``load_pretrained`` and ``save_pretrained`` handle ``family``'s checkpoints and models."""
    FAMILIES[family.model_type] = family


def load_pretrained(
    path: str | os.PathLike, *, dtype: Any = None, mtp: bool = True
) -> tuple[Transformer, ModelConfig]:
    """Loads a Hugging Face checkpoint directory of a supported architecture (Llama, Mixtral,
    DeepSeek-V3, Qwen3, Qwen3-MoE: ``llmarch.hf.ARCHITECTURES``).

    DeepSeek's published layout is read too (``llmarch.hf.fp8``, ``llmarch.hf.mtp``): FP8 e4m3 weights
    with ``weight_scale_inv`` blocks (``quantization_config`` in ``config.json``) are dequantized to
    the parameter dtype; the multi-token-prediction layers (``model.layers.{num_hidden_layers + d}.*``)
    become the model's MTP modules (``ModelConfig.mtp_depth``), or, with ``mtp=False``, are skipped
    with a logged warning.

    Args:
      path: a directory with ``config.json`` and ``model.safetensors`` (or its shards and
        ``model.safetensors.index.json``).
      dtype: dtype of the parameters and of the computation, e.g. ``"bfloat16"``; None keeps
        both float32, whatever the checkpoint's dtype (parameters are kept in float32).
    Returns:
      ``(model, cfg)``; ``cfg.hf_model_type`` records the architecture, for ``save_pretrained``.
      A ``LlavaForConditionalGeneration`` checkpoint (SigLIP tower, Llama decoder) gives a
      ``llmarch.vision.llava.Llava`` and its ``LlavaConfig``: ``model(tokens, images=pixel_values)``.
    Raises:
      FileNotFoundError: for a missing directory (or a file in its place), config or weights file.
      ValueError: naming the file, for one that is not valid JSON or safetensors, an unsupported or
        invalid config field, or tensors that do not match the config.
    """
    root = existing_dir(path, HF_CHECKPOINT)
    config_path = root / CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} does not exist: a checkpoint needs {CONFIG_FILE}")
    hf_config = read_json(config_path)
    family = FAMILIES.get(hf_config.get("model_type"))
    if family is not None:  # not a decoder-only Transformer: e.g. LLaVA (llmarch.vision)
        return family.load(root, dtype=dtype)
    try:
        cfg = config_from_hf(hf_config, name=root.resolve().name)
        fp8 = read_format(hf_config)
    except ValueError as e:  # name the file: "config.json x=..." or "ModelConfig.x=... (from it)"
        message = str(e)
        message = (
            str(config_path) + message.removeprefix(CONFIG_FILE)
            if message.startswith(CONFIG_FILE)
            else f"{config_path}: {message}"
        )
        raise ValueError(message) from None
    if dtype is not None:
        cfg = cfg.replace(dtype=dtype_name(dtype), param_dtype=dtype_name(dtype))
    files = weight_files(root)
    if not isinstance(mtp, bool):
        raise ValueError(f"mtp={mtp!r} is invalid: must be True (load the MTP layers) or False (skip them)")
    depth = depth_held(files, hf_config) if mtp else 0
    if depth:
        cfg = cfg.replace(mtp_depth=depth)
    files = skip_mtp_tensors(files, hf_config, cfg, root)
    return from_hf_tensors(checkpoint_tensors(root, files, fp8), cfg, hf_config=hf_config), cfg


def save_pretrained(
    model: Transformer,
    cfg: ModelConfig,
    path: str | os.PathLike,
    *,
    architecture: str | None = None,
    max_shard_bytes: int = 5 * 10**9,
    tokenizer: Any = None,
    chat_template: str | None = None,
    fp8: bool = False,
) -> None:
    """Writes ``config.json`` and safetensors weights that transformers' ``from_pretrained`` of the
    architecture's class loads; with a ``tokenizer``, also what ``AutoTokenizer`` and ``generate``
    read (``llmarch.hf.tokenizer``: ``tokenizer.json``, ``tokenizer_config.json`` with
    ``chat_template`` when given, ``generation_config.json``, and the special token ids in
    ``config.json``).

    The architecture is ``architecture`` (a model_type such as ``"qwen3"``) when given, else
    ``cfg.hf_model_type`` (what ``load_pretrained`` read), else chosen from the blocks by
    ``llmarch.hf.architectures.default_architecture``. Over ``max_shard_bytes`` the weights are split
    into ``model-0000i-of-0000n.safetensors`` with a ``model.safetensors.index.json``. Weight files
    left by an earlier save in ``path`` are removed first, so that a stale index cannot shadow the
    new weights.

    With ``fp8=True`` the weights are written in DeepSeek's published FP8 layout (``llmarch.hf.fp8``):
    the decoder layers' attention and FFN linears as float8_e4m3fn with float32 ``weight_scale_inv``
    per 128×128 block (partial blocks at the edges), the rest in the parameter dtype, and
    ``quantization_config`` in ``config.json``; ``load_pretrained`` and transformers
    (``FineGrainedFP8Config``) read it back, dequantized.

    A ``llmarch.vision.llava.Llava`` (with its ``LlavaConfig``) is written as
    ``LlavaForConditionalGeneration`` (``llmarch.vision.llava_hf.save_llava``).

    Raises:
      ValueError: a model Hugging Face cannot hold (quantized, factorized, or a block kind or config
        field the architecture lacks), or ``cfg`` not describing ``model``.
      TypeError: a tokenizer other than llmarch's byte or BPE tokenizer.
    """
    if isinstance(max_shard_bytes, bool) or not isinstance(max_shard_bytes, int) or max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes={max_shard_bytes!r} is invalid: must be a positive int")
    family = next((f for f in FAMILIES.values() if isinstance(model, f.model_class)), None)
    if family is not None:  # e.g. a Llava: its family writes its own config and weights
        given = {"architecture": architecture, "tokenizer": tokenizer, "chat_template": chat_template}
        extra = [k for k, v in {**given, "fp8": fp8 or None}.items() if v is not None]
        if extra or cfg != model.cfg:
            raise ValueError(
                f"save_pretrained of a {family.model_class.__name__} takes its own config (model.cfg) "
                f"and none of {extra or ['another cfg']}: it writes {family.model_type!r} checkpoints"
            )
        return family.save(model, path, max_shard_bytes=max_shard_bytes)
    if not isinstance(fp8, bool):
        raise ValueError(f"fp8={fp8!r} is invalid: must be True (DeepSeek's FP8 layout) or False")
    quant = getattr(model, "quant_config", None)  # set by llmarch.quant on a quantized model
    if quant is not None:
        raise ValueError(
            f"the model is quantized ({quant.method}): a Hugging Face checkpoint holds float weights; "
            "save its float source instead"
        )
    if tokenizer is not None:  # checked before anything is written
        tokenizer_config(tokenizer, model_max_length=cfg.max_seq_len, chat_template=chat_template)
        if tokenizer.vocab_size > cfg.vocab_size:
            raise ValueError(
                f"the tokenizer has {tokenizer.vocab_size} tokens, more than ModelConfig.vocab_size="
                f"{cfg.vocab_size}: it is not the model's tokenizer"
            )
    hf_config = config_to_hf(cfg, architecture=architecture)
    architecture = hf_config["model_type"]  # judge model.cfg by the same architecture
    if config_to_hf(model.cfg, architecture=architecture) != hf_config:
        raise ValueError(
            "cfg does not describe model: their Hugging Face configs differ "
            f"(cfg.name={cfg.name!r}, model.cfg.name={model.cfg.name!r})"
        )
    tensors = to_hf_tensors(model, cfg, architecture=architecture)
    if fp8:
        tensors = quantize_tensors(tensors)
        hf_config["quantization_config"] = Fp8Format().hf_config()
    if tokenizer is not None:
        hf_config.update(token_ids(tokenizer))
    write_checkpoint(Path(path), hf_config, tensors, max_shard_bytes)
    if tokenizer is not None:
        write_tokenizer(tokenizer, path, model_max_length=cfg.max_seq_len, chat_template=chat_template)
