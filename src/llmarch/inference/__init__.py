"""Inference: sampling, generation, and the serving engine (paged cache, continuous batching,
speculative decoding)."""

from llmarch.inference.block_manager import BlockManager, OutOfPages
from llmarch.inference.engine import Engine
from llmarch.inference.engine_config import EngineConfig
from llmarch.inference.generate import generate
from llmarch.inference.outputs import Completion, RequestOutput, TokenEvent
from llmarch.inference.sampling import SamplingParams, sample_logits
from llmarch.inference.speculative import SpeculativeDecoder, SpeculativeOutput
from llmarch.inference.step_program import compiled_programs

__all__ = [
    "BlockManager",
    "Completion",
    "Engine",
    "EngineConfig",
    "OutOfPages",
    "RequestOutput",
    "SamplingParams",
    "SpeculativeDecoder",
    "SpeculativeOutput",
    "TokenEvent",
    "compiled_programs",
    "generate",
    "sample_logits",
]
