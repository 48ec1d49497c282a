"""The OpenAI wire format: request bodies as pydantic models, the error body, the server's limits,
and the mapping of a request's fields to the engine's ``SamplingParams``.

A request is checked here, in the HTTP handler, before it is queued: a field of the wrong type, an
unknown field, or a value the engine refuses (``SamplingParams`` validates itself; ``check`` needs
the model's vocabulary) is a 400 naming the field, and never reaches the engine thread. Fields of
the OpenAI API that llmarch does not implement (penalties, ``logit_bias``, ``echo``, tools, ...)
are refused with a 400 naming them rather than silently ignored.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, field_validator, model_validator

from llmarch.inference.sampling import SamplingParams

# The OpenAI error types by HTTP status (what its clients map to exception classes).
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
}


class APIError(Exception):
    """An error answered with an OpenAI-style body ``{"error": {message, type, param, code}}``."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return error_body(self.status, self.message, param=self.param, code=self.code)


def error_body(status: int, message: str, *, param: str | None = None, code: str | None = None) -> dict:
    return {
        "error": {
            "message": message,
            "type": ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error"),
            "param": param,
            "code": code,
        }
    }


@dataclasses.dataclass(frozen=True)
class ServeLimits:
    """What one request may ask of the server.

    Attributes:
      max_queue: requests (one per prompt) accepted but not yet given their first token; past it
        a request gets 429, so the queue is never unbounded.
      max_prompt_tokens: prompt tokens at most (None: whatever the engine's ``max_len`` allows).
      max_n: completions per prompt at most.
      max_body_bytes: request body bytes at most (413 past it).
    """

    max_queue: int = 128
    max_prompt_tokens: int | None = None
    max_n: int = 16
    max_body_bytes: int = 2 * 2**20

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None and f.name == "max_prompt_tokens":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                allowed = (
                    "None or a positive integer" if f.name == "max_prompt_tokens" else "a positive integer"
                )
                raise ValueError(f"ServeLimits.{f.name}={value!r} is invalid: must be {allowed}")


# Fields of the OpenAI API that are accepted only at their no-op value.
_NO_OP = {
    "frequency_penalty": (None, 0, 0.0),
    "presence_penalty": (None, 0, 0.0),
    "logit_bias": (None, {}),
    "echo": (None, False),
    "suffix": (None, ""),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "functions": (None, []),
    "function_call": (None, "none"),
    "response_format": (None, {"type": "text"}),
}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False


