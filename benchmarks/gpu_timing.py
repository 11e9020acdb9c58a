"""GPU time of a call, without Python launch overhead (shared by the kernel benchmarks)."""

from __future__ import annotations

from collections.abc import Callable

import torch


def graph_microseconds(call: Callable[[], None], repeats: int = 10, calls_per_graph: int = 1) -> float:
    """Microseconds per call: `calls_per_graph` calls captured in a CUDA graph (compiled
    outside the capture first), the graph replayed `repeats` times between two events."""
    call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls_per_graph):
            call()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (repeats * calls_per_graph)
