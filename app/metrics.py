"""Prometheus metrics for `GET /metrics`.

Names follow vLLM's (`vllm:time_to_first_token_seconds` and so on, with the `senab:` prefix),
so dashboards and alerts written for vLLM need only the prefix changed. Each application
has its own registry: two apps in one process (tests) do not share counters.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Callable, Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from senab.prefix import PrefixStats

# Bucket bounds in seconds. A CPU decode step of the default model takes about 20-100 ms.
# A first token also waits for the queue and the prefill, so its buckets reach further.
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
TPOT_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0)
STORE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)

CONTENT_TYPE = CONTENT_TYPE_LATEST

# Paths with a session id are counted under their template, so the label set stays small.
_FIXED_PATHS = {"/v1/chat/completions", "/v1/models", "/healthz", "/readyz", "/metrics"}
_SESSION_SUFFIXES = {"", "/state", "/trajectory", "/reset", "/events"}


def endpoint_label(path: str) -> str:
    """Return the route template of `path` ("/sessions/{session_id}/state"), or "other"."""
    if path in _FIXED_PATHS:
        return path
    if path.startswith("/sessions/"):
        rest = path[len("/sessions/"):]
        _, slash, suffix = rest.partition("/")
        suffix = slash + suffix
        if suffix in _SESSION_SUFFIXES:
            return "/sessions/{session_id}" + suffix
    return "other"


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.http_requests = Counter(
            "senab:http_requests", "HTTP requests by endpoint and status code.", ["endpoint", "status"], registry=r)
        self.request_success = Counter(
            "senab:request_success", "Completions that ended, by model and finish reason.",
            ["model", "finished_reason"], registry=r)
        self.prompt_tokens = Counter(
            "senab:prompt_tokens", "Prompt tokens of completions that ran in the engine.", ["model"], registry=r)
        self.generation_tokens = Counter(
            "senab:generation_tokens", "Generated tokens.", ["model"], registry=r)
        self.time_to_first_token = Histogram(
            "senab:time_to_first_token_seconds", "Time from admission to the first generated text.", ["model"],
            buckets=TTFT_BUCKETS, registry=r)
        self.time_per_output_token = Histogram(
            "senab:time_per_output_token_seconds", "Mean time between generated tokens of one completion.",
            ["model"], buckets=TPOT_BUCKETS, registry=r)
        self.e2e_latency = Histogram(
            "senab:e2e_request_latency_seconds", "Time from admission to the end of a completion.", ["model"],
            buckets=E2E_BUCKETS, registry=r)
        self.running = Gauge("senab:num_requests_running", "Sequences in the decode batch.", registry=r)
        self.waiting = Gauge("senab:num_requests_waiting", "Requests queued for the engine.", registry=r)
        self.batch_size = Histogram(
            "senab:batch_size", "Sequences per engine forward step.", buckets=BATCH_BUCKETS, registry=r)
        self.store_latency = Histogram(
            "senab:store_operation_seconds", "State store round trips by operation.", ["operation"],
            buckets=STORE_BUCKETS, registry=r)
        self.store_errors = Counter(
            "senab:store_errors", "State store operations that failed, by operation.", ["operation"], registry=r)

    def watch_engine(self, running: Callable[[], float], waiting: Callable[[], float],
                     prefix_cache: Callable[[], PrefixStats | None] | None = None) -> None:
        """Read the running and waiting counts, and the prefix cache's counts, from the engine at every scrape."""
        self.running.set_function(running)
        self.waiting.set_function(waiting)
        if prefix_cache is not None:
            self.registry.register(_PrefixCacheCollector(prefix_cache))

    @contextmanager
    def time_store(self, operation: str, expected: tuple[type[Exception], ...] = ()) -> Iterator[None]:
        """Time one store operation; count it as failed unless it raised one of `expected`."""
        started = time.perf_counter()
        try:
            yield
        except expected:
            raise
        except Exception:
            self.store_errors.labels(operation).inc()
            raise
        finally:
            self.store_latency.labels(operation).observe(time.perf_counter() - started)

    def observe_completion(self, *, model: str, finish_reason: str, prompt_tokens: int, completion_tokens: int,
                           admitted: float, first_token: float | None, finished: float) -> None:
        """Record one completion that ran in the engine; times are `time.monotonic()` values."""
        self.request_success.labels(model, finish_reason).inc()
        self.prompt_tokens.labels(model).inc(prompt_tokens)
        self.generation_tokens.labels(model).inc(completion_tokens)
        self.e2e_latency.labels(model).observe(finished - admitted)
        if first_token is not None:
            self.time_to_first_token.labels(model).observe(first_token - admitted)
            if completion_tokens > 1:
                self.time_per_output_token.labels(model).observe((finished - first_token) / (completion_tokens - 1))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _PrefixCacheCollector(Collector):
    """The prefix cache's counts, as vLLM names them: prompt tokens looked up and found, in tokens."""

    def __init__(self, stats: Callable[[], PrefixStats | None]) -> None:
        self._stats = stats

    def collect(self):
        stats = self._stats()
        if stats is None:
            return
        yield CounterMetricFamily("senab:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                                  value=stats.query_tokens)
        yield CounterMetricFamily("senab:prefix_cache_hits", "Prompt tokens found in the prefix cache.",
                                  value=stats.hit_tokens)
        yield CounterMetricFamily("senab:prefix_cache_evictions", "Prefixes evicted to stay within the cache's size.",
                                  value=stats.evictions)
        yield GaugeMetricFamily("senab:prefix_cache_usage_bytes", "Bytes held by cached prefixes.", value=stats.bytes)
