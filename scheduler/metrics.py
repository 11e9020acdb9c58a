"""The scheduler's figures for the Prometheus endpoint: adapter cache tiers, forward and step times.

The scheduler has no Prometheus client (it serves nothing over HTTP); it keeps plain
counters and fixed-bucket histograms and sends them to the frontend on each scrape as a
`MetricsSnapshot`.

Cache lookups are counted once per accepted request for an adapter, by the adapter's
state on arrival: RESIDENT is a gpu hit; anything else is a gpu miss, looked up in the host
tier, where HOST or LOADING (already in pinned memory) is a host hit and ON_DISK or
STAGING a host miss.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from protos.loraserve.v1 import internal_pb2 as pb
from scheduler.adapters import Adapter, AdapterState

LOAD_SECONDS_BOUNDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
FORWARD_SECONDS_BOUNDS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56)
IN_HOST_MEMORY = (AdapterState.HOST, AdapterState.LOADING)


@dataclass
class Histogram:
    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    sum: float = 0.0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def to_proto(self) -> pb.Histogram:
        return pb.Histogram(bounds=self.bounds, counts=self.counts, sum=self.sum)


@dataclass
class CacheTier:
    hits: int = 0
    misses: int = 0
    loads_started: int = 0
    loads_finished: int = 0
    bytes_loaded: int = 0
    load_seconds: Histogram = field(default_factory=lambda: Histogram(LOAD_SECONDS_BOUNDS))
    started_at: dict[str, float] = field(default_factory=dict)  # adapter -> when its load was issued

    def start(self, name: str, now: float) -> None:
        self.loads_started += 1
        self.started_at[name] = now

    def finish(self, adapter: Adapter, now: float) -> float | None:
        """Counts a finished load that was started here (a stage the worker did on its own is not);
        its seconds, None if it was not counted."""
        started = self.started_at.pop(adapter.name, None)
        if started is None:
            return None
        self.loads_finished += 1
        self.bytes_loaded += adapter.size_bytes
        self.load_seconds.observe(now - started)
        return now - started

    def fail(self, name: str) -> None:
        self.started_at.pop(name, None)

    def to_proto(self) -> pb.CacheTierMetrics:
        return pb.CacheTierMetrics(hits=self.hits, misses=self.misses, loads_started=self.loads_started,
                                   loads_finished=self.loads_finished, bytes_loaded=self.bytes_loaded,
                                   load_seconds=self.load_seconds.to_proto())


@dataclass
class SchedulerMetrics:
    host: CacheTier = field(default_factory=CacheTier)
    gpu: CacheTier = field(default_factory=CacheTier)
    worker_forward_seconds: Histogram = field(default_factory=lambda: Histogram(FORWARD_SECONDS_BOUNDS))

    def look_up(self, adapter: Adapter) -> None:
        if adapter.state is AdapterState.RESIDENT:
            self.gpu.hits += 1
            return
        self.gpu.misses += 1
        if adapter.state in IN_HOST_MEMORY:
            self.host.hits += 1
        else:
            self.host.misses += 1

    def fail(self, name: str) -> None:
        self.host.fail(name)
        self.gpu.fail(name)


@dataclass
class StepTimer:
    """Times the scheduler's own work from a forward's result to the next forward it sends.

    Opened by a result; closed when the next forward is sent, or when the loop is about to wait
    for a message (nothing more to send), so neither time waiting for requests nor time waiting
    for the worker is counted.
    """

    clock: Callable[[], float] = time.perf_counter
    _opened_at: float | None = None

    def result_arrived(self) -> None:
        if self._opened_at is None:
            self._opened_at = self.clock()

    def close(self) -> float:
        """Seconds since the first result it was opened by; 0 if it is not open."""
        if self._opened_at is None:
            return 0.0
        seconds, self._opened_at = self.clock() - self._opened_at, None
        return seconds
