"""Tokenizers behind one small protocol: the byte tokenizer, and byte-level BPE from HF ``tokenizers``.

Every tokenizer has ``vocab_size``, ``pad_id``, ``bos_id``, ``eos_id`` and
``encode(text, *, bos=False, eos=False) -> int32 [n]`` / ``decode(ids) -> str``. Special tokens
are never parsed out of the text: ``encode`` adds BOS/EOS only when asked, so a corpus that happens
to contain the string ``"</s>"`` cannot end a document early, and ``decode(encode(t)) == t``.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Iterable, Sequence
from typing import Protocol, runtime_checkable

import numpy as np
import tokenizers

TOKENIZER_FILE = "tokenizer.json"  # the file name Hugging Face checkpoints ship


@runtime_checkable
class Tokenizer(Protocol):
    """What the data pipeline and the CLI need from a tokenizer."""

    vocab_size: int
    pad_id: int
    bos_id: int
    eos_id: int

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> np.ndarray: ...

    def decode(self, ids: Sequence[int] | np.ndarray) -> str: ...


def _check_ids(ids: Sequence[int] | np.ndarray, vocab_size: int) -> np.ndarray:
    ids = np.asarray(ids)
    if ids.ndim != 1:
        raise ValueError(f"ids has shape {ids.shape}: expected a 1-D sequence of token ids")
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        raise ValueError(
            f"ids span [{ids.min()}, {ids.max()}]: allowed range is [0, vocab_size={vocab_size})"
        )
    return ids


def _with_specials(ids: np.ndarray, bos_id: int | None, eos_id: int | None) -> np.ndarray:
    parts = [[bos_id]] * (bos_id is not None) + [ids] + [[eos_id]] * (eos_id is not None)
    return np.concatenate([np.asarray(p, np.int32) for p in parts])


class ByteTokenizer:
    """Needs no files and never meets an unknown symbol; ``vocab_size`` is 259."""

    PAD, BOS, EOS = 256, 257, 258
    pad_id, bos_id, eos_id = PAD, BOS, EOS
    vocab_size = 259

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> np.ndarray:
        ids = np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)
        return _with_specials(ids, self.BOS if bos else None, self.EOS if eos else None)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Text of the byte ids; special tokens are skipped, broken UTF-8 is replaced."""
        ids = _check_ids(ids, self.vocab_size)
        return bytes(ids[ids < 256].astype(np.uint8)).decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer()"


