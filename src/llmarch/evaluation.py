"""``llmarch eval``: the loss of any checkpoint on any corpus, in units that compare across tokenizers.

A checkpoint is an ``llmarch train`` run (its newest verified step), a Hugging Face directory, a
Hub id ``org/name`` of one (``llmarch.hub``), or a quantized checkpoint. The corpus is the run's
own validation split, or any text file, directory of texts or JSONL file (``--data``).

Three numbers come back. ``loss``, in nats per scored token, and ``perplexity = exp(loss)`` depend
on the tokenizer: a token of a larger vocabulary covers more text, so it costs more nats. ``bits_per_byte``
does not: it is the total number of nats over the scored tokens divided by ``ln 2`` times the UTF-8
bytes of the text those tokens decode to, so two models with different tokenizers are compared on
the same corpus by it. The scored tokens are the training loss's targets: every token of a
document but its first (which nothing predicts; with ``bos`` the document starts with BOS, and then
its first text token is scored too), over the first ``batches`` batches of rows in corpus order.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from typing import Any

import numpy as np
import tokenizers
from flax import nnx
from tqdm.auto import tqdm

from llmarch import hub
from llmarch.checks import check_positive
from llmarch.data import ByteTokenizer, PackedRows, load_documents, load_tokenizer, pack_documents
from llmarch.run_format import CONFIG_FILE, existing_dir, is_run
from llmarch.train.step import DEFAULT_LOSS_CHUNK

logger = logging.getLogger(__name__)
HF_SEQ_LEN, HF_BATCH = 512, 8  # rows of a checkpoint with no training run behind it
_EXPECTED = f"an llmarch run ({CONFIG_FILE}), a Hugging Face checkpoint, or a quantized one"


@dataclasses.dataclass
class Loaded:
    """A checkpoint ready to evaluate: the model, its tokenizer (or None), the TrainConfig it was
    trained under (None for a Hugging Face checkpoint) and what the report says about it."""

    model: nnx.Module
    cfg: Any  # its ModelConfig
    tokenizer: Any
    train: Any  # TrainConfig | None
    about: dict[str, Any]


def load(checkpoint: str | os.PathLike) -> Loaded:
    """The model and settings behind ``checkpoint`` (see the module docstring).

    Raises:
      FileNotFoundError: no such directory or Hub id, or neither kind of checkpoint in it.
      ValueError: a checkpoint that cannot be read.
    """
    from llmarch.inference.loading import load_for_inference
    from llmarch.quant.checkpoint import is_quantized_checkpoint, read_record
    from llmarch.train.config import TrainConfig
    from llmarch.train.evaluate import restore_run

    root = existing_dir(hub.resolve(checkpoint, what="--checkpoint"), _EXPECTED).resolve()
    about: dict[str, Any] = {"checkpoint": str(checkpoint)}
    if is_run(root) and not is_quantized_checkpoint(root):
        cfg, graphdef, state, step = restore_run(root, load_base=lambda path: load_for_inference(path)[0])
        model = nnx.merge(graphdef, state.params, state.rest_and_frozen())  # a LoRA run: + its base
        return Loaded(model, model.cfg, load_tokenizer(cfg.tokenizer), cfg, {**about, "step": step})
    model, model_cfg, tokenizer = load_for_inference(root)  # quantized or Hugging Face (or raises)
    train = None
    if is_quantized_checkpoint(root):
        record, _, qcfg = read_record(root)
        train = TrainConfig.from_dict(record["train"]) if record.get("train") else None
        about["quant"] = {"method": qcfg.method, "bits": qcfg.bits, "group_size": qcfg.group_size}
        if train is not None:
            tokenizer = load_tokenizer(train.tokenizer)
    return Loaded(model, model_cfg, tokenizer, train, about)


def corpus_rows(
    loaded: Loaded,
    data: str | None,
    *,
    seq_len: int | None = None,
    tokenizer: str | None = None,
    text_field: str | None = None,
    bos: bool = False,
) -> tuple[PackedRows, Any, str]:
    """``(rows, tokenizer, description)`` of the corpus to evaluate on: ``data``, or the run's
    validation split (as trained: its tokenizer, sequence length unless ``seq_len``, no BOS)."""
    from llmarch.train.trainer import load_rows

    cfg = loaded.cfg
    if seq_len is not None:
        check_positive("", seq_len=seq_len)
        if seq_len > cfg.max_seq_len:
            raise ValueError(f"--seq-len {seq_len} exceeds the model's max_seq_len={cfg.max_seq_len}")
    train = loaded.train
    if data is None:
        if train is None:
            raise ValueError(
                f"{loaded.about['checkpoint']} has no training run behind it, so no validation split: "
                "give --data FILE (a text file, a directory of texts or a .jsonl file)"
            )
        if tokenizer is not None or bos:
            raise ValueError(
                "--tokenizer and --bos apply to --data: a run's validation split is read as trained"
            )
        if seq_len is not None:
            train = dataclasses.replace(train, seq_len=seq_len)
        return load_rows(train)[1], load_tokenizer(train.tokenizer), f"validation split of {train.data}"
    tok = load_tokenizer(tokenizer) if tokenizer is not None else loaded.tokenizer
    if tok is None:
        raise ValueError(
            f"{loaded.about['checkpoint']} has no tokenizer to read --data with: pass --tokenizer"
        )
    if seq_len is None:
        seq_len = train.seq_len if train is not None else min(cfg.max_seq_len, HF_SEQ_LEN)
    if text_field is None:
        text_field = train.text_field if train is not None else "text"
    documents = load_documents(data, text_field=text_field)
    rows = pack_documents(documents, tok, seq_len=seq_len, bos=bos, model_vocab_size=cfg.vocab_size)
    return rows, tok, str(data)


def byte_lengths(tokenizer) -> np.ndarray | None:
    """int64 ``[vocab_size]``: the UTF-8 bytes each token id decodes to, when that does not depend
    on its neighbours, as in byte-level tokenizers (llmarch's byte tokenizer, GPT-2-style byte-level
    BPE: one symbol per byte); special tokens decode to nothing. None for other tokenizers."""
    if isinstance(tokenizer, ByteTokenizer):
        return (np.arange(tokenizer.vocab_size) < 256).astype(np.int64)
    tok = getattr(tokenizer, "hf_tokenizer", None)
    if not isinstance(tok, tokenizers.Tokenizer) or not isinstance(
        tok.decoder, tokenizers.decoders.ByteLevel
    ):
        return None
    lengths = np.zeros(max(tokenizer.vocab_size, tok.get_vocab_size()), np.int64)
    for token, i in tok.get_vocab(with_added_tokens=False).items():
        lengths[i] = len(token)
    for i, added in tok.get_added_tokens_decoder().items():  # raw text, or skipped when special
        lengths[i] = 0 if added.special else len(added.content.encode("utf-8"))
    for i in getattr(tokenizer, "_special_ids", ()):  # what llmarch's decode skips
        lengths[i] = 0
    return lengths


def scored_bytes(rows: PackedRows, tokenizer, n_rows: int) -> int:
    """The UTF-8 bytes of the text that the scored targets of the first ``n_rows`` rows decode to.

    Exact for byte-level tokenizers (``byte_lengths``). Otherwise each document's scored span is
    decoded from the document's start (a tokenizer may drop or merge text at a decode's edges):
    ``bytes(decode(doc[:end])) - bytes(decode(doc[:1]))``, exact unless a token boundary there
    splits a character.
    """
    end = min(n_rows * rows.seq_len, rows.num_tokens - 1)  # the last stream position scored
    tokens, docs = rows.tokens[: end + 1], rows.doc_ids[: end + 1]
    scored = np.r_[False, docs[1:] == docs[:-1]]  # a target within its document
    if rows.trained is not None:  # chat data: the assistant's tokens only (llmarch.data.chat)
        scored &= rows.trained[: end + 1]
    lengths = byte_lengths(tokenizer)
    if lengths is not None:
        return int(lengths[tokens[scored]].sum())
    # Each run of scored targets [s, e), decoded from the token before it (a document's start).
    edges = np.diff(np.r_[0, scored.astype(np.int8), 0])
    total = 0
    for s, e in zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1), strict=True):
        size = len(tokenizer.decode(tokens[s - 1 : e]).encode("utf-8"))
        total += size - len(tokenizer.decode(tokens[s - 1 : s]).encode("utf-8"))
    return total


def evaluate(
    checkpoint: str | os.PathLike,
    *,
    data: str | None = None,
    batches: int = 16,
    batch_size: int | None = None,
    seq_len: int | None = None,
    tokenizer: str | None = None,
    text_field: str | None = None,
    bos: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """The report of ``llmarch eval``: ``checkpoint`` (and ``step`` for a run, ``quant`` for a
    quantized checkpoint), ``data``, ``tokens`` and ``bytes`` scored, ``loss`` (nats/token),
    ``perplexity`` and ``bits_per_byte``; see the module docstring.

    Args:
      batches, batch_size: rows evaluated: the first ``batches × batch_size`` (default batch size:
        the run's, else 8).
      seq_len: tokens per row (default: the run's, else min(max_seq_len, 512)).
      tokenizer: read ``data`` with this tokenizer instead of the checkpoint's.
      text_field: the text field of JSONL records (default: the run's, else "text").
      bos: start every document of ``data`` with BOS (as Llama-style checkpoints were trained).

    Raises:
      FileNotFoundError, ValueError: a missing or unreadable checkpoint or corpus, bad settings.
    """
    check_positive("", batches=batches)
    if batch_size is not None:
        check_positive("", batch_size=batch_size)
    if data is not None and not str(data).strip():  # before anything is loaded
        raise ValueError("--data '' is invalid: give a text file, a directory of texts or a .jsonl file")
    loaded = load(checkpoint)
    rows, tok, described = corpus_rows(
        loaded, data, seq_len=seq_len, tokenizer=tokenizer, text_field=text_field, bos=bos
    )
    train = loaded.train
    size = batch_size or (train.batch_size if train is not None else HF_BATCH)
    chunk = train.loss_chunk if train is not None else DEFAULT_LOSS_CHUNK
    from llmarch.train.heldout import make_nll_totals

    graphdef, params, rest = nnx.split(loaded.model, nnx.Param, ...)

    def bar(loop):  # on a terminal only (tqdm: disable=None), as `llmarch eval` prints JSON to stdout
        return tqdm(loop, total=totals.batches, desc="eval", unit="batch", disable=None if progress else True)

    totals = make_nll_totals(graphdef, rows, batch_size=size, batches=batches, loss_chunk=chunk, progress=bar)
    nats, tokens = totals(params, rest)
    n_rows = totals.rows
    size_in_bytes = scored_bytes(rows, tok, n_rows)
    logger.debug(
        "%s: %d rows of %d tokens, %d scored (%d bytes)",
        described,
        n_rows,
        rows.seq_len,
        tokens,
        size_in_bytes,
    )
    loss = nats / max(tokens, 1)
    return {
        **loaded.about,
        "data": described,
        "tokens": tokens,
        "bytes": size_in_bytes,
        "loss": loss,  # nats per token
        "perplexity": math.exp(min(loss, 50.0)),
        "bits_per_byte": nats / (math.log(2) * size_in_bytes) if size_in_bytes else None,  # no text
    }
