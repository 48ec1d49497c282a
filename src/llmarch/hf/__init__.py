"""Hugging Face checkpoints: ``config.json`` plus safetensors weights, read and written without
transformers.

``load_pretrained(dir)`` reads what transformers' ``save_pretrained`` wrote for one of
``ARCHITECTURES`` (Llama, Mixtral, DeepSeek-V3, Qwen3, Qwen3-MoE); ``save_pretrained(model, cfg,
dir)`` writes a directory that ``from_pretrained`` of the same class loads, the class being the one
the config was imported as (``ModelConfig.hf_model_type``). Layout: one module per architecture
(``llama``, ``mixtral``, ``deepseek_v3``, ``qwen3``, ``qwen3_moe``), each declaring one
``Architecture`` record, gathered in ``architectures``; shared machinery in ``rules`` (tensor
transforms), ``plan`` (the tensor plan), ``fields`` (config.json readers), ``common`` (the Llama
family's fields and tables), ``files`` (safetensors), ``convert`` (weights <-> tensors).
"""

from llmarch.hf.architecture import Architecture
from llmarch.hf.architectures import ARCHITECTURES
from llmarch.hf.config_json import config_from_hf, config_to_hf
from llmarch.hf.convert import from_hf_tensors, to_hf_tensors
from llmarch.hf.files import CONFIG_FILE, HF_CHECKPOINT, INDEX_FILE, WEIGHTS_FILE
from llmarch.hf.pretrained import dtype_name, load_pretrained, save_pretrained

__all__ = [
    "ARCHITECTURES",
    "CONFIG_FILE",
    "HF_CHECKPOINT",
    "INDEX_FILE",
    "WEIGHTS_FILE",
    "Architecture",
    "config_from_hf",
    "config_to_hf",
    "dtype_name",
    "from_hf_tensors",
    "load_pretrained",
    "save_pretrained",
    "to_hf_tensors",
]