class BPETokenizer:
    """Byte-level BPE (GPT-2 style) held in a Hugging Face ``tokenizers.Tokenizer``.

    Byte-level means every UTF-8 byte is in the base alphabet, so any text encodes without an
    unknown token and decodes back exactly. The special tokens are ordinary entries of the
    ``tokenizer.json``; which of them are PAD/BOS/EOS is given by name, because the file format has
    no field for it (transformers keeps that in a separate ``tokenizer_config.json``).
    """

    def __init__(
        self,
        tokenizer: tokenizers.Tokenizer,
        *,
        bos_token: str = "<s>",
        eos_token: str = "</s>",
        pad_token: str = "<pad>",
    ):
        self._tok = tokenizer
        # Text is text: "<s>" written in a document encodes as the characters, not as BOS.
        self._tok.encode_special_tokens = True
        self.bos_token, self.eos_token, self.pad_token = bos_token, eos_token, pad_token
        self.bos_id = self._special_id("bos_token", bos_token)
        self.eos_id = self._special_id("eos_token", eos_token)
        self.pad_id = self._special_id("pad_token", pad_token)
        # Ids of files made by others need not be contiguous: size the embedding by the largest one.
        self.vocab_size = max(tokenizer.get_vocab(with_added_tokens=True).values()) + 1
        self._special_ids = np.asarray(sorted(tokenizer.get_added_tokens_decoder()), np.int64)

    def _special_id(self, field: str, name: str) -> int:
        token_id = self._tok.token_to_id(name)
        if token_id is None:
            found = sorted(t.content for t in self._tok.get_added_tokens_decoder().values() if t.special)
            raise ValueError(
                f"{field}={name!r} is not in the tokenizer's vocabulary: its special "
                f"tokens are {found}; pass the right name as {field}=..."
            )
        return token_id

    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        vocab_size: int,
        *,
        min_frequency: int = 2,
        bos_token: str = "<s>",
        eos_token: str = "</s>",
        pad_token: str = "<pad>",
        show_progress: bool = False,
    ) -> BPETokenizer:
        """Learns merges on ``texts`` until the vocabulary has ``vocab_size`` entries.

        The ids are: the special tokens first (PAD, BOS, EOS in that order, 0..2 when distinct),
        then the 256 byte symbols, then the merges. A small corpus may run out of pairs seen
        ``min_frequency`` times, leaving fewer than ``vocab_size`` entries.
        """
        if isinstance(texts, str):
            raise TypeError("texts is a str: pass an iterable of documents, e.g. [text]")
        specials = list(dict.fromkeys([pad_token, bos_token, eos_token]))  # distinct, in order
        smallest = 256 + len(specials)
        if not isinstance(vocab_size, int) or vocab_size < smallest:
            raise ValueError(
                f"vocab_size={vocab_size!r} is too small: byte-level BPE needs the 256 "
                f"bytes plus {len(specials)} special tokens, so at least {smallest}"
            )
        if min_frequency < 1:
            raise ValueError(f"min_frequency={min_frequency}: must be >= 1")
        tok = tokenizers.Tokenizer(tokenizers.models.BPE())
        tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = tokenizers.decoders.ByteLevel()
        tok.post_processor = tokenizers.processors.ByteLevel(trim_offsets=False)
        trainer = tokenizers.trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=specials,
            initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
            show_progress=show_progress,
        )
        tok.train_from_iterator(texts, trainer)
        return cls(tok, bos_token=bos_token, eos_token=eos_token, pad_token=pad_token)

    def save(self, path: str | os.PathLike) -> pathlib.Path:
        """Writes ``tokenizer.json``; ``path`` is that file (``*.json``) or a directory for it.

        Returns the path of the file written.
        """
        path = pathlib.Path(path)
        if path.suffix != ".json":
            path.mkdir(parents=True, exist_ok=True)
            path = path / TOKENIZER_FILE
        self._tok.save(str(path))
        return path

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        *,
        bos_token: str = "<s>",
        eos_token: str = "</s>",
        pad_token: str = "<pad>",
    ) -> BPETokenizer:
        """Reads a ``tokenizer.json`` (or a directory holding one), ours or a Hugging Face model's.

        The names pick BOS/EOS/PAD among its tokens; e.g. GPT-2's file has only
        ``"<|endoftext|>"``, which may serve as all three.
        """
        file = _tokenizer_file(path)
        return cls(
            tokenizers.Tokenizer.from_file(str(file)),
            bos_token=bos_token,
            eos_token=eos_token,
            pad_token=pad_token,
        )

    @property
    def hf_tokenizer(self) -> tokenizers.Tokenizer:
        """The wrapped Hugging Face tokenizer."""
        return self._tok

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> np.ndarray:
        ids = np.asarray(self._tok.encode(text, add_special_tokens=False).ids, np.int32)
        return _with_specials(ids, self.bos_id if bos else None, self.eos_id if eos else None)

    def encode_batch(self, texts: Sequence[str], *, bos: bool = False, eos: bool = False) -> list[np.ndarray]:
        """``[encode(t, bos=bos, eos=eos) for t in texts]``, encoded in parallel by the Rust library."""
        encodings = self._tok.encode_batch_fast(list(texts), add_special_tokens=False)
        return [
            _with_specials(
                np.asarray(e.ids, np.int32), self.bos_id if bos else None, self.eos_id if eos else None
            )
            for e in encodings
        ]

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Text of the ids; special tokens are skipped, broken UTF-8 is replaced."""
        ids = _check_ids(ids, self.vocab_size)
        ids = ids[~np.isin(ids, self._special_ids)]
        return self._tok.decode(ids.tolist(), skip_special_tokens=True)

    def __repr__(self) -> str:
        return (
            f"BPETokenizer(vocab_size={self.vocab_size}, bos={self.bos_token!r}, "
            f"eos={self.eos_token!r}, pad={self.pad_token!r})"
        )


def _tokenizer_file(path: str | os.PathLike) -> pathlib.Path:
    path = pathlib.Path(path)
    file = path / TOKENIZER_FILE if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(
            f"no tokenizer file at {file}: expected a {TOKENIZER_FILE} or a directory holding one"
        )
    return file


def load_tokenizer(spec: str | os.PathLike, **special_names: str) -> Tokenizer:
    """The tokenizer named by ``spec``: ``"byte"``, or a path to a ``tokenizer.json`` or its directory.

    ``special_names`` (``bos_token=``, ``eos_token=``, ``pad_token=``) go to ``BPETokenizer.load``.
    """
    if isinstance(spec, str) and spec == "byte":
        if special_names:
            raise ValueError(
                f"special token names {sorted(special_names)} were given for the byte "
                f"tokenizer, whose special tokens are fixed"
            )
        return ByteTokenizer()
    path = pathlib.Path(spec)
    looks_like_path = path.suffix == ".json" or os.sep in str(spec) or path.exists()
    if not looks_like_path:
        raise ValueError(
            f"tokenizer spec {str(spec)!r} is unknown: allowed are 'byte' or a path to "
            f"a {TOKENIZER_FILE} (or a directory holding one)"
        )
    return BPETokenizer.load(path, **special_names)
