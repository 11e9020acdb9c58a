"""GPU idle time between decode steps, read from a Chrome trace (loraserve.timeline.decode_step_gaps)."""

from __future__ import annotations

import pytest

from loraserve.timeline import decode_step_gaps, load_start_stalls


def forward(ts: float, dur: float, sequences: int, tokens: int) -> dict:
    return {"name": "forward", "ph": "X", "pid": "worker", "tid": "compute", "ts": ts, "dur": dur,
            "args": {"sequences": sequences, "tokens": tokens}}


def test_gaps_count_only_steady_decode_steps():
    events = [
        forward(0, 10_000, 4, 4),  # decode, then 2 ms idle
        forward(12_000, 10_000, 4, 4),  # decode, then 1 ms idle
        forward(23_000, 30_000, 4, 300),  # a prefill step: its own gap is not a decode gap
        forward(60_000, 10_000, 4, 4),  # decode, then a pause of 1 s: no work waiting
        forward(1_070_000, 10_000, 4, 4),
        {"name": "adapter0", "ph": "X", "pid": "worker", "tid": "pcie", "ts": 0, "dur": 5, "args": {}},
    ]
    gaps = decode_step_gaps({"traceEvents": events})
    assert gaps.steps == 2
    assert gaps.median_step_ms == pytest.approx(10.0)
    assert gaps.median_gap_ms == pytest.approx(1.5)
    assert gaps.idle_fraction == pytest.approx(3_000 / 23_000)


def test_a_trace_without_consecutive_decodes_has_no_gaps():
    assert decode_step_gaps({"traceEvents": [forward(0, 10, 1, 5)]}) is None


def load(ts: float, dur: float) -> dict:
    return {"name": "adapter0", "ph": "X", "pid": "worker", "tid": "pcie", "ts": ts, "dur": dur, "args": {}}


def test_load_start_stalls_are_the_gaps_in_which_a_load_began():
    events = [
        forward(0, 10_000, 4, 4), load(10_500, 26_000),  # a load starts in the next 8 ms gap
        forward(18_000, 10_000, 4, 4),  # then 1 ms idle with no load starting
        forward(29_000, 10_000, 4, 4), load(5_000, 1_000),  # a load that began while a forward ran
        forward(39_000, 10_000, 4, 4),
    ]
    stalls = load_start_stalls({"traceEvents": events})
    assert (stalls.gaps, stalls.total_ms) == (1, pytest.approx(8.0))
    assert stalls.idle_fraction == pytest.approx(8_000 / 39_000)
    assert load_start_stalls({"traceEvents": [forward(0, 10, 1, 1)]}) is None
