"""Tokenizers, corpora and input pipelines."""

from llmarch.data.corpus import default_corpus, default_documents, load_documents, train_val_split
from llmarch.data.packing import PackedRows, pack_documents
from llmarch.data.pipeline import batch_dataset, batches_per_epoch, make_batches
from llmarch.data.tokenizer import BPETokenizer, ByteTokenizer, Tokenizer, load_tokenizer

__all__ = [
    "BPETokenizer",
    "ByteTokenizer",
    "PackedRows",
    "Tokenizer",
    "batch_dataset",
    "batches_per_epoch",
    "default_corpus",
    "default_documents",
    "load_documents",
    "load_tokenizer",
    "make_batches",
    "pack_documents",
    "train_val_split",
]
