"""The request spans of the timeline (`Timeline` admin command): queued and running, per request."""

from __future__ import annotations

import time
from collections import deque

from scheduler.requests import Request

TRACE_CAPACITY = 100_000  # request spans kept for the timeline


class RequestTrace:
    def __init__(self, capacity: int = TRACE_CAPACITY) -> None:
        self._events: deque[dict] = deque(maxlen=capacity)

    def record(self, request: Request, reason: str) -> None:
        """Queued and running spans of a finished request, in wall-clock microseconds."""
        to_wall = time.time() - time.monotonic()
        args = {"request_id": request.request_id, "adapter": request.adapter, "finish_reason": reason,
                "prompt_tokens": len(request.prompt), "output_tokens": len(request.generated)}
        # When the scheduler heard its adapter was loaded and got its first token: where a request's
        # time to first token went, beside the worker's forwards and loads (benchmarks/request_phases.py).
        for key, moment in (("adapter_ready_us", request.adapter_ready_at), ("first_token_us", request.first_token_at)):
            if moment is not None:
                args[key] = (moment + to_wall) * 1e6
        admitted = request.admitted_at or time.monotonic()
        spans = [("queued", request.arrival, admitted)]
        if request.admitted_at is not None:
            spans.append(("running", admitted, time.monotonic()))
        for name, start, end in spans:
            self._events.append({"name": name, "ph": "X", "pid": "scheduler", "tid": request.request_id,
                                 "ts": (start + to_wall) * 1e6, "dur": (end - start) * 1e6, "args": args})

    def events(self) -> list[dict]:
        """Chrome trace events, oldest first."""
        return list(self._events)
