"""Loading a model to serve: an llmarch training run directory or a Hugging Face checkpoint."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax
from flax import nnx

from llmarch import hf, hub
from llmarch.config import ModelConfig
from llmarch.data.tokenizer import TOKENIZER_FILE, load_tokenizer
from llmarch.json_config import read_json
from llmarch.model import Transformer
from llmarch.run_format import CHECKPOINTS_DIR, CONFIG_FILE, existing_dir, is_run


def _hf_tokenizer(root: Path):
    """The checkpoint's ``tokenizer.json``, special tokens named by ``tokenizer_config.json``."""
    names: dict[str, str] = {}
    config = root / "tokenizer_config.json"
    if config.is_file():
        data = read_json(config)
        for field in ("bos_token", "eos_token", "pad_token"):
            value = data.get(field)
            value = value.get("content") if isinstance(value, dict) else value
            if isinstance(value, str):
                names[field] = value
    names.setdefault("pad_token", names.get("eos_token", "<pad>"))
    try:
        return load_tokenizer(root, **names)
    except Exception as e:  # noqa: BLE001  (the tokenizers library raises a bare Exception)
        raise ValueError(
            f"the tokenizer in {root / TOKENIZER_FILE} cannot be loaded ({e}); pass a "
            "tokenizer explicitly, or token ids instead of text"
        ) from None


def load_for_inference(
    path: str | os.PathLike, *, dtype: Any = None, vision: bool = False
) -> tuple[nnx.Module, ModelConfig, Any]:
    """``(model, cfg, tokenizer or None)`` from a checkpoint directory.

    ``path`` is either a run directory written by ``llmarch train`` (its latest checkpoint and
    its tokenizer) or a Hugging Face checkpoint (``config.json`` + safetensors; its
    ``tokenizer.json`` when present), or the Hub id ``org/name`` of one (``llmarch.hub``).
    ``dtype`` (e.g. ``"bfloat16"``) becomes the dtype of the parameters and of the computation,
    for either kind; None keeps a run's dtypes as trained and loads a Hugging Face checkpoint in
    float32.

    ``vision``: the caller serves vision-language models too (``Engine`` does), so a Hugging Face
    LLaVA checkpoint loads as a ``llmarch.vision.llava.Llava``, with its decoder's config as ``cfg``;
    without it such a checkpoint is refused with a one-line error.

    Raises:
      FileNotFoundError: no such directory, not a directory, or neither kind of checkpoint in it.
      ValueError: naming the file, for a config or weights file that cannot be read or used.
    """
    expected = (
        f"an llmarch run directory ({CONFIG_FILE} + {CHECKPOINTS_DIR}/, written by `llmarch "
        f"train`) or {hf.HF_CHECKPOINT}"
    )
    root = existing_dir(hub.resolve(path), expected)
    name = None if dtype is None else hf.dtype_name(dtype)  # a bad dtype fails before any loading
    from llmarch.quant.checkpoint import is_quantized_checkpoint, load_quantized

    if is_quantized_checkpoint(root):  # written by `llmarch quantize`: its weights stay as stored
        if name is not None:
            raise ValueError(f"--dtype {name} does not apply to the quantized checkpoint {root}")
        return load_quantized(root)
    if is_run(root):
        model, cfg, tokenizer = _load_run(root)
        if name is not None:
            model = _with_dtype(model, cfg.replace(dtype=name, param_dtype=name))
        return model, model.cfg, tokenizer
    if (root / hf.CONFIG_FILE).is_file():
        if read_json(root / hf.CONFIG_FILE).get("model_type") == "llava":
            if not vision:
                raise ValueError(
                    f"{root} is a vision-language (LLaVA) checkpoint: `llmarch generate` serves it; "
                    "this command reads text-only models"
                )
            model, lcfg = hf.load_pretrained(root, dtype=name)
            tokenizer = _hf_tokenizer(root) if (root / TOKENIZER_FILE).is_file() else None
            return model, lcfg.text, tokenizer
        model, cfg = hf.load_pretrained(root, dtype=name)
        tokenizer = _hf_tokenizer(root) if (root / TOKENIZER_FILE).is_file() else None
        return model, cfg, tokenizer
    raise FileNotFoundError(
        f"{root} is not a checkpoint: it has neither {CONFIG_FILE} nor {hf.CONFIG_FILE}; expected {expected}"
    )


def _load_run(root: Path):
    """The newest verified checkpoint of an ``llmarch train`` run, restored as ``llmarch eval`` does."""
    from llmarch.train.evaluate import restore_run

    cfg, graphdef, state, _ = restore_run(root, load_base=lambda path: load_for_inference(path)[0])
    model = nnx.merge(graphdef, state.params, state.rest_and_frozen())
    if cfg.lora is not None:  # a LoRA run: its adapters merged into its base, a plain model
        from llmarch.lora import merge_lora

        model = merge_lora(model)
    return model, model.cfg, load_tokenizer(cfg.tokenizer)


def _with_dtype(model: Transformer, cfg: ModelConfig) -> Transformer:
    """``model``'s weights in a model of ``cfg`` (the same but for its dtypes), each floating
    variable cast to the dtype that ``cfg`` gives it, as ``hf.load_pretrained`` casts a checkpoint."""
    with nnx.use_eager_sharding(False):  # shapes and dtypes only: nothing is initialized
        abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    graphdef, target = nnx.split(abstract)
    targets = dict(nnx.to_flat_state(target))
    flat = dict(nnx.to_flat_state(nnx.state(model)))  # the same paths: only dtypes differ

    def cast(path, variable):
        value, want = variable.get_value(), targets[path].get_value().dtype
        floating = jax.numpy.issubdtype(value.dtype, jax.numpy.floating)
        return variable.replace(value.astype(want) if floating and value.dtype != want else value)

    state = nnx.from_flat_state([(p, cast(p, v)) for p, v in flat.items()])
    return nnx.merge(graphdef, state)