class _Request(BaseModel):
    """Fields common to both endpoints; llmarch's extensions (as vLLM names them) are
    ``top_k``, ``stop_token_ids``, ``ignore_eos`` and ``return_token_ids``."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    n: int = 1
    stop: Any = ()
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    return_token_ids: bool = False
    frequency_penalty: Any = None
    presence_penalty: Any = None
    logit_bias: Any = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, value) -> tuple[str, ...]:
        if value is None:
            return ()
        stops = [value] if isinstance(value, str) else value
        if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
            raise ValueError("must be a non-empty string or a list of non-empty strings")
        return tuple(stops)

    @model_validator(mode="after")
    def _no_ops(self):
        for name, allowed in _NO_OP.items():
            value = getattr(self, name, None)
            if not any(value is a or (type(value) is type(a) and value == a) for a in allowed):
                raise ValueError(f"{name}={value!r} is not supported by this server")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream=true")
        return self

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(_Request):
    """``POST /v1/completions``: ``prompt`` is a string, a list of strings, a list of token ids,
    or a list of lists of token ids (one completion set per prompt)."""

    prompt: Any
    logprobs: int | None = None
    best_of: int | None = None
    echo: Any = None
    suffix: Any = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value) -> list[str | list[int]]:
        def ids(x):
            return (
                isinstance(x, list) and x and all(isinstance(t, int) and not isinstance(t, bool) for t in x)
            )

        if isinstance(value, str):
            return [value]
        if ids(value):
            return [value]
        if isinstance(value, list) and value and all(isinstance(p, str) or ids(p) for p in value):
            return list(value)
        raise ValueError(
            "must be a string, a list of strings, a non-empty list of token ids or a list of such lists"
        )

    @model_validator(mode="after")
    def _best_of(self):
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError(f"best_of={self.best_of} is not supported: only best_of == n")
        return self


class ChatMessage(BaseModel):
    """One message; ``content`` is a string or a list of parts: ``{"type": "text", "text": ...}``,
    and for a vision-language model ``{"type": "image_url", "image_url": {"url": "data:..."}}``."""

    model_config = ConfigDict(extra="forbid", strict=True)

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None

    def text(self, image_marker: str | None = None) -> str | None:
        """The content as one string, its parts joined by newlines, each image part written as
        ``image_marker`` (None: image parts are refused)."""
        if self.content is None or isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") == "text" and isinstance(part.get("text"), str):
                parts.append(part["text"])
            elif part.get("type") == "image_url" and image_marker is not None:
                image_url(part)  # checked here, read by the caller
                parts.append(image_marker)
            else:
                allowed = "{'type': 'text', 'text': str}" + (
                    " and {'type': 'image_url', 'image_url': {'url': str}}" if image_marker else ""
                )
                raise ValueError(
                    f"a {self.role} message has a content part of type {part.get('type')!r}: "
                    f"only {allowed} parts are supported"
                    + (
                        ""
                        if image_marker or part.get("type") != "image_url"
                        else " (the model takes no images)"
                    )
                )
        return "\n".join(parts)

    def image_urls(self) -> list[str]:
        """The URLs of its image parts, in order."""
        if not isinstance(self.content, list):
            return []
        return [image_url(p) for p in self.content if p.get("type") == "image_url"]


def image_url(part: dict[str, Any]) -> str:
    """The URL of an ``image_url`` content part (OpenAI's ``{"url": ..., "detail": ...}``)."""
    inner = part.get("image_url")
    url = inner.get("url") if isinstance(inner, dict) else inner
    if not isinstance(url, str) or not url:
        raise ValueError(f"an image_url part needs image_url.url, a string; got {inner!r:.80}")
    return url


class ChatCompletionRequest(_Request):
    """``POST /v1/chat/completions``; ``max_completion_tokens`` is the newer name of ``max_tokens``."""

    messages: list[ChatMessage]
    logprobs: bool = False
    top_logprobs: int | None = None
    max_completion_tokens: int | None = None
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    response_format: Any = None
    parallel_tool_calls: bool | None = None

    @model_validator(mode="after")
    def _chat(self):
        if not self.messages:
            raise ValueError("messages must hold at least one message")
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            raise ValueError("give max_tokens or max_completion_tokens, not both")
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs=true")
        return self

    def messages_as_dicts(self, image_marker: str | None = None) -> list[dict]:
        """The messages as the chat template reads them (content flattened to a string, each image
        part as ``image_marker``; None: image parts are refused)."""
        out = []
        for m in self.messages:
            message = {"role": m.role, "content": m.text(image_marker)}
            if m.name is not None:
                message["name"] = m.name
            out.append(message)
        return out


def sampling_params(
    body: _Request,
    *,
    max_tokens: int,
    stop_token_ids: tuple[int, ...],
    logprobs: int | None,
    vocab_size: int,
    max_logprobs: int,
    max_num_seqs: int,
    max_n: int,
    logprobs_field: str = "logprobs",
) -> SamplingParams:
    """The request's ``SamplingParams``, checked as the engine checks them.

    ``top_k`` -1 means "off", as in vLLM. Raises ``APIError(400)`` naming the request's field
    (``logprobs_field`` is the one that set ``logprobs``: chat's is ``top_logprobs``).
    """
    if body.n > max_n:
        raise APIError(400, f"n={body.n} is invalid: this server allows at most {max_n}", param="n")
    if body.n > max_num_seqs:
        raise APIError(400, f"n={body.n} exceeds the engine's max_num_seqs={max_num_seqs}", param="n")
    top_k = 0 if body.top_k in (None, -1) else body.top_k
    try:
        params = SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if body.temperature is None else body.temperature,
            top_k=top_k,
            top_p=1.0 if body.top_p is None else body.top_p,
            seed=body.seed,
            stop_token_ids=stop_token_ids,
            logprobs=logprobs,
            n=body.n,
        )
        params.check(vocab_size, max_logprobs)
    except (ValueError, TypeError) as e:
        field = re.search(r"SamplingParams\.(\w+)", str(e))
        name = None if field is None else field.group(1)
        name = logprobs_field if name == "logprobs" else name
        raise APIError(400, str(e), param=name) from None
    return params


def validation_message(errors: list[dict]) -> tuple[str, str | None]:
    """``(message, param)`` for pydantic's errors: each as ``field: problem``, the first field as
    the param."""
    parts, param = [], None
    for error in errors[:3]:
        loc = [str(x) for x in error.get("loc", ()) if x != "body"]
        msg = str(error.get("msg", "invalid")).removeprefix("Value error, ")
        if loc and param is None:
            param = loc[0]
        parts.append(f"{'.'.join(loc)}: {msg}" if loc else msg)
    more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
    return "; ".join(parts) + more, param
