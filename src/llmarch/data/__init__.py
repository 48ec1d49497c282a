"""Tokenizers, corpora and input pipelines."""

from llmarch.data.corpus import default_corpus
from llmarch.data.tokenizer import ByteTokenizer

__all__ = ["ByteTokenizer", "default_corpus"]
