"""The OpenAI-compatible HTTP app (FastAPI): routes, the gate in front of them, and the lifespan.

``create_app(engine, ...)`` serves ``GET /v1/models``, ``POST /v1/completions``,
``POST /v1/chat/completions`` (streamed as server-sent events with ``stream: true``),
``GET /health`` and ``GET /metrics``. Its lifespan starts the engine thread (``EngineWorker``)
and, at shutdown, lets it finish what is in flight before it stops.

Before any route, a pure ASGI gate (pure so that streaming and disconnects pass through it
untouched) counts every answer by route and status, answers 503 while the server drains,
checks the bearer token on every route but ``/health`` (401), and buffers the body up to the
size limit (413 past it). Every error is an OpenAI-style body ``{"error": {...}}``.

A client that disconnects has its requests aborted: a stream is cancelled by Starlette and its
generator closes the session; a non-streamed request races its result against the client's
``http.disconnect``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from llmarch.inference.images import expand_placeholders
from llmarch.serve.chat import ChatTemplate
from llmarch.serve.metrics import ServerMetrics
from llmarch.serve.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    ServeLimits,
    error_body,
    sampling_params,
    validation_message,
)
from llmarch.serve.responses import Formatter
from llmarch.serve.session import Session
from llmarch.serve.worker import EngineWorker
from llmarch.vision.preprocess import ImageProcessing, decode_data_url

log = logging.getLogger("llmarch.serve")
ROUTES = ("/v1/models", "/v1/completions", "/v1/chat/completions", "/health", "/metrics")
_OPEN = ("/health",)  # no API key needed
_WHILE_DRAINING = ("/health", "/metrics")
_DRAIN_BODY_CAP = 16 * 2**20  # bytes read and dropped from a body refused as too large


async def _answer(scope, receive, send, status: int, message: str, code: str | None = None) -> None:
    await JSONResponse(error_body(status, message, code=code), status_code=status)(scope, receive, send)


class _Gate:
    """Counts, drain, API key and body limit, in front of the app."""

    def __init__(self, app, server: ServerState):
        self.app, self.server = app, server

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500  # unless a response starts

        async def counted(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self._pass(scope, receive, counted)
        finally:
            route = scope["path"] if scope["path"] in ROUTES else "other"
            self.server.metrics.requests.labels(route, str(status)).inc()

    async def _pass(self, scope, receive, send):
        server, path = self.server, scope["path"]
        if server.draining and path not in _WHILE_DRAINING:
            return await _answer(scope, receive, send, 503, "the server is shutting down", "shutting_down")
        headers = dict(scope["headers"])
        if server.api_key is not None and path not in _OPEN:
            given = headers.get(b"authorization", b"")
            if not hmac.compare_digest(given, b"Bearer " + server.api_key.encode()):
                return await _answer(
                    scope, receive, send, 401, "invalid or missing API key", "invalid_api_key"
                )
        limit = server.limits.max_body_bytes
        length = headers.get(b"content-length")
        if length is not None and not length.isdigit():
            return await _answer(scope, receive, send, 400, f"bad Content-Length {length.decode()!r}")
        if length is not None and int(length) > limit:
            await self._drop_body(receive)
            message = f"the body has {int(length)} bytes: at most {limit} allowed"
            return await _answer(scope, receive, send, 413, message)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > limit:
                if more:
                    await self._drop_body(receive)
                return await _answer(scope, receive, send, 413, f"the body exceeds {limit} bytes")
        body = b"".join(chunks)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    @staticmethod
    async def _drop_body(receive) -> None:
        """Reads the rest of a refused body (up to a cap), so the client reads our answer."""
        dropped = 0
        while dropped < _DRAIN_BODY_CAP:
            message = await receive()
            if message["type"] != "http.request":
                return
            dropped += len(message.get("body", b""))
            if not message.get("more_body", False):
                return


class ServerState:
    """What the routes share: the engine (its immutable settings only: the thread owns it), the
    worker, limits, tokenizer, chat template, default stop tokens, metrics and the drain flag."""

    def __init__(
        self,
        engine,
        *,
        model_name: str,
        api_key: str | None,
        limits: ServeLimits,
        chat_template: ChatTemplate | None,
        stop_token_ids: tuple[int, ...] | None,
        metrics: ServerMetrics,
        image_processing: ImageProcessing | None = None,
    ):
        self.engine, self.model_name, self.api_key, self.limits = engine, model_name, api_key, limits
        self.tokenizer, self.chat_template, self.metrics = engine.tokenizer, chat_template, metrics
        if image_processing is None and engine.images is not None:  # SigLIP's settings at the tower's size
            image_processing = ImageProcessing.for_tower(engine.images.cfg.vision)
        self.image_processing = image_processing
        vocab = engine.cfg.vocab_size
        if stop_token_ids is None:  # the tokenizer's EOS ends a completion, unless ignore_eos
            eos = getattr(self.tokenizer, "eos_id", None)
            stop_token_ids = (eos,) if eos is not None and eos < vocab else ()
        self.stop_token_ids = tuple(stop_token_ids)
        self.worker = EngineWorker(engine, max_queue=limits.max_queue, metrics=metrics)
        self.draining = False
        self.created = int(time.time())

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise APIError(
                404,
                f"the model {model!r} does not exist: this server serves {self.model_name!r}",
                param="model",
                code="model_not_found",
            )

    def _check_length(self, ids: list[int], param: str) -> list[int]:
        limit = self.limits.max_prompt_tokens
        top = self.engine.max_len - 1  # leaves room for one generated token
        if not ids:
            raise APIError(400, f"{param} is empty: a prompt needs at least one token", param=param)
        if limit is not None and len(ids) > limit:
            raise APIError(
                400, f"{param} has {len(ids)} tokens: this server allows at most {limit}", param=param
            )
        if len(ids) > top:
            raise APIError(
                400,
                f"{param} has {len(ids)} tokens: the model's context (max_len={self.engine.max_len}) "
                f"leaves room for at most {top}",
                param=param,
            )
        return ids

    def prompt_ids(self, prompts: list[str | list[int]]) -> list[list[int]]:
        """Token ids of each prompt of a completion request (runs in a worker thread)."""
        if len(prompts) > self.limits.max_queue:
            raise APIError(
                400,
                f"{len(prompts)} prompts in one request: at most max_queue={self.limits.max_queue}",
                param="prompt",
            )
        out = []
        for p in prompts:
            if isinstance(p, str):
                if self.tokenizer is None:
                    raise APIError(
                        400, "this model has no tokenizer: give the prompt as token ids", param="prompt"
                    )
                p = [int(t) for t in self.tokenizer.encode(p)]
            out.append(self._check_length(p, "prompt"))
        return out

    def _image_marker(self) -> str:
        """The text that the tokenizer reads as the model's one image placeholder token."""
        token_id = self.engine.images.cfg.image_token_id
        hf = getattr(self.tokenizer, "hf_tokenizer", None)
        marker = hf.id_to_token(token_id) if hf is not None else self.tokenizer.decode([token_id])
        if not marker or [int(t) for t in self.chat_template.encode_text(marker)] != [token_id]:
            raise APIError(
                400,
                f"this model's tokenizer has no text for its image placeholder (id {token_id}) that it "
                "reads back as that one token: images cannot be placed in a chat",
                param="messages",
            )
        return marker

    def chat_ids(self, body: ChatCompletionRequest) -> tuple[list[int], np.ndarray | None]:
        """Token ids of a conversation and the pixel values of its images (None: it has none),
        whose placeholders the ids hold expanded (runs in a worker thread)."""
        if self.tokenizer is None or self.chat_template is None:
            raise APIError(
                400,
                "this model has no chat template (none in its tokenizer_config.json or "
                "chat_template.jinja; start the server with --chat-template FILE): use /v1/completions",
                param="messages",
                code="no_chat_template",
            )
        parts = [p for m in body.messages if isinstance(m.content, list) for p in m.content]
        images = any(p.get("type") == "image_url" for p in parts)
        marker = self._image_marker() if images and self.engine.images is not None else None
        pixels = None
        try:  # image parts are refused here unless the model takes images (marker)
            ids = self.chat_template.encode(body.messages_as_dicts(marker))
            urls = [url for m in body.messages for url in m.image_urls()]
            if urls:  # the chat's images, in order: each <image> marker becomes its tokens
                pixels = np.stack([self.image_processing(decode_data_url(url)) for url in urls])
                c = self.engine.images.cfg
                ids = expand_placeholders([int(t) for t in ids], c.image_token_id, c.image_tokens, len(urls))
        except ValueError as e:
            raise APIError(400, str(e), param="messages") from None
        return self._check_length(ids, "messages"), pixels

    def params(self, body, *, max_tokens: int, logprobs: int | None, logprobs_field: str = "logprobs"):
        if body.stop and self.tokenizer is None:
            raise APIError(400, "stop strings need a tokenizer: use stop_token_ids", param="stop")
        stops = () if body.ignore_eos else self.stop_token_ids
        extra = tuple(body.stop_token_ids or ())
        engine = self.engine
        return sampling_params(
            body,
            max_tokens=max_tokens,
            stop_token_ids=tuple(dict.fromkeys(stops + extra)),
            logprobs=logprobs,
            vocab_size=engine.cfg.vocab_size,
            max_logprobs=engine.config.max_logprobs,
            max_num_seqs=engine.config.max_num_seqs,
            max_n=self.limits.max_n,
            logprobs_field=logprobs_field,
        )


