"""Tokenizers, corpora and input pipelines."""

from llmarch.data.augment_epochs import AugmentConfig, AugmentedRows
from llmarch.data.clean import CleanConfig, CleanReport, clean_documents
from llmarch.data.corpus import default_corpus, default_documents, load_documents, train_val_split
from llmarch.data.packing import PackedRows, pack_documents
from llmarch.data.pipeline import batch_dataset, batches_per_epoch, make_batches
from llmarch.data.tokenizer import BPETokenizer, ByteTokenizer, Tokenizer, load_tokenizer

__all__ = [
    "AugmentConfig",
    "AugmentedRows",
    "BPETokenizer",
    "ByteTokenizer",
    "CleanConfig",
    "CleanReport",
    "PackedRows",
    "Tokenizer",
    "batch_dataset",
    "batches_per_epoch",
    "clean_documents",
    "default_corpus",
    "default_documents",
    "load_documents",
    "load_tokenizer",
    "make_batches",
    "pack_documents",
    "train_val_split",
]
