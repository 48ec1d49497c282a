"""Incremental detokenization: the text each new token adds, never half a character.

A character can span several tokens (``"é"`` is two byte tokens; byte-level BPE splits emoji and
CJK the same way), and decoding a prefix that ends inside one gives U+FFFD. Decoding the whole
sequence at every token and diffing against the last text then repeats text (``'caf\\ufffd'``
followed by ``'café'``). ``TextStream`` keeps vLLM's two offsets instead: the text of the ids in a
short window is compared with the text of the window's already-shown prefix, and the difference is
held back while it ends in U+FFFD. Each step decodes only the window, not the whole sequence.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

REPLACEMENT = "\ufffd"


class TextStream:
    """The text of one growing sequence of token ids, given piece by piece.

    ``push(token)`` returns the text that ``token`` completes ("" while the text so far ends in an
    incomplete character); ``push(token, final=True)`` also returns what was held back, so the
    pieces of a finished sequence concatenate to ``decode(all ids)``.
    """

    def __init__(self, decode: Callable[[Sequence[int]], str]):
        self._decode = decode
        self._ids: list[int] = []
        self._start = 0  # the window: ids[start:] are decoded together
        self._shown = 0  # ids[start:shown] are the window's part whose text was already returned

    def push(self, token: int, *, final: bool = False) -> str:
        self._ids.append(int(token))
        shown = self._decode(self._ids[self._start : self._shown])
        text = self._decode(self._ids[self._start :])
        if not final and (len(text) <= len(shown) or text.endswith(REPLACEMENT)):
            return ""  # nothing new, or an incomplete character: wait for the next token
        self._start, self._shown = self._shown, len(self._ids)
        return text[len(shown) :]