async def _disconnected(request: Request) -> None:
    """Returns when the client has gone (the body was read already, so this is all that comes)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _respond(
    server: ServerState, request: Request, body, prompts, params, fmt: Formatter, images=None
) -> Response:
    session = Session(
        server.worker, prompts, params, body.stop, has_text=server.tokenizer is not None, images=images
    )
    if body.stream:
        await session.open()
        return StreamingResponse(
            fmt.stream(session),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache"},
            background=BackgroundTask(session.close),  # also if the client left before the first chunk
        )

    async def run():
        await session.open()
        await session.collect()

    work = asyncio.ensure_future(run())
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not work.done():  # the client left (or this handler was cancelled): stop its requests
            work.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await work
            session.close()
    if work.cancelled():
        return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
    work.result()  # raises the APIError, if any
    return JSONResponse(fmt.response(session))


def create_app(
    engine,
    *,
    model_name: str = "llmarch",
    api_key: str | None = None,
    limits: ServeLimits | None = None,
    chat_template: ChatTemplate | None = None,
    stop_token_ids: tuple[int, ...] | None = None,
    drain_timeout: float | None = 60.0,
    metrics: ServerMetrics | None = None,
    image_processing: ImageProcessing | None = None,
) -> FastAPI:
    """The app serving ``engine`` (an ``llmarch.inference.Engine``, which only the app's engine
    thread uses once the app has started).

    Args:
      model_name: the id in ``/v1/models``; requests naming another model get 404.
      api_key: when given, every route but ``/health`` needs ``Authorization: Bearer <key>``.
      limits: queue, prompt, ``n`` and body limits (``ServeLimits``).
      chat_template: serves ``/v1/chat/completions`` (None: it answers 400).
      stop_token_ids: tokens that end every completion unless a request sets ``ignore_eos``
        (None: the tokenizer's EOS).
      drain_timeout: at shutdown, seconds to let requests in flight finish before aborting them.
      metrics: where to count (default: a registry of the app's own).
      image_processing: how a vision-language engine's chat images become pixel values (default:
        ``ImageProcessing.for_tower``, SigLIP's settings); chat messages carry images as
        ``image_url`` parts with inline ``data:`` URLs.
    """
    if not model_name:
        raise ValueError(f"model_name={model_name!r} is invalid: give the name clients will use")
    if api_key is not None and not api_key.strip():
        raise ValueError("api_key='' is invalid: give a key, or None for no key")
    server = ServerState(
        engine,
        model_name=model_name,
        api_key=api_key,
        limits=limits or ServeLimits(),
        chat_template=chat_template,
        stop_token_ids=stop_token_ids,
        metrics=metrics or ServerMetrics(),
        image_processing=image_processing,
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        server.worker.start()
        yield
        server.draining = True
        await run_in_threadpool(server.worker.stop, drain_timeout)

    app = FastAPI(title="llmarch", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server
    app.add_middleware(_Gate, server=server)

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, e: RequestValidationError):
        message, param = validation_message(e.errors())
        return JSONResponse(error_body(400, message, param=param), status_code=400)

    @app.exception_handler(HTTPException)
    async def _http(request, e: HTTPException):
        return JSONResponse(error_body(e.status_code, str(e.detail)), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def _crash(request, e: Exception):
        log.exception("request failed")
        return JSONResponse(error_body(500, f"internal error: {type(e).__name__}: {e}"), status_code=500)

    @app.get("/health")
    async def health():
        if not server.worker.alive:
            error = server.worker.error or "the engine thread is not running"
            return JSONResponse({"status": "unhealthy", "error": error}, status_code=503)
        if server.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return Response(server.metrics.render(), media_type=server.metrics.content_type)

    @app.get("/v1/models")
    async def models():
        card = {
            "id": server.model_name,
            "object": "model",
            "created": server.created,
            "owned_by": "llmarch",
            "max_model_len": engine.max_len,
        }
        return {"object": "list", "data": [card]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        server.check_model(body.model)
        prompts = await run_in_threadpool(server.prompt_ids, body.prompt)
        params = server.params(
            body, max_tokens=16 if body.max_tokens is None else body.max_tokens, logprobs=body.logprobs
        )
        fmt = Formatter(
            "completion",
            server.model_name,
            server.tokenizer,
            return_token_ids=body.return_token_ids,
            include_usage=body.include_usage,
        )
        return await _respond(server, request, body, prompts, params, fmt)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        server.check_model(body.model)
        ids, pixels = await run_in_threadpool(server.chat_ids, body)
        max_tokens = body.max_tokens if body.max_tokens is not None else body.max_completion_tokens
        if max_tokens is None:  # as much as the context leaves
            max_tokens = engine.max_len - len(ids)
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        params = server.params(body, max_tokens=max_tokens, logprobs=logprobs, logprobs_field="top_logprobs")
        fmt = Formatter(
            "chat",
            server.model_name,
            server.tokenizer,
            return_token_ids=body.return_token_ids,
            include_usage=body.include_usage,
        )
        return await _respond(server, request, body, [ids], params, fmt, images=[pixels])

    return app
