"""The byte-level tokenizer: UTF-8 bytes are ids 0..255, then the special tokens."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class ByteTokenizer:
    """Needs no files and never meets an unknown symbol; ``vocab_size`` is 259."""

    PAD, BOS, EOS = 256, 257, 258
    vocab_size = 259

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> np.ndarray:
        ids = np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)
        parts = [[self.BOS]] * bos + [ids] + [[self.EOS]] * eos
        return np.concatenate([np.asarray(p, np.int32) for p in parts])

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Text of the byte ids; special tokens are skipped, broken UTF-8 is replaced."""
        ids = np.asarray(ids)
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise ValueError(f"ids span [{ids.min()}, {ids.max()}]: allowed range is "
                             f"[0, vocab_size={self.vocab_size})")
        return bytes(ids[ids < 256].astype(np.uint8)).decode("utf-8", errors="replace")
