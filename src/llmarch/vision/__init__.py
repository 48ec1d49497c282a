"""Vision towers for multimodal models: SigLIP's ViT (``SiglipVision``) and its Hugging Face mapping.

``llmarch.vision.load_siglip_vision(dir)`` reads what transformers' ``SiglipVisionModel.save_pretrained``
wrote; ``to_hf``/``save_siglip_vision`` write it back. LLaVA-style models take the tower's tokens
(``VisionOutput.last_hidden_state`` or a layer of ``hidden_states``), not the pooled vector:
``Llava`` (``llmarch.vision.llava``) does, and ``load_llava``/``save_llava`` read and write
transformers' ``LlavaForConditionalGeneration`` with a SigLIP tower and a Llama decoder.
"""

from llmarch.vision.config import ACTIVATIONS, VisionConfig
from llmarch.vision.hf import (
    config_from_hf,
    config_to_hf,
    from_hf,
    load_siglip_vision,
    save_siglip_vision,
    to_hf,
)
from llmarch.vision.llava import Llava, LlavaConfig
from llmarch.vision.llava_hf import load_llava, save_llava
from llmarch.vision.siglip import MAPHead, SiglipVision, VisionOutput, patchify

__all__ = [
    "ACTIVATIONS",
    "Llava",
    "LlavaConfig",
    "MAPHead",
    "SiglipVision",
    "VisionConfig",
    "VisionOutput",
    "config_from_hf",
    "config_to_hf",
    "from_hf",
    "load_llava",
    "load_siglip_vision",
    "patchify",
    "save_llava",
    "save_siglip_vision",
    "to_hf",
]
