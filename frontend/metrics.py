"""Prometheus metrics: what this frontend observes of its requests, plus the scheduler's figures.

Request metrics (counts by adapter and outcome; TTFT, TPOT and end-to-end latency as the
client sees them; queue and adapter-wait time from the scheduler's timing) are recorded
here as requests finish, for the requests of this frontend. The scheduler's figures
(queues, KV pages, the adapter cache by tier, forward times) are asked for on each scrape
(`MetricsSnapshot` over the internal link) and exposed as they are: they cover the whole
server.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterator

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from protos.loraserve.v1 import internal_pb2, serving_pb2

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)
TOKEN_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56)
# Requests refused before an adapter name was known to be real: their name is not a label
# value, or a client could create any number of series.
UNTRUSTED_ADAPTER_OUTCOMES = frozenset({"not_found", "invalid_argument"})


class FrontendMetrics:
    """The frontend's registry; `track(adapter)` follows one request."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("loraserve_requests", "Finished requests by adapter ('' = base model) and outcome "
                                "(stop, length, cancelled, or the error's status code in lower case)",
                                ["adapter", "outcome"], registry=r)
        self.prompt_tokens = Counter("loraserve_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter("loraserve_generation_tokens", "Generated tokens", registry=r)
        self.ttft = Histogram("loraserve_time_to_first_token_seconds", "Request received -> first token sent",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("loraserve_time_per_output_token_seconds",
                              "Mean time between output tokens after the first, per request",
                              buckets=TOKEN_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("loraserve_e2e_request_latency_seconds", "Request received -> last token sent",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.queue_time = Histogram("loraserve_request_queue_time_seconds",
                                    "Arrival at the scheduler -> first scheduled", buckets=LATENCY_BUCKETS, registry=r)
        self.adapter_wait = Histogram("loraserve_request_adapter_wait_seconds",
                                      "Arrival at the scheduler -> the request's adapter on the GPU (0 for the "
                                      "base model or a resident adapter)", buckets=LATENCY_BUCKETS, registry=r)
        self.scheduler = SchedulerCollector()
        r.register(self.scheduler)

    def track(self, adapter: str) -> RequestTracker:
        return RequestTracker(self, adapter)


def metrics_application(metrics: FrontendMetrics,
                        scheduler_figures: Callable[[], Awaitable[dict[str, internal_pb2.MetricsSnapshot | None]]]
                        ) -> web.Application:
    """GET /metrics: asks every replica's scheduler for its figures, then renders the registry."""

    async def scrape(request: web.Request) -> web.Response:
        metrics.scheduler.snapshots = await scheduler_figures()
        return web.Response(body=generate_latest(metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/metrics", scrape)
    return app


class RequestTracker:
    """Times one request from its arrival at this frontend; `finish` records it once."""

    def __init__(self, metrics: FrontendMetrics, adapter: str) -> None:
        self._metrics = metrics
        self._adapter = adapter
        self._started = time.perf_counter()
        self._first_token_at: float | None = None
        self._tokens = 0
        self._prompt_tokens = 0
        self._timing: serving_pb2.Timing | None = None

    def on_chunk(self, chunk: serving_pb2.GenerateStreamResponse) -> None:
        if chunk.token_ids and self._first_token_at is None:
            self._first_token_at = time.perf_counter()
        self._tokens += len(chunk.token_ids)
        if chunk.finished:
            self._prompt_tokens = chunk.usage.prompt_tokens
            if chunk.HasField("timing"):
                self._timing = chunk.timing

    def finish(self, outcome: str) -> float:
        """Records the request; returns its end-to-end seconds."""
        m = self._metrics
        e2e = time.perf_counter() - self._started
        adapter = "" if outcome in UNTRUSTED_ADAPTER_OUTCOMES else self._adapter
        m.requests.labels(adapter=adapter, outcome=outcome).inc()
        m.prompt_tokens.inc(self._prompt_tokens)
        m.generation_tokens.inc(self._tokens)
        if self._first_token_at is not None:
            m.ttft.observe(self._first_token_at - self._started)
            m.e2e.observe(e2e)
            if self._tokens > 1:
                m.tpot.observe((e2e - (self._first_token_at - self._started)) / (self._tokens - 1))
        if self._timing is not None:
            m.queue_time.observe(self._timing.queued_ms / 1e3)
            m.adapter_wait.observe(self._timing.adapter_wait_ms / 1e3)
        return e2e


class SchedulerCollector(Collector):
    """Exposes each replica's latest `MetricsSnapshot` (set just before each scrape is rendered),
    labelled `replica`."""

    def __init__(self) -> None:
        self.snapshots: dict[str, internal_pb2.MetricsSnapshot | None] = {}

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("loraserve_scheduler_up", "1 if the replica's scheduler answered this scrape",
                               labels=["replica"])
        for replica, snapshot in self.snapshots.items():
            up.add_metric([replica], int(snapshot is not None))
        yield up
        answered = {replica: snapshot for replica, snapshot in self.snapshots.items() if snapshot is not None}
        if answered:
            yield from _scheduler_families(answered)


GAUGES = [
    ("loraserve_requests_running", "Requests admitted and running", lambda m: m.stats.running_requests),
    ("loraserve_requests_waiting", "Requests queued at the scheduler", lambda m: m.stats.waiting_requests),
    ("loraserve_kv_pages_used", "KV-cache pages reserved by running requests", lambda m: m.stats.kv_pages_used),
    ("loraserve_kv_pages_total", "KV-cache pages", lambda m: m.stats.kv_pages_total),
    ("loraserve_adapters_registered", "Adapters the server can serve", lambda m: m.adapters_registered),
    ("loraserve_adapter_gpu_slots_used", "GPU adapter slots holding or loading an adapter",
     lambda m: m.stats.slots_used),
    ("loraserve_adapter_gpu_slots_total", "GPU adapter slots", lambda m: m.gpu_slots_total),
    ("loraserve_adapter_gpu_slot_references", "Running requests holding an adapter slot",
     lambda m: m.stats.slot_references),
    ("loraserve_adapter_host_cache_used_bytes", "Pinned host memory holding adapters",
     lambda m: m.stats.host_cache_bytes),
    ("loraserve_adapter_host_cache_capacity_bytes", "Pinned host memory for adapters",
     lambda m: m.host_cache_capacity_bytes),
]
COUNTERS = [
    ("loraserve_forward_steps", "Forwards the worker ran", lambda m: m.stats.forward_steps),
    ("loraserve_requests_paused", "Running requests paused to free their adapter's slot for a shorter one",
     lambda m: m.stats.requests_paused),
    ("loraserve_scheduler_step_seconds",
     "Scheduler work from a forward's result to the next forward sent (waits excluded)",
     lambda m: m.stats.scheduler_step_seconds),
]
TIER_COUNTERS = [
    ("loraserve_adapter_cache_hits", "Requests whose adapter was in this tier on arrival", "hits"),
    ("loraserve_adapter_cache_misses", "Requests whose adapter was not in this tier on arrival (host is "
     "looked up on gpu misses only)", "misses"),
    ("loraserve_adapter_loads_started", "Adapter loads into this tier issued", "loads_started"),
    ("loraserve_adapter_loads_finished", "Adapter loads into this tier finished", "loads_finished"),
    ("loraserve_adapter_loaded_bytes", "Adapter bytes copied into this tier", "bytes_loaded"),
]


def _scheduler_families(snapshots: dict[str, internal_pb2.MetricsSnapshot]) -> Iterator[Metric]:
    for family_type, table in ((GaugeMetricFamily, GAUGES), (CounterMetricFamily, COUNTERS)):
        for name, documentation, value in table:
            family = family_type(name, documentation, labels=["replica"])
            for replica, snapshot in snapshots.items():
                family.add_metric([replica], value(snapshot))
            yield family
    forward = HistogramMetricFamily("loraserve_worker_forward_seconds", "Worker wall time of one forward",
                                    labels=["replica"])
    for replica, snapshot in snapshots.items():
        forward.add_metric([replica], _buckets(snapshot.worker_forward_seconds), snapshot.worker_forward_seconds.sum)
    yield forward
    yield from _cache_tiers(snapshots)


def _cache_tiers(snapshots: dict[str, internal_pb2.MetricsSnapshot]) -> Iterator[Metric]:
    for name, documentation, field in TIER_COUNTERS:
        family = CounterMetricFamily(name, documentation, labels=["replica", "tier"])
        for replica, snapshot in snapshots.items():
            for tier in ("host", "gpu"):
                family.add_metric([replica, tier], getattr(getattr(snapshot, tier), field))
        yield family
    load_seconds = HistogramMetricFamily("loraserve_adapter_load_seconds",
                                         "Adapter load issued -> finished (host: disk -> pinned; gpu: -> slot)",
                                         labels=["replica", "tier"])
    for replica, snapshot in snapshots.items():
        for tier in ("host", "gpu"):
            figures = getattr(snapshot, tier)
            load_seconds.add_metric([replica, tier], _buckets(figures.load_seconds), figures.load_seconds.sum)
    yield load_seconds


def _buckets(histogram: internal_pb2.Histogram) -> list[tuple[str, float]]:
    """Cumulative (le, count) pairs, ending with +Inf, from per-bucket counts."""
    buckets, total = [], 0
    for bound, count in zip([*histogram.bounds, float("inf")], histogram.counts):
        total += count
        buckets.append(("+Inf" if bound == float("inf") else repr(float(bound)), total))
    return buckets or [("+Inf", 0)]
