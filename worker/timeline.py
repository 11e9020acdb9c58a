"""What the GPU did and when: forwards and adapter loads, for the Chrome-trace timeline.

Recording adds no host synchronisation: on CUDA each span keeps a pair of events and is
resolved to times only on export (relative to an event recorded at start-up, then shifted
to the host clock); on CPU spans carry host times. Bounded: old spans are dropped.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import torch

COMPUTE_LANE = "compute"
COPY_LANE = "pcie"


@dataclass
class Span:
    lane: str
    name: str
    host_start: float  # wall-clock seconds (time.time) when issued: one clock for all processes
    host_end: float | None = None
    start_event: torch.cuda.Event | None = None
    end_event: torch.cuda.Event | None = None
    args: dict[str, object] = field(default_factory=dict)


class Timeline:
    def __init__(self, device: torch.device, capacity: int = 200_000) -> None:
        self.device = str(device)  # in every span's args: `loraserve timeline` names the lanes by it
        self.on_gpu = device.type == "cuda"
        self.spans: deque[Span] = deque(maxlen=capacity)
        self.origin_host = time.time()
        self.origin_event: torch.cuda.Event | None = None
        if self.on_gpu:
            self.origin_event = torch.cuda.Event(enable_timing=True)
            self.origin_event.record()
            torch.cuda.synchronize()
            self.origin_host = time.time()

    def begin(self, lane: str, name: str, **args: object) -> Span:
        span = Span(lane, name, time.time(), args=args)
        if self.on_gpu and lane == COMPUTE_LANE:
            span.start_event = torch.cuda.Event(enable_timing=True)
            span.start_event.record()
        self.spans.append(span)
        return span

    def end(self, span: Span) -> None:
        span.host_end = time.time()
        if span.start_event is not None:
            span.end_event = torch.cuda.Event(enable_timing=True)
            span.end_event.record()

    def add_gpu_span(self, lane: str, name: str, start: torch.cuda.Event, end: torch.cuda.Event,
                     **args: object) -> None:
        """A span timed by events recorded elsewhere (a load's events on the copy stream)."""
        self.spans.append(Span(lane, name, time.time(), start_event=start, end_event=end, args=args))

    def add_host_span(self, lane: str, name: str, start: float, end: float, **args: object) -> None:
        self.spans.append(Span(lane, name, start, end, args=args))

    def chrome_trace(self, process_name: str = "worker") -> list[dict]:
        """Complete ("X") events, in microseconds of wall-clock time."""
        if self.on_gpu:
            torch.cuda.synchronize()
        events = []
        for span in list(self.spans):
            start, end = self._times(span)
            if start is None or end is None:
                continue
            events.append({"name": span.name, "ph": "X", "pid": process_name, "tid": span.lane,
                           "ts": start * 1e6, "dur": max(0.0, end - start) * 1e6,
                           "args": span.args | {"clock": "gpu" if span.end_event else "host",
                                                "device": self.device}})
        return events

    def _times(self, span: Span) -> tuple[float | None, float | None]:
        if span.start_event is not None and span.end_event is not None:
            start = self.origin_event.elapsed_time(span.start_event) / 1e3
            end = self.origin_event.elapsed_time(span.end_event) / 1e3
            return self.origin_host + start, self.origin_host + end
        if span.host_end is None:
            return None, None
        return span.host_start, span.host_end
