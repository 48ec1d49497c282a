"""An llmarch tokenizer as the files of a Hugging Face checkpoint: ``tokenizer.json`` (a
``tokenizers`` pipeline), ``tokenizer_config.json`` (the class and the special tokens) and
``generation_config.json`` (the ids that begin, end and pad a sequence).

transformers' ``AutoTokenizer`` then encodes and decodes text exactly as llmarch does: it adds no
special token to text (llmarch adds BOS/EOS only when asked) and parses none out of it
(``split_special_tokens``), so a document that contains ``"</s>"`` reads as its characters. The one
exception is a tokenizer with a chat template: a template renders its special tokens as text, so
there they must be parsed.

The byte tokenizer (ids 0..255 the bytes, 256 PAD, 257 BOS, 258 EOS) becomes a byte-level BPE with
no merges: the ``ByteLevel`` pre-tokenizer turns text into one symbol per UTF-8 byte, the vocabulary
gives byte ``b``'s symbol the id ``b``, and the three special tokens are added tokens with ids
256..258, so every runtime that reads GPT-2-style byte-level BPE (transformers, vLLM, llama.cpp's
converter) reads it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import tokenizers

from llmarch.data.tokenizer import TOKENIZER_FILE, BPETokenizer, ByteTokenizer

TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
# The byte tokenizer's special tokens by name, in id order 256, 257, 258.
BYTE_SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>"}


def byte_symbols() -> list[str]:
    """The ``ByteLevel`` symbol of each byte 0..255, as GPT-2's byte-level BPE spells them.

    ``tokenizers`` gives the alphabet as a set; its order is GPT-2's rule: a printable Latin-1 byte
    is its own character, and the other bytes, in increasing order, take the characters from
    U+0100 on, in increasing order.
    """
    alphabet = tokenizers.pre_tokenizers.ByteLevel.alphabet()
    shifted = iter(sorted(c for c in alphabet if ord(c) > 255))
    return [chr(b) if chr(b) in alphabet else next(shifted) for b in range(256)]


def byte_level_tokenizer() -> tokenizers.Tokenizer:
    """``ByteTokenizer`` as a ``tokenizers.Tokenizer``: the same ids for any text, and back."""
    vocab = {symbol: b for b, symbol in enumerate(byte_symbols())}
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=[]))
    # One symbol per byte; no regex split (no merges to keep within words) and no prefix space.
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    specials = [
        tokenizers.AddedToken(name, special=True, normalized=False) for name in BYTE_SPECIAL_TOKENS.values()
    ]
    tok.add_special_tokens(specials)  # ids 256, 257, 258: next after the vocabulary, in order
    got = [tok.token_to_id(name) for name in BYTE_SPECIAL_TOKENS.values()]
    if got != [ByteTokenizer.PAD, ByteTokenizer.BOS, ByteTokenizer.EOS]:  # the library's id rule moved
        raise RuntimeError(f"byte tokenizer special tokens got ids {got}, expected 256, 257, 258")
    return tok


def _pipeline(tokenizer: Any) -> tuple[tokenizers.Tokenizer, dict[str, str]]:
    """``(tokenizers pipeline, special token names)`` of an llmarch tokenizer."""
    if isinstance(tokenizer, ByteTokenizer):
        return byte_level_tokenizer(), dict(BYTE_SPECIAL_TOKENS)
    if isinstance(tokenizer, BPETokenizer):
        names = {
            "pad_token": tokenizer.pad_token,
            "bos_token": tokenizer.bos_token,
            "eos_token": tokenizer.eos_token,
        }
        return tokenizer.hf_tokenizer, names
    raise TypeError(
        f"tokenizer {tokenizer!r} cannot be written as Hugging Face files; allowed: ByteTokenizer or "
        "BPETokenizer (llmarch.data.tokenizer)"
    )


def token_ids(tokenizer: Any) -> dict[str, int]:
    """``{"bos_token_id", "eos_token_id", "pad_token_id"}`` of an llmarch tokenizer, as
    ``config.json`` and ``generation_config.json`` name them."""
    return {
        "bos_token_id": int(tokenizer.bos_id),
        "eos_token_id": int(tokenizer.eos_id),
        "pad_token_id": int(tokenizer.pad_id),
    }


def tokenizer_config(
    tokenizer: Any, *, model_max_length: int, chat_template: str | None = None
) -> dict[str, Any]:
    """The ``tokenizer_config.json`` of an llmarch tokenizer: transformers' generic fast class over
    ``tokenizer.json``, the special tokens by name, and no cleanup of decoded text."""
    _, names = _pipeline(tokenizer)
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **names,
        "model_max_length": int(model_max_length),
        "clean_up_tokenization_spaces": False,  # decode(encode(t)) == t, as in llmarch
        "split_special_tokens": chat_template is None,  # see the module docstring
    }
    if chat_template is not None:
        if not isinstance(chat_template, str) or not chat_template.strip():
            raise ValueError(f"chat_template={chat_template!r} is invalid: give a Jinja template string")
        config["chat_template"] = chat_template
    return config


def write_tokenizer(
    tokenizer: Any,
    root: str | Path,
    *,
    model_max_length: int,
    chat_template: str | None = None,
) -> list[str]:
    """Writes ``tokenizer.json``, ``tokenizer_config.json`` and ``generation_config.json`` for an
    llmarch tokenizer into the directory ``root``; returns the names written.

    The generation config holds the special token ids only: llmarch has no sampling defaults to
    carry, so each runtime keeps its own (transformers: greedy).

    Raises:
      TypeError: a tokenizer that is neither ``ByteTokenizer`` nor ``BPETokenizer``.
      ValueError: an empty ``chat_template``.
    """
    pipeline, _ = _pipeline(tokenizer)
    config = tokenizer_config(tokenizer, model_max_length=model_max_length, chat_template=chat_template)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    pipeline.save(str(root / TOKENIZER_FILE))
    (root / TOKENIZER_CONFIG_FILE).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    (root / GENERATION_CONFIG_FILE).write_text(json.dumps(token_ids(tokenizer), indent=2) + "\n")
    return [TOKENIZER_FILE, TOKENIZER_CONFIG_FILE, GENERATION_CONFIG_FILE]
