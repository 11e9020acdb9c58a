"""The folded-LoRA GEMM benchmark's operands line up (CPU, small widths, one call per timing)."""

from __future__ import annotations

import pytest

from tests.benchmark_scripts import load_benchmark


def test_every_folded_gemm_runs_and_is_reported_against_the_base(monkeypatch):
    bench = load_benchmark("fused_shrink_gemm")
    monkeypatch.setattr(bench, "DEVICE", "cpu")
    monkeypatch.setattr(bench, "GROUPS", {"qkv": (32, (32, 8, 8)), "down": (96, (32,))})
    shapes: list[tuple[int, ...]] = []

    def one_call_per_weight(call, weights, repeats):
        for weight in weights:
            shapes.append(tuple(call(weight).shape))
        return float(len(shapes))  # a distinct figure per timing, so each difference names its pair

    monkeypatch.setattr(bench, "per_layer_us", one_call_per_weight)
    monkeypatch.setattr(bench, "reader_us", lambda y, *args: (100.0, 130.0))  # a Triton kernel: not on CPU
    qkv = bench.measure("qkv", rank=4, tokens=12, prompt=5, decodes=2, slots=3, layers=2, repeats=1)
    assert shapes == [(12, 48)] * 2 + [(12, 48 + 12)] * 2 + [(12, 48 + 36)] * 2 + [(12, 48)] * 2 + [(5, 48)] * 2
    assert qkv == pytest.approx({"base_us": 2, "with_shrink_us": 4, "shrink_us": 2, "slots_shrink_us": 4,
                                 "expand_us": 10, "expand_in_gemm_us": 6, "reader_us": 100,
                                 "expand_in_reader_us": 30})
    shapes.clear()
    bench.measure("down", rank=4, tokens=12, prompt=5, decodes=2, slots=3, layers=1, repeats=1)
    assert shapes == [(12, 32), (12, 36), (12, 44), (12, 32), (5, 32)]
