"""Prometheus metrics for /metrics. The server's event loop writes them (gauges from the engine core's
every step, histograms and counters as requests progress); the HTTP side only renders them. Each server has a
registry of its own, so several servers can live in one process (tests)."""
from __future__ import annotations

import collections
import logging
import threading
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

logger = logging.getLogger("minimax_m1.server")

PREFIX = "minimax_m1_"
THROUGHPUT_WINDOW_S = 10.0
_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0,
                    320.0, 640.0)


class EngineMetrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.running = Gauge(PREFIX + "num_requests_running", "Requests holding a state slot.", registry=r)
        self.waiting = Gauge(PREFIX + "num_requests_waiting", "Requests queued for a state slot.", registry=r)
        self.state_pool_usage = Gauge(PREFIX + "state_pool_usage",
                                      "Fraction of lightning-attention state slots in use (1 = full).", registry=r)
        self.kv_cache_usage = Gauge(PREFIX + "kv_cache_usage", "Fraction of paged KV blocks in use (1 = full).",
                                    registry=r)
        self.ttft = Histogram(PREFIX + "time_to_first_token_seconds", "From request arrival to its first token.",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram(PREFIX + "e2e_request_latency_seconds", "From request arrival to its end.",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.finished = Counter(PREFIX + "request_finished", "Finished requests by finish reason "
                                "(stop, length, abort).", ["finished_reason"], registry=r)
        self._totals = _EngineTotals()
        r.register(self._totals)

    def update_gauges(self, g) -> None:
        """g: the engine core's Gauges (engine/messages.py), sent with every step's outputs."""
        self.running.set(g.running)
        self.waiting.set(g.waiting)
        self.state_pool_usage.set(g.state_pool_usage)
        self.kv_cache_usage.set(g.kv_cache_usage)
        self._totals.sample(g)

    def on_first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def on_finish(self, reason: str | None, seconds: float) -> None:
        self.finished.labels(finished_reason=reason or "unknown").inc()
        self.e2e.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _EngineTotals:
    """Counters the engine keeps itself (tokens, preemptions), and generated tokens per second over the
    last THROUGHPUT_WINDOW_S seconds, from the samples each step's gauges bring."""

    def __init__(self):
        self._lock = threading.Lock()
        self._prompt = self._generated = self._preemptions = 0
        self._samples: collections.deque[tuple[float, int]] = collections.deque()
        self._start = time.monotonic()

    def sample(self, g) -> None:
        now = time.monotonic()
        with self._lock:
            self._prompt, self._generated, self._preemptions = g.prompt_tokens, g.generation_tokens, g.preemptions
            self._samples.append((now, self._generated))
            # keep one sample at or before the window's start, as the baseline
            while len(self._samples) > 1 and self._samples[1][0] <= now - THROUGHPUT_WINDOW_S:
                self._samples.popleft()

    def tokens_per_second(self) -> float:
        now = time.monotonic()
        with self._lock:
            # the total at the window's start: the last sample before it (every step takes one), else zero
            base = next((g for t, g in reversed(self._samples) if t <= now - THROUGHPUT_WINDOW_S), 0)
            return (self._generated - base) / max(min(THROUGHPUT_WINDOW_S, now - self._start), 1e-3)

    def describe(self):
        return []

    def collect(self):
        with self._lock:
            prompt, generated, preemptions = self._prompt, self._generated, self._preemptions
        yield CounterMetricFamily(PREFIX + "prompt_tokens", "Prompt tokens admitted.", value=prompt)
        yield CounterMetricFamily(PREFIX + "generation_tokens", "Tokens generated.", value=generated)
        yield CounterMetricFamily(PREFIX + "num_preemptions", "Requests preempted (freed, recomputed later).",
                                  value=preemptions)
        yield GaugeMetricFamily(PREFIX + "generation_tokens_per_second",
                                f"Tokens generated per second over the last {THROUGHPUT_WINDOW_S:g} s.",
                                value=self.tokens_per_second())
