"""benchmarks/stream_timeline.py over a synthetic trace whose waits are known."""

from __future__ import annotations

import gzip
import json

from tests.benchmark_scripts import load_benchmark


def kernel(name: str, start: float, duration: float, stream: int) -> dict:
    return {"ph": "X", "cat": "kernel", "name": name, "ts": start, "dur": duration, "tid": stream,
            "args": {"stream": stream}}


def one_layer(offset: float) -> list[dict]:
    """A GEMM (0-50 us) beside a shrink and expand (0-30, 30-70); the norm waits for the expand
    (starts at 72: 20 us after the GEMM, 2 us after the expand)."""
    return [kernel("gemm", offset, 50, 7), kernel("_shrink_kernel", offset, 30, 9),
            kernel("_expand_kernel", offset + 30, 40, 9), kernel("_add_rms_norm_kernel", offset + 72, 3, 7)]


def test_the_timeline_splits_steps_and_finds_what_the_base_path_waits_for(tmp_path):
    timeline = load_benchmark("stream_timeline")
    events = [*one_layer(0), *one_layer(75), *one_layer(1000)]  # two layers, a host gap, a third
    path = tmp_path / "trace.json.gz"
    path.write_bytes(gzip.compress(json.dumps({"traceEvents": events + [{"ph": "i", "name": "marker"}]}).encode()))
    steps = timeline.split_steps(timeline.load_kernels(path))
    assert [len(step) for step in steps] == [8, 4]
    report = timeline.describe(steps[0])
    assert "step span 150 us" in report
    assert "base kernels running 106 us, LoRA kernels 140 us, both 100 us" in report
    assert "only LoRA running (the base path waits): 40 us; nothing running: 4 us" in report
    assert "44 us over    2 gaps" in report and "_add_rms_norm_kernel" in report


def test_interval_union_and_overlap():
    timeline = load_benchmark("stream_timeline")
    merged = timeline.busy([(5, 8), (0, 2), (1, 3), (8, 9)])
    assert merged == [(0, 3), (5, 9)]
    assert timeline.total(merged) == 7
    assert timeline.overlap(merged, [(2, 6), (8.5, 20)]) == 1 + 1 + 0.5
