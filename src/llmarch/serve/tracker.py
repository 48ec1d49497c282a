"""What the client is shown of one completion: its text cut at a stop string, as it streams.

The engine stops at stop *tokens*; stop *strings* are matched here, on the text (so a stop string
that spans several tokens, or ends inside one, is found all the same). The text a completion
returns ends just before the first stop string, and the completion ends with reason "stop". While
streaming, text that might be the start of a stop string is held back until the next token shows
whether it is (the longest suffix of the text that is a proper prefix of some stop string), so no
chunk ever shows part of a stop string that is later cut.
"""

from __future__ import annotations

import dataclasses

from llmarch.inference.outputs import TokenEvent


@dataclasses.dataclass
class TokenLogprob:
    """A generated token's log-probability and the most likely alternatives (by token id)."""

    token_id: int
    logprob: float
    top: dict[int, float]
    text_offset: int  # where the token's text starts in the completion's text


@dataclasses.dataclass
class Delta:
    """What one completion adds in one message of the engine thread."""

    index: int  # the choice's index in the response
    text: str | None  # None without a tokenizer
    token_ids: list[int]
    logprobs: list[TokenLogprob]  # one per token, when asked for
    finish_reason: str | None  # set on the completion's last delta


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """Characters at the end of ``text`` that could begin a stop string."""
    longest = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:k]):
                longest = k
                break
    return longest


class CompletionTracker:
    """One completion as the client sees it: ``push`` each engine event, get the delta to send.

    Args:
      index: the choice's index.
      stops: stop strings (empty without a tokenizer).
      has_text: whether events carry text (the engine has a tokenizer).
    """

    def __init__(self, index: int, stops: tuple[str, ...] = (), *, has_text: bool = True):
        self.index, self.stops, self.has_text = index, tuple(stops), has_text
        self.text = ""  # shown so far (held-back text excluded)
        self.token_ids: list[int] = []
        self.logprobs: list[TokenLogprob] = []
        self.finish_reason: str | None = None
        self.engine_done = False  # the engine ended it (else it may still run after a stop string)
        self._held = ""

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def push(self, event: TokenEvent, top: dict[int, float] | None = None) -> Delta | None:
        """The delta that ``event`` makes (None once the completion was cut at a stop string)."""
        self.engine_done = self.engine_done or event.finished
        if self.finished:
            return None
        logprobs = []
        if event.logprob is not None:
            offset = len(self.text) + len(self._held)
            logprobs.append(TokenLogprob(event.token_id, event.logprob, dict(top or {}), offset))
        finish = event.finish_reason if event.finished else None
        text = None
        if self.has_text:
            pending = self._held + (event.text or "")
            cut = min((i for i in (pending.find(s) for s in self.stops) if i >= 0), default=-1)
            if cut >= 0:
                text, self._held, finish = pending[:cut], "", "stop"
            elif event.finished:
                text, self._held = pending, ""
            else:
                keep = _held_back(pending, self.stops)
                text, self._held = pending[: len(pending) - keep], pending[len(pending) - keep :]
            self.text += text
        self.token_ids.append(event.token_id)
        self.logprobs += logprobs
        self.finish_reason = finish
        return Delta(self.index, text, [event.token_id], logprobs, finish)


def merge(deltas: list[Delta]) -> list[Delta]:
    """The deltas of each choice joined into one, in order of first appearance (a message of the
    engine thread may hold several tokens of a completion)."""
    joined: dict[int, Delta] = {}
    for d in deltas:
        if d.index not in joined:
            joined[d.index] = Delta(d.index, d.text, list(d.token_ids), list(d.logprobs), d.finish_reason)
            continue
        j = joined[d.index]
        j.text = None if d.text is None else (j.text or "") + d.text
        j.token_ids += d.token_ids
        j.logprobs += d.logprobs
        j.finish_reason = d.finish_reason or j.finish_reason
    return list(joined.values())
