"""What the ``Engine`` gives back: finished requests (``RequestOutput`` of ``Completion``s) and
streamed tokens (``TokenEvent``)."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class Completion:
    """One completion of a prompt. ``token_ids`` include a final stop token, if one ended it."""

    index: int
    token_ids: list[int]
    text: str | None
    logprobs: list[float] | None
    top_logprobs: list[dict[int, float]] | None
    finish_reason: str | None  # "stop", "length", "abort", or None while running


@dataclasses.dataclass
class RequestOutput:
    """A request's state: its completions so far, and latency metrics in seconds."""

    request_id: str
    prompt_token_ids: list[int]
    completions: list[Completion]
    finished: bool
    ttft: float | None  # arrival -> first generated token
    token_latencies: list[float]  # gaps between successive tokens of each completion

    @property
    def token_ids(self) -> list[int]:
        return self.completions[0].token_ids

    @property
    def text(self) -> str | None:
        return self.completions[0].text


@dataclasses.dataclass
class TokenEvent:
    """One generated token, as ``Engine.stream`` yields it."""

    request_id: str
    index: int  # which completion
    token_id: int
    text: str | None  # the text this token adds (with a tokenizer)
    logprob: float | None
    finished: bool
    finish_reason: str | None
