"""One HTTP request in flight: its engine requests (one per prompt) and what its client was shown.

The engine thread's messages arrive on an asyncio queue of the request's own (the sink hands them
over with ``loop.call_soon_threadsafe``). ``deltas`` turns them into what each choice adds, through
a ``CompletionTracker`` per completion; when every completion of a prompt was cut at a stop string
the engine request is aborted at once, rather than left generating text nobody will see.
``close`` aborts whatever is still running: the handler calls it however it ends, so a client
that disconnects frees its pages.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from llmarch.inference.sampling import SamplingParams
from llmarch.serve.protocol import APIError
from llmarch.serve.tracker import CompletionTracker, Delta, merge
from llmarch.serve.worker import EngineWorker, Failed, Overloaded, Rejected, Tokens, Unavailable


class Session:
    """The engine requests of one HTTP request, all with the same ``params``.

    Args:
      worker: the engine thread.
      prompts: token ids per prompt; choice ``k * n + i`` is completion i of prompt k.
      params: their sampling parameters.
      stops: stop strings.
      has_text: whether the engine has a tokenizer (events carry text).
      images: per prompt, its pixel values for a vision-language engine, or None.
    """

    def __init__(
        self,
        worker: EngineWorker,
        prompts: list[list[int]],
        params: SamplingParams,
        stops: tuple[str, ...] = (),
        *,
        has_text: bool = True,
        images: list | None = None,
    ):
        self.worker, self.prompts, self.params = worker, prompts, params
        self.images = [None] * len(prompts) if images is None else images
        n = params.n
        self.trackers = [
            [CompletionTracker(k * n + i, stops, has_text=has_text) for i in range(n)]
            for k in range(len(prompts))
        ]
        self.request_ids: list[str] = []
        self._queue: asyncio.Queue = asyncio.Queue()
        self._loop = asyncio.get_running_loop()
        self._closed = False

    def all_trackers(self) -> list[CompletionTracker]:
        return [t for group in self.trackers for t in group]

    @property
    def finished(self) -> bool:
        return all(t.finished for t in self.all_trackers())

    def _sink(self, message) -> None:
        """Called by the engine thread."""
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, message)
        except RuntimeError:  # the event loop is closed: nobody is waiting any more
            pass

    async def open(self) -> None:
        """Submits the requests and waits until the engine has accepted them.

        Raises:
          APIError: 429 (queue full), 503 (draining or engine down), 400 (the engine refused a
            request: nothing of it runs), 500 (the engine failed).
        """
        try:
            requests = [(p, self.params, im) for p, im in zip(self.prompts, self.images, strict=True)]
            self.request_ids = self.worker.submit(requests, self._sink)
        except Overloaded as e:
            raise APIError(429, str(e), code="queue_full") from None
        except Unavailable as e:
            raise APIError(503, str(e), code="unavailable") from None
        try:
            message = await self._queue.get()
        except BaseException:  # cancelled while waiting: the client is gone
            self.close()
            raise
        if isinstance(message, Rejected):
            self._closed = True
            raise APIError(400, message.message)
        if isinstance(message, Failed):
            self._closed = True
            raise APIError(500, f"the engine failed: {message.message}", code="engine_failed")

    async def deltas(self) -> AsyncIterator[list[Delta]]:
        """What the choices add, message by message, until every completion has finished.

        Raises:
          APIError: 500 when the engine fails meanwhile.
        """
        while not self.finished:
            message = await self._queue.get()
            if isinstance(message, Failed):
                self._closed = True
                raise APIError(500, f"the engine failed: {message.message}", code="engine_failed")
            if not isinstance(message, Tokens):
                continue
            group = self.trackers[message.member]
            tops = message.tops or [None] * len(message.events)
            out = [
                d for e, top in zip(message.events, tops, strict=True) if (d := group[e.index].push(e, top))
            ]
            if all(t.finished for t in group) and not all(t.engine_done for t in group):
                self.worker.abort([self.request_ids[message.member]])  # cut at stop strings
                for t in group:
                    t.engine_done = True
            if out:
                yield merge(out)

    async def collect(self) -> None:
        """Runs to the end (non-streamed responses); closes the session however it ends."""
        try:
            async for _ in self.deltas():
                pass
        finally:
            self.close()

    def close(self) -> None:
        """Aborts the engine requests still running (idempotent)."""
        if self._closed:
            return
        self._closed = True
        running = [
            rid
            for rid, group in zip(self.request_ids, self.trackers, strict=False)
            if not all(t.engine_done for t in group)
        ]
        self.worker.abort(running)
