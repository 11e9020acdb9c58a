"""Against the three real processes: an idle server's counters and histograms stand still, and the
scheduler's step time counts its own work only, not the time it waited for requests."""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from loraserve.client import LoraServeClient
from protos.loraserve.v1 import serving_pb2
from tests.integration.conftest import free_port, running_server

IDLE_S = 3.0
SCRAPE_EVERY_S = 0.25
# Figures of the present state, which may change without a request (prefetching fills slots and
# host memory, for instance); every other figure is a counter or histogram and must not.
STATE_GAUGES = frozenset({
    "loraserve_scheduler_up", "loraserve_requests_running", "loraserve_requests_waiting", "loraserve_kv_pages_used",
    "loraserve_kv_pages_total", "loraserve_adapters_registered", "loraserve_adapter_gpu_slots_used",
    "loraserve_adapter_gpu_slots_total", "loraserve_adapter_gpu_slot_references",
    "loraserve_adapter_host_cache_used_bytes", "loraserve_adapter_host_cache_capacity_bytes",
})
CREATION_TIME_SUFFIX = "_created"  # prometheus_client's creation time of a counter or histogram: a constant
STATE_STATS = frozenset({"waiting_requests", "running_requests", "kv_pages_used", "kv_pages_total",
                         "slot_references", "slots_used", "host_cache_bytes"})

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest.fixture(scope="module")
def idle_server(base_config) -> Iterator[tuple[LoraServeClient, str]]:
    config = base_config.replace(metrics_port=free_port())
    with running_server(config) as (_, client):
        yield client, f"http://127.0.0.1:{config.frontend.metrics_port}/metrics"


def scrape(url: str) -> tuple[Samples, set[str]]:
    """Every sample of the exposition, and the names of the gauge families."""
    with urllib.request.urlopen(url, timeout=10) as response:
        families = list(text_string_to_metric_families(response.read().decode()))
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families for s in f.samples}
    return samples, {f.name for f in families if f.type == "gauge"}


def accumulated(url: str, client: LoraServeClient) -> dict[str, float]:
    """Every counter and histogram figure of /metrics and GetStats, by name."""
    samples, gauges = scrape(url)
    gauges = {name for name in gauges if not name.endswith(CREATION_TIME_SUFFIX)}
    assert gauges == STATE_GAUGES, "a new gauge: list it above if it is a state, else make it a counter"
    figures = {f"metrics {name}{dict(labels)}": value for (name, labels), value in samples.items()
               if name not in STATE_GAUGES}
    stats = client.stats()
    figures |= counted_stats("stats", stats)
    for replica in stats.replicas:
        figures |= counted_stats(f"stats of replica {replica.replica}", replica.stats)
    return figures


def counted_stats(prefix: str, stats: serving_pb2.ServerStats) -> dict[str, float]:
    """The counters of one GetStats answer (its per-replica list is flattened by the caller)."""
    return {f"{prefix} {field.name}": getattr(stats, field.name) for field in serving_pb2.ServerStats.DESCRIPTOR.fields
            if field.name not in STATE_STATS and field.name != "replicas"}


def settled(client: LoraServeClient) -> bool:
    """No request in the scheduler and no adapter load under way (prefetching included)."""
    stats = client.stats()
    return (stats.running_requests == stats.waiting_requests == 0
            and stats.loads_started == stats.loads_finished
            and all(a.state in (serving_pb2.ADAPTER_STATE_HOST, serving_pb2.ADAPTER_STATE_RESIDENT)
                    for a in client.list_adapters().adapters))


def wait_for(condition, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_nothing_accumulates_while_idle_and_a_request_adds_only_its_own_step_time(idle_server):
    client, url = idle_server
    client.generate(input_ids=[9, 10, 11], adapter="a1", max_new_tokens=4, ignore_eos=True)
    wait_for(lambda: settled(client), "the server to settle")
    before = accumulated(url, client)
    idle_until = time.monotonic() + IDLE_S
    while time.monotonic() < idle_until:  # idling is what is tested; scrapes meanwhile must not count either
        time.sleep(SCRAPE_EVERY_S)
        during = accumulated(url, client)
        grown = {name: (before[name], during.get(name)) for name in before if during.get(name) != before[name]}
        assert not grown, f"changed while idle: {grown}"

    sent = time.perf_counter()
    client.generate(input_ids=[9, 10, 11], max_new_tokens=2, ignore_eos=True)
    request_s = time.perf_counter() - sent
    after = accumulated(url, client)
    for source in ("metrics loraserve_scheduler_step_seconds_total{'replica': '0'}", "stats scheduler_step_seconds"):
        step_s = after[source] - before[source]
        assert 0 < step_s < request_s, f"{source} grew {step_s:.3f} s for a request of {request_s:.3f} s"
    assert after["stats forward_steps"] > before["stats forward_steps"]
    # No other time figure took in the idle spell either (the worker's forwards overlap one another
    # in flight, so their sum may exceed the request's duration; they are counted from launch).
    times = [name for name in after if "seconds" in name and "worker_forward" not in name
             and not any(part in name for part in ("_bucket", "_count", CREATION_TIME_SUFFIX))]
    assert len(times) == 10, times  # five frontend histograms, two load histograms, the step time three times (metrics, total, replica)
    for name in times:
        assert after[name] - before[name] <= request_s, f"{name} grew more than the request took"
