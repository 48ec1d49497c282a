"""Inference: sampling and generation."""

from llmarch.inference.generate import generate, sample_logits

__all__ = ["generate", "sample_logits"]
