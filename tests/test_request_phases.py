"""benchmarks/request_phases.py over a synthetic timeline: requests, loads and forwards."""

from __future__ import annotations

from tests.benchmark_scripts import load_benchmark

MS = 1e3  # trace times are microseconds


def queued(adapter: str, arrival_ms: float, admitted_ms: float, ready_ms: float, first_token_ms: float) -> dict:
    return {"ph": "X", "name": "queued", "pid": "scheduler", "tid": f"r-{adapter}", "ts": arrival_ms * MS,
            "dur": (admitted_ms - arrival_ms) * MS,
            "args": {"adapter": adapter, "adapter_ready_us": ready_ms * MS, "first_token_us": first_token_ms * MS,
                     "output_tokens": 7}}


def running(adapter: str, admitted_ms: float, finished_ms: float) -> dict:
    return {"ph": "X", "name": "running", "pid": "scheduler", "tid": f"r-{adapter}", "ts": admitted_ms * MS,
            "dur": (finished_ms - admitted_ms) * MS, "args": {}}


def copy(adapter: str, start_ms: float, end_ms: float) -> dict:
    return {"ph": "X", "name": adapter, "pid": "worker", "tid": "pcie", "ts": start_ms * MS,
            "dur": (end_ms - start_ms) * MS, "args": {"bytes": 1}}


def forward(adapters: list[str], start_ms: float, end_ms: float, tokens: int, sequences: int) -> dict:
    return {"ph": "X", "name": "forward", "pid": "worker", "tid": "compute", "ts": start_ms * MS,
            "dur": (end_ms - start_ms) * MS, "args": {"adapters": adapters, "tokens": tokens, "sequences": sequences}}


def test_lines_up_each_requests_copy_admission_forward_and_first_token():
    phases_module = load_benchmark("request_phases")
    trace = {"traceEvents": [
        copy("a", 0, 25),  # a's earlier load: an older copy, not this request's
        copy("a", 1010, 1036),
        copy("b", 500, 520),  # b was on the GPU before its request arrived
        forward(["a", "b"], 1040, 1050, tokens=9, sequences=9),  # a decode step: no prompt
        forward(["a", "b"], 1050, 1065, tokens=400, sequences=9),  # a's prompt
        forward(["b"], 1100, 1112, tokens=300, sequences=3),  # b's prompt
        queued("a", arrival_ms=1000, admitted_ms=1045, ready_ms=1040, first_token_ms=1068),
        queued("b", arrival_ms=1090, admitted_ms=1095, ready_ms=1090, first_token_ms=1114),
        running("a", admitted_ms=1045, finished_ms=1200),
    ]}
    phases = {p.adapter: p for p in phases_module.request_phases(trace)}
    a, b = phases["a"], phases["b"]
    assert (a.copy_start, a.copy_end, a.adapter_ready, a.admitted) == (10, 36, 40, 45)
    assert (a.forward_start, a.forward_end, a.first_token) == (50, 65, 68)
    assert a.copied_after_arrival and not b.copied_after_arrival
    assert (b.copy_end, b.forward_start, b.first_token) == (-570, 10, 24)

    summaries = phases_module.groups(list(phases.values()))
    copied_count, copied_rows = summaries["adapter copied after arrival"]
    assert copied_count == 1
    rows = {row.name: row for row in copied_rows}
    assert rows["copy_end -> forward_start"].median == 14
    assert rows["forward_end -> first_token"].median == 3
    figures = phases_module.as_figures(summaries)
    assert figures["adapter already on the GPU"]["requests"] == 1
    assert "copy_end -> forward_start" in phases_module.format_groups(summaries)


def test_lists_each_request_in_arrival_order_with_its_moments():
    phases_module = load_benchmark("request_phases")
    trace = {"traceEvents": [
        copy("b", 1095, 1099),
        forward(["b"], 1100, 1112, tokens=300, sequences=3),
        queued("b", arrival_ms=1090, admitted_ms=1095, ready_ms=1099, first_token_ms=1114),
        queued("a", arrival_ms=1000, admitted_ms=1045, ready_ms=1040, first_token_ms=1068),
        running("a", admitted_ms=1045, finished_ms=1200),
    ]}
    a, b = phases_module.each_request(phases_module.request_phases(trace))
    assert a == {"adapter": "a", "output_tokens": 7, "arrival": 0, "adapter_ready": 40, "admitted": 45,
                 "first_token": 68, "finished": 200}
    assert (b["arrival"], b["copy_start"], b["copy_end"], b["forward_start"]) == (90, 5, 9, 10)
    assert "finished" not in b  # the trace has no running span of it
