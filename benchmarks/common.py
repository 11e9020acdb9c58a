"""What the benchmark scripts share: the record every result file starts with, and GPU timing."""

from __future__ import annotations

import datetime
import gzip
import json
import os
import shlex
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path


def read_trace(path: Path) -> dict | list:
    """A Chrome trace file as written by `loraserve trace` or the benchmarks, gzipped or not."""
    raw = path.read_bytes()
    return json.loads(gzip.decompress(raw) if path.suffix == ".gz" else raw)


def current_commit() -> str:
    """LORASERVE_COMMIT where set (a copy of the tree without .git), else the checkout's HEAD."""
    commit = os.environ.get("LORASERVE_COMMIT") or subprocess.run(
        ["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    return commit[:7] if commit else "unknown"


def run_record(benchmark: str, **figures) -> dict:
    """One run's result file: the command that reproduces it, commit, GPU, date, then the figures."""
    return {"benchmark": benchmark,
            "command": " ".join(["python -m", f"benchmarks.{benchmark}", *map(shlex.quote, sys.argv[1:])]),
            "commit": current_commit(),
            "gpu": gpu_name(),
            "date": datetime.datetime.now(datetime.timezone.utc).date().isoformat(),
            **figures}


def gpu_name() -> str | None:
    import torch  # here, not at the top: the slot-policy simulation runs without a GPU

    return torch.cuda.get_device_name() if torch.cuda.is_available() else None


def write_result(path: Path | str, record: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1) + "\n")


def graph_microseconds(call: Callable[[], None], repeats: int = 10, calls_per_graph: int = 1) -> float:
    """Microseconds per call: `calls_per_graph` calls captured in a CUDA graph (compiled
    outside the capture first), the graph replayed `repeats` times between two events."""
    import torch

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
