"""The server's Prometheus metrics (``GET /metrics``), with ``prometheus_client``.

Each server has a registry of its own, so two apps in one process (tests) never share counts.
The engine thread sets the queue, sequence and page gauges after every step and observes the
latencies as tokens come out: time to first token from the moment a request was submitted (its
wait in the queue included), and the gap between successive tokens of a completion (0 between
the tokens of one multi-step dispatch, which arrive together).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ServerMetrics:
    """Counters, gauges and histograms of one server, in ``registry`` (default: a new one)."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry = CollectorRegistry() if registry is None else registry
        self.requests = Counter(
            "llmarch_http_requests",
            "HTTP requests answered, by route and status code",
            ["route", "status"],
            registry=registry,
        )
        self.prompt_tokens = Counter(
            "llmarch_prompt_tokens", "prompt tokens of the requests accepted", registry=registry
        )
        self.generation_tokens = Counter(
            "llmarch_generation_tokens", "tokens generated (every completion's)", registry=registry
        )
        self.aborted = Counter(
            "llmarch_aborted_requests",
            "engine requests aborted (client gone, or all completions cut at a stop string)",
            registry=registry,
        )
        self.waiting = Gauge(
            "llmarch_requests_waiting", "requests accepted and not yet given a first token", registry=registry
        )
        self.running = Gauge(
            "llmarch_sequences_running",
            "completions that have started and not ended",
            registry=registry,
        )
        self.kv_pages_used = Gauge(
            "llmarch_kv_cache_pages_used", "KV cache pages held by sequences", registry=registry
        )
        self.kv_pages_total = Gauge(
            "llmarch_kv_cache_pages_total", "KV cache pages sequences can hold", registry=registry
        )
        self.kv_usage = Gauge(
            "llmarch_kv_cache_usage", "fraction of the KV cache pages held", registry=registry
        )
        self.healthy = Gauge("llmarch_engine_healthy", "1 while the engine thread runs", registry=registry)
        self.healthy.set(1)
        self.ttft = Histogram(
            "llmarch_time_to_first_token_seconds",
            "seconds from a request's submission to its first token",
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.inter_token = Histogram(
            "llmarch_inter_token_latency_seconds",
            "seconds between successive tokens of a completion",
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )

    def render(self) -> bytes:
        """The metrics in Prometheus' text format."""
        return generate_latest(self.registry)
