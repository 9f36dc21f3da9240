"""Prometheus metrics, named as vLLM's users already chart them (`vllm:` → `shizhen:`).

One registry per app, so several apps in one process (the tests) never share counters.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from ..engine.client import EngineClient

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)
TOKEN_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.5, 1.0, 2.5)


class _CountedByEngine(Collector):
    """A counter the engine keeps itself (reported with every step), exposed as a Prometheus counter at scrape
    time."""

    def __init__(self, name: str, documentation: str, read: Callable[[], int]):
        self._name, self._documentation, self._read = name, documentation, read

    def collect(self):
        yield CounterMetricFamily(self._name, self._documentation, value=self._read())


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._engine: EngineClient | None = None
        r = self.registry
        self.requests_running = Gauge("shizhen:num_requests_running", "Requests decoding on the GPU.", registry=r)
        self.requests_waiting = Gauge("shizhen:num_requests_waiting", "Requests queued for a KV slot.", registry=r)
        self.kv_cache_usage = Gauge("shizhen:kv_cache_usage_perc",
                                    "Share of KV-cache blocks held by running requests (0-1).", registry=r)
        self.gpu_memory = Gauge("shizhen:gpu_memory_used_bytes", "GPU memory held by this process.", ["device"],
                                registry=r)
        self.model_load_seconds = Gauge("shizhen:model_load_seconds", "Start-up: load, plan, capture.", registry=r)
        self.time_to_first_token = Histogram("shizhen:time_to_first_token_seconds", "Arrival to first token.",
                                             buckets=LATENCY_BUCKETS, registry=r)
        self.inter_token_latency = Histogram("shizhen:inter_token_latency_seconds", "Between streamed tokens.",
                                             buckets=TOKEN_LATENCY_BUCKETS, registry=r)
        self.e2e_latency = Histogram("shizhen:e2e_request_latency_seconds", "Arrival to last token.",
                                     buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("shizhen:prompt_tokens", "Prompt tokens served (image tokens included).",
                                     registry=r)
        self.generation_tokens = Counter("shizhen:generation_tokens", "Tokens generated.", registry=r)
        self.request_success = Counter("shizhen:request_success", "Finished generations.", ["finished_reason"],
                                       registry=r)
        self.http_requests = Counter("shizhen:http_requests", "HTTP responses.", ["method", "route", "status"],
                                     registry=r)
        self.image_bytes = Histogram("shizhen:image_bytes", "Encoded size of accepted images.", registry=r,
                                     buckets=(1e4, 5e4, 1e5, 5e5, 1e6, 2e6, 5e6, 1e7, 2e7))
        self.image_decode_seconds = Histogram("shizhen:image_decode_seconds", "Decode + orient + resize.",
                                              registry=r, buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0))

    def watch_engine(self, engine: EngineClient) -> None:
        """Gauges and counters read from the engine client (its last stats and info) at scrape time."""
        self._engine = engine
        self.requests_running.set_function(lambda: engine.stats.running)
        self.requests_waiting.set_function(lambda: engine.stats.waiting)
        self.kv_cache_usage.set_function(lambda: engine.stats.kv_usage)
        self.model_load_seconds.set_function(lambda: engine.info.load_seconds if engine.info else 0.0)
        for name, documentation, counter in (
            ("shizhen:num_preemptions", "Sequences preempted for KV-cache blocks (they resume by recomputing).",
             "preemptions"),
            ("shizhen:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", "prefix_queried_tokens"),
            ("shizhen:prefix_cache_hits", "Prompt tokens found in the prefix cache (not computed).",
             "prefix_hit_tokens"),
            ("shizhen:image_cache_hits", "Images whose vision-tower output was cached.", "image_cache_hits"),
            ("shizhen:image_cache_misses", "Images run through the vision tower.", "image_cache_misses"),
        ):
            self.registry.register(_CountedByEngine(name, documentation,
                                                    lambda counter=counter: getattr(engine.stats, counter)))

    def render(self) -> bytes:
        for device, memory in (self._engine.stats.gpu_memory if self._engine else {}).items():
            self.gpu_memory.labels(device=device).set(memory["reserved_gib"] * 1024**3)
        return generate_latest(self.registry)
