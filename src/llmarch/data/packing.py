"""Packing: documents -> one token stream -> fixed-length rows with document boundaries marked.

The corpus is tokenized once (each document ends with EOS, optionally starts with BOS) into a
flat stream of N tokens. Row ``i`` is the window ``stream[i*T : i*T + T + 1]`` of ``T+1`` tokens
(``T = seq_len``): ``inputs = window[:-1]``, ``targets = window[1:]``. Consecutive windows overlap
by one token, so every token after the first is a target exactly once per epoch and no
transition is lost at a row boundary. The last window may be short; its row is padded (PAD ids,
``segment_ids`` 0, ``mask`` 0) rather than dropped.

Within a row, ``segment_ids`` numbers the documents 1, 2, ... from the row's start (the model masks
attention between different ids), ``positions`` counts from 0 at each document's first token in the
row, and ``mask`` is 0 where the target belongs to another document than the input (the EOS ->
next document transition) and on padding.

``positions`` restart at 0 for a document continued from the previous row. That is what the model
computes itself from ``segment_ids`` (``model.segment_positions``); with RoPE and attention confined
to the segment, attention depends only on position differences, so this gives the same logits as
counting from the document's true start, while keeping every position below ``seq_len``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from kernels_pallas.intmath import cdiv
from llmarch.data.tokenizer import Tokenizer

ROW_KEYS = ("inputs", "targets", "segment_ids", "positions", "mask")


class PackedRows:
    """The rows of a tokenized corpus; ``rows[i]`` is a dict of int32 ``[seq_len]`` arrays.

    A random-access source (``len`` and ``[]``), as ``grain.MapDataset.source`` takes.
    """

    def __init__(
        self,
        tokens: np.ndarray,
        doc_ids: np.ndarray,
        *,
        seq_len: int,
        pad_id: int,
        trained: np.ndarray | None = None,
    ):
        """``tokens`` and ``doc_ids`` are int32 ``[N]``: the token stream and each token's document;
        ``trained``, bool ``[N]``: whether the loss counts each token as a target (None: every one;
        chat data counts the assistant's tokens only, ``llmarch.data.chat``)."""
        if not isinstance(seq_len, int) or isinstance(seq_len, bool) or seq_len <= 0:
            raise ValueError(f"seq_len={seq_len!r}: must be a positive int")
        if tokens.shape != doc_ids.shape or tokens.ndim != 1:
            raise ValueError(f"tokens {tokens.shape} and doc_ids {doc_ids.shape} must be equal 1-D shapes")
        if len(tokens) < seq_len + 1:
            raise ValueError(
                f"the corpus is too short: {len(tokens)} tokens, but one row of "
                f"seq_len={seq_len} needs seq_len + 1 = {seq_len + 1} (inputs and the "
                f"next-token targets)"
            )
        if trained is not None and np.shape(trained) != tokens.shape:
            raise ValueError(f"trained {np.shape(trained)} must have the tokens' shape {tokens.shape}")
        self.tokens = tokens.astype(np.int32, copy=False)
        self.doc_ids = doc_ids.astype(np.int32, copy=False)
        self.trained = None if trained is None else np.asarray(trained, bool)
        self.seq_len, self.pad_id = seq_len, pad_id

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    @property
    def num_documents(self) -> int:
        return int(self.doc_ids[-1]) + 1

    def __len__(self) -> int:
        # Every token but the first is one target: ceil((N - 1) / T) rows.
        return cdiv(len(self.tokens) - 1, self.seq_len)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"row {index} out of range [0, {len(self)})")
        T = self.seq_len
        window = slice(index * T, index * T + T + 1)
        tokens, docs = self.tokens[window], self.doc_ids[window]
        n = len(tokens) - 1  # real (input, target) pairs; < T only in the last row
        row = {"inputs": np.full(T, self.pad_id, np.int32), "targets": np.full(T, self.pad_id, np.int32)}
        row.update({k: np.zeros(T, np.int32) for k in ("segment_ids", "positions", "mask")})
        row["inputs"][:n], row["targets"][:n] = tokens[:-1], tokens[1:]
        segment = docs[:-1] - docs[0] + 1  # documents are numbered consecutively, so ids are 1, 2, ...
        row["segment_ids"][:n] = segment
        idx = np.arange(n, dtype=np.int32)
        starts = np.concatenate([[True], segment[1:] != segment[:-1]])
        row["positions"][:n] = idx - np.maximum.accumulate(np.where(starts, idx, 0))
        row["mask"][:n] = docs[1:] == docs[:-1]
        if self.trained is not None:
            row["mask"][:n] &= self.trained[window][1:]
        return row

    def padding_row(self) -> dict[str, np.ndarray]:
        """A row with no data (all PAD, ``mask`` 0): fills the last batch when none is dropped."""
        T = self.seq_len
        row = {k: np.zeros(T, np.int32) for k in ROW_KEYS}
        row["inputs"][:] = row["targets"][:] = self.pad_id
        return row

    def __repr__(self) -> str:
        return (
            f"PackedRows(rows={len(self)}, seq_len={self.seq_len}, tokens={self.num_tokens}, "
            f"documents={self.num_documents})"
        )


def tokenize_documents(
    documents: Sequence[str], tokenizer: Tokenizer, *, bos: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """``(tokens, doc_ids)``, int32 ``[N]``: the documents' tokens, each document ending with EOS."""
    if isinstance(documents, str):
        raise TypeError("documents is a str: pass a sequence of documents, e.g. [text]")
    documents = list(documents)
    if not documents:
        raise ValueError("documents is empty: the corpus needs at least one document")
    encode_batch = getattr(tokenizer, "encode_batch", None)  # optional, faster (BPETokenizer)
    if encode_batch is not None:
        encoded = encode_batch(documents, bos=bos, eos=True)
    else:
        encoded = [tokenizer.encode(doc, bos=bos, eos=True) for doc in documents]
    lengths = np.asarray([len(e) for e in encoded], np.int64)
    doc_ids = np.repeat(np.arange(len(documents), dtype=np.int32), lengths)
    return np.concatenate(encoded).astype(np.int32), doc_ids


def pack_documents(
    documents: Sequence[str],
    tokenizer: Tokenizer,
    *,
    seq_len: int,
    bos: bool = False,
    model_vocab_size: int | None = None,
) -> PackedRows:
    """Tokenizes ``documents`` once and cuts the stream into rows (see the module docstring).

    Args:
      documents: the corpus, e.g. from ``load_documents``.
      tokenizer: any ``Tokenizer``; its EOS ends every document, its PAD fills the last row.
      seq_len: T, the length of every row.
      bos: also start every document with BOS.
      model_vocab_size: if given, the tokenizer's ids must all be below it (the model's
        embedding rows), checked here rather than as an out-of-range gather inside jit.
    """
    if not isinstance(seq_len, int) or isinstance(seq_len, bool) or seq_len <= 0:
        raise ValueError(f"seq_len={seq_len!r}: must be a positive int")
    if model_vocab_size is not None and tokenizer.vocab_size > model_vocab_size:
        raise ValueError(
            f"the tokenizer has vocab_size={tokenizer.vocab_size}, more than the model's "
            f"model_vocab_size={model_vocab_size}: its ids would index past the embedding"
        )
    tokens, doc_ids = tokenize_documents(documents, tokenizer, bos=bos)
    if model_vocab_size is not None and int(tokens.max()) >= model_vocab_size:
        raise ValueError(f"token id {int(tokens.max())} >= model_vocab_size={model_vocab_size}")
    return PackedRows(tokens, doc_ids, seq_len=seq_len, pad_id=tokenizer.pad_id)
