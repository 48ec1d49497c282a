"""Response bodies and stream chunks in OpenAI's format, for completions and chat completions.

A token's text in ``logprobs`` is its own decoded text when that is whole characters, else
``"token_id:N"`` (vLLM's convention: a byte token in the middle of a character, a special token
that decodes to nothing, or a model without a tokenizer). With ``return_token_ids`` (an
extension, as in vLLM) each choice and chunk also carries the generated ``token_ids``.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator

from llmarch.serve.protocol import APIError
from llmarch.serve.session import Session
from llmarch.serve.tracker import Delta, TokenLogprob


class Formatter:
    """Builds one response's body, or its chunks, for ``kind`` "completion" or "chat".

    Args:
      kind: the endpoint.
      model: the served model name.
      tokenizer: decodes single tokens for ``logprobs`` (None: ``"token_id:N"``).
      return_token_ids: add ``token_ids`` to each choice and chunk.
      include_usage: streaming: a last chunk with the usage (``stream_options``).
    """

    def __init__(
        self, kind: str, model: str, tokenizer, *, return_token_ids: bool = False, include_usage: bool = False
    ):
        if kind not in ("completion", "chat"):
            raise ValueError(f"kind={kind!r} is invalid: must be 'completion' or 'chat'")
        self.kind, self.model, self.tokenizer = kind, model, tokenizer
        self.return_token_ids, self.include_usage = return_token_ids, include_usage
        self.id = f"{'cmpl' if kind == 'completion' else 'chatcmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    # Pieces ---------------------------------------------------------------------------------

    def token_text(self, token_id: int) -> str:
        tok = self.tokenizer
        if tok is None or token_id >= tok.vocab_size:
            return f"token_id:{token_id}"
        text = tok.decode([token_id])
        return text if text and "\ufffd" not in text else f"token_id:{token_id}"

    def _chat_entry(self, token_id: int, logprob: float) -> dict:
        text = self.token_text(token_id)
        raw = None if text.startswith("token_id:") else list(text.encode("utf-8"))
        return {"token": text, "logprob": logprob, "bytes": raw}

    def logprobs(self, entries: list[TokenLogprob]) -> dict | None:
        """The ``logprobs`` of a choice or chunk (None when none were asked for)."""
        if not entries:
            return None
        if self.kind == "chat":
            content = []
            for e in entries:
                item = self._chat_entry(e.token_id, e.logprob)
                item["top_logprobs"] = [self._chat_entry(t, v) for t, v in e.top.items()]
                content.append(item)
            return {"content": content, "refusal": None}
        return {
            "tokens": [self.token_text(e.token_id) for e in entries],
            "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [{self.token_text(t): v for t, v in e.top.items()} for e in entries],
            "text_offset": [e.text_offset for e in entries],
        }

    @staticmethod
    def usage(session: Session) -> dict:
        prompt = sum(len(p) for p in session.prompts)
        generated = sum(len(t.token_ids) for t in session.all_trackers())
        return {"prompt_tokens": prompt, "completion_tokens": generated, "total_tokens": prompt + generated}

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    # Whole responses ------------------------------------------------------------------------

    def response(self, session: Session) -> dict:
        """The body of a non-streamed response, once ``session`` has finished."""
        choices = []
        for t in sorted(session.all_trackers(), key=lambda t: t.index):
            text = t.text if t.has_text else None
            choice = {"index": t.index}
            if self.kind == "chat":
                choice["message"] = {"role": "assistant", "content": text}
            else:
                choice["text"] = text
            choice["logprobs"] = self.logprobs(t.logprobs)
            choice["finish_reason"] = t.finish_reason
            if self.return_token_ids or not t.has_text:
                choice["token_ids"] = list(t.token_ids)
            choices.append(choice)
        body = self._head("chat.completion" if self.kind == "chat" else "text_completion")
        return {**body, "choices": choices, "usage": self.usage(session)}

    # Streams --------------------------------------------------------------------------------

    def _chunk(self, choices: list[dict], usage: dict | None = None) -> str:
        body = self._head("chat.completion.chunk" if self.kind == "chat" else "text_completion")
        body["choices"] = choices
        if self.include_usage:
            body["usage"] = usage
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    def _delta_chunks(self, d: Delta) -> list[str]:
        logprobs = self.logprobs(d.logprobs)
        ids = {"token_ids": d.token_ids} if self.return_token_ids or d.text is None else {}
        if self.kind == "completion":
            choice = {
                "index": d.index,
                "text": d.text,
                "logprobs": logprobs,
                "finish_reason": d.finish_reason,
            }
            return [self._chunk([{**choice, **ids}])]
        chunks = []
        if d.text or logprobs or ids:
            delta = {"content": d.text}
            choice = {"index": d.index, "delta": delta, "logprobs": logprobs, "finish_reason": None}
            chunks.append(self._chunk([{**choice, **ids}]))
        if d.finish_reason is not None:  # as OpenAI ends a choice: an empty delta with the reason
            chunks.append(
                self._chunk(
                    [{"index": d.index, "delta": {}, "logprobs": None, "finish_reason": d.finish_reason}]
                )
            )
        return chunks

    async def stream(self, session: Session) -> AsyncIterator[str]:
        """Server-sent events: the chunks as tokens come, then usage (if asked), then ``[DONE]``.
        An engine failure after the stream began is sent as an error event; the session is
        closed (its requests aborted) however the stream ends, a client that left included."""
        try:
            if self.kind == "chat":
                for t in sorted(session.all_trackers(), key=lambda t: t.index):
                    delta = {"role": "assistant", "content": ""}
                    yield self._chunk(
                        [{"index": t.index, "delta": delta, "logprobs": None, "finish_reason": None}]
                    )
            async for deltas in session.deltas():
                for d in deltas:
                    for chunk in self._delta_chunks(d):
                        yield chunk
            if self.include_usage:
                yield self._chunk([], self.usage(session))
        except APIError as e:
            yield f"data: {json.dumps(e.body())}\n\n"
        finally:
            session.close()
        yield "data: [DONE]\n\n"
