"""The engine thread: the one thread that owns the ``Engine`` (which is not thread-safe).

HTTP handlers never touch the engine. They ``submit`` a group of requests (one per prompt of an
HTTP request) with a *sink*, a thread-safe callable that takes the messages meant for them; the
server's sink hands each message to the handler's asyncio queue with
``loop.call_soon_threadsafe``. The thread takes what was submitted (and aborts) between steps,
adds it to the engine, steps the engine while it has work, and sends every generated token to its
request's sink, so all clients' requests share each step (continuous batching).

Messages a sink receives, in order: ``Accepted`` or ``Rejected`` (the engine's own validation,
before anything changed), then ``Tokens`` as they are generated, the last event of each
completion marked finished; ``Failed`` instead if the engine raised (the thread is then dead: every
request in flight and every later submission fails, so no request ever hangs).

The queue is bounded: requests accepted but not yet given their first token are at most
``max_queue``; ``submit`` raises ``Overloaded`` past it.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
import uuid
from collections.abc import Callable

from llmarch.inference.outputs import TokenEvent
from llmarch.inference.sampling import SamplingParams

log = logging.getLogger("llmarch.serve")


@dataclasses.dataclass
class Accepted:
    request_ids: list[str]


@dataclasses.dataclass
class Rejected:
    message: str


@dataclasses.dataclass
class Tokens:
    member: int  # which request of the group
    events: list[TokenEvent]
    tops: list[dict[int, float]] | None  # per event, the top alternatives (when asked for)


@dataclasses.dataclass
class Failed:
    message: str


Sink = Callable[[object], None]


class Overloaded(Exception):
    """The queue is full: the request was not accepted (HTTP 429)."""


class Unavailable(Exception):
    """The engine thread is draining or dead: the request was not accepted (HTTP 503)."""


@dataclasses.dataclass(eq=False)
class _Live:
    """A request in the engine, as the thread tracks it."""

    member: int
    params: SamplingParams
    sink: Sink
    submitted: float
    started: bool = False
    finished: int = 0  # completions ended
    counts: dict[int, int] = dataclasses.field(default_factory=dict)  # tokens per completion
    last: dict[int, float] = dataclasses.field(default_factory=dict)  # last token time per completion


@dataclasses.dataclass
class _Submit:
    request_ids: list[str]
    requests: list[tuple[list[int], SamplingParams]]
    sink: Sink
    submitted: float


@dataclasses.dataclass
class _Abort:
    request_ids: list[str]


class EngineWorker:
    """Runs ``engine`` in a thread of its own and serves submissions from any thread.

    Args:
      engine: an ``llmarch.inference.Engine``; after ``start`` only this worker's thread uses it.
      max_queue: requests accepted but not yet given a first token, at most.
      metrics: a ``ServerMetrics`` to record into, or None.
    """

    def __init__(self, engine, *, max_queue: int = 128, metrics=None):
        if isinstance(max_queue, bool) or not isinstance(max_queue, int) or max_queue <= 0:
            raise ValueError(f"max_queue={max_queue!r} is invalid: must be a positive integer")
        self.engine, self.max_queue, self.metrics = engine, max_queue, metrics
        self._cond = threading.Condition()
        self._inbox: collections.deque = collections.deque()
        self._waiting = 0  # accepted, no first token yet (under _cond)
        self._running = 0  # sequences with a first token, not yet ended (under _cond)
        self._stopping = False
        self._abort_all = False
        self.error: str | None = None  # why the thread died
        self._live: dict[str, _Live] = {}  # the thread's own
        self._thread = threading.Thread(target=self._loop, name="llmarch-engine", daemon=True)

    # Any thread -----------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.error is None

    @property
    def num_waiting(self) -> int:
        with self._cond:
            return self._waiting

    @property
    def num_running(self) -> int:
        with self._cond:
            return self._running

    def submit(self, requests: list[tuple], sink: Sink) -> list[str]:
        """Queues a group of requests (token ids, params[, pixel values or None]); returns their
        engine request ids.
        Whether the engine accepts them comes to ``sink`` (``Accepted`` or ``Rejected``).

        Raises:
          Overloaded: the queue has no room for the group.
          Unavailable: the worker is stopping, or its engine failed.
        """
        ids = [f"req-{uuid.uuid4().hex}" for _ in requests]
        with self._cond:
            if self.error is not None:
                raise Unavailable(f"the engine failed: {self.error}")
            if self._stopping:
                raise Unavailable("the server is shutting down")
            if not self._thread.is_alive():
                raise Unavailable("the engine thread is not running (the app's lifespan starts it)")
            if self._waiting + len(requests) > self.max_queue:
                raise Overloaded(
                    f"the server is overloaded: {self._waiting} requests are waiting "
                    f"(max_queue={self.max_queue}); retry later"
                )
            self._waiting += len(requests)
            self._inbox.append(_Submit(ids, list(requests), sink, time.perf_counter()))
            self._cond.notify()
        self._gauges()
        return ids

    def abort(self, request_ids: list[str]) -> None:
        """Stops these requests (their pages are freed); their sink gets nothing more."""
        if request_ids:
            with self._cond:
                self._inbox.append(_Abort(list(request_ids)))
                self._cond.notify()

    def stop(self, timeout: float | None = None) -> None:
        """Takes no new submissions, lets the requests in flight finish (``timeout`` seconds at
        most, then aborts them), and ends the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if not self._thread.is_alive():
            return
        self._thread.join(timeout)
        if self._thread.is_alive():
            with self._cond:
                self._abort_all = True
                self._cond.notify()
            self._thread.join(10)

    # The engine thread ----------------------------------------------------------------------

    def _loop(self) -> None:
        try:
            while True:
                with self._cond:
                    while not (self._inbox or self._stopping or self.engine.has_unfinished()):
                        self._cond.wait()
                    commands = list(self._inbox)
                    self._inbox.clear()
                    stopping, abort_all = self._stopping, self._abort_all
                for command in commands:
                    if isinstance(command, _Submit):
                        self._add(command)
                    else:
                        self._abort(command.request_ids)
                if abort_all:  # the drain timed out: end what is left, telling its clients
                    for live in self._live.values():
                        live.sink(Failed("the server shut down before the request finished"))
                    self._abort(list(self._live))
                if self.engine.has_unfinished():
                    self._dispatch(self.engine.step())
                elif stopping:  # drained (nothing can be live with the engine idle; if so, end it)
                    self._abort(list(self._live))
                    self._gauges()
                    return
                self._gauges()
        except Exception as e:  # noqa: BLE001  (whatever broke the engine, no request may hang)
            log.exception("the engine thread failed")
            self._die(f"{type(e).__name__}: {e}")

    def _add(self, command: _Submit) -> None:
        added = []
        for member, (rid, (prompt, params, *images)) in enumerate(
            zip(command.request_ids, command.requests, strict=True)
        ):
            try:  # a vision-language engine encodes the request's images here, on this thread
                self.engine.add_request(prompt, params, request_id=rid, images=images[0] if images else None)
            except (ValueError, TypeError) as e:
                for other in added:
                    self.engine.abort(other)
                    del self._live[other]
                with self._cond:
                    self._waiting -= len(command.requests)
                prefix = f"prompt {member}: " if len(command.requests) > 1 else ""
                command.sink(Rejected(prefix + str(e)))
                return
            added.append(rid)
            self._live[rid] = _Live(member, params, command.sink, command.submitted)
        if self.metrics is not None:
            self.metrics.prompt_tokens.inc(sum(len(p) for p, *_ in command.requests))
        command.sink(Accepted(list(command.request_ids)))

    def _abort(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            live = self._live.pop(rid, None)
            if live is None:  # finished already, or never added (rejected)
                continue
            self.engine.abort(rid)
            self.engine.release(rid)  # the engine keeps no finished request: memory stays bounded
            with self._cond:
                if live.started:
                    self._running -= live.params.n - live.finished
                else:
                    self._waiting -= 1
            if self.metrics is not None:
                self.metrics.aborted.inc()

    def _dispatch(self, events: list[TokenEvent]) -> None:
        now = time.perf_counter()
        grouped: dict[str, list[TokenEvent]] = {}
        for event in events:
            grouped.setdefault(event.request_id, []).append(event)
        for rid, evs in grouped.items():
            live = self._live.get(rid)
            if live is None:  # aborted while its step ran
                continue
            if not live.started:
                live.started = True
                with self._cond:
                    self._waiting -= 1
                    self._running += live.params.n
                if self.metrics is not None:
                    self.metrics.ttft.observe(now - live.submitted)
            tops = self._tops(rid, live, evs)
            for event in evs:
                live.counts[event.index] = live.counts.get(event.index, 0) + 1
                if self.metrics is not None and event.index in live.last:
                    self.metrics.inter_token.observe(now - live.last[event.index])
                live.last[event.index] = now
            ended = sum(e.finished for e in evs)
            live.finished += ended
            with self._cond:
                self._running -= ended
            if self.metrics is not None:
                self.metrics.generation_tokens.inc(len(evs))
            if live.finished >= live.params.n:
                del self._live[rid]
                self.engine.release(rid)
            live.sink(Tokens(live.member, evs, tops))

    def _tops(self, rid: str, live: _Live, events: list[TokenEvent]) -> list[dict[int, float]] | None:
        """Each event's top alternatives (``TokenEvent`` carries only the chosen token's)."""
        if not live.params.logprobs:
            return None
        completions = self.engine.output(rid).completions
        seen, tops = dict(live.counts), []
        for event in events:
            position = seen.get(event.index, 0)
            seen[event.index] = position + 1
            table = completions[event.index].top_logprobs or []
            tops.append(dict(table[position]) if position < len(table) else {})
        return tops

    def _die(self, message: str) -> None:
        with self._cond:
            self.error = message
            pending = [c for c in self._inbox if isinstance(c, _Submit)]
            self._inbox.clear()
            self._waiting, self._running = 0, 0
        sinks = {id(live.sink): live.sink for live in self._live.values()}
        sinks.update({id(c.sink): c.sink for c in pending})
        self._live.clear()
        for sink in sinks.values():
            try:
                sink(Failed(message))
            except Exception:  # noqa: BLE001  (one broken sink must not keep the others waiting)
                log.exception("could not deliver the engine's failure")
        if self.metrics is not None:
            self.metrics.healthy.set(0)

    def _gauges(self) -> None:
        if self.metrics is None:
            return
        with self._cond:
            waiting, running = self._waiting, self._running
        self.metrics.waiting.set(waiting)
        self.metrics.running.set(running)
        if threading.current_thread() is self._thread:  # the engine's stats are the thread's own
            stats = self.engine.stats
            capacity = stats["num_pages"] - 1  # page 0 is the trash page
            used = capacity - stats["free_pages"]
            self.metrics.kv_pages_used.set(used)
            self.metrics.kv_pages_total.set(capacity)
            self.metrics.kv_usage.set(used / capacity if capacity else 0.0)
