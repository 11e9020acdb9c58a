"""`loraserve timeline`: the window drawn, the lanes named by device, a bounded readable figure."""

from __future__ import annotations

import argparse
import datetime
import itertools
import json

import matplotlib.pyplot as plt
import pytest
import torch

from loraserve.cli import main as cli
from loraserve.timeline import (
    DPI,
    FIGURE_WIDTH_IN,
    MAX_FIGURE_HEIGHT_IN,
    Window,
    in_window,
    lane_labels,
    request_counts,
    since_time,
    timeline_figure,
    window_of,
)
from worker.timeline import COMPUTE_LANE, Timeline

T0 = 1.7e15  # microseconds of wall-clock time


def span(tid: str, ts_s: float, dur_s: float, name: str = "forward", pid: str = "worker", **args) -> dict:
    return {"name": name, "ph": "X", "pid": pid, "tid": tid, "ts": T0 + ts_s * 1e6, "dur": dur_s * 1e6, "args": args}


def trace_of(requests: int, device: str = "cpu") -> dict:
    events = [span("compute", i * 0.02, 0.015, device=device) for i in range(100)]
    events += [span("pcie", i * 0.5, 0.1, name=f"a{i}", device=device) for i in range(4)]
    for i in range(requests):
        start = 2.0 * i / requests
        events += [span(f"r{i}", start, 0.05, "queued", "scheduler", adapter=f"a{i % 20}"),
                   span(f"r{i}", start + 0.05, 0.2, "running", "scheduler", adapter=f"a{i % 20}")]
    return {"traceEvents": events}


def test_the_window_is_the_whole_trace_or_its_last_seconds_or_since_a_time():
    spans = [span("compute", 0, 1), span("compute", 5, 1), span("compute", 9, 1)]
    assert window_of(spans) == Window(T0, T0 + 10e6)
    assert window_of(spans, last_s=3) == Window(T0 + 7e6, T0 + 10e6)
    assert window_of(spans, since_s=(T0 + 4e6) / 1e6) == Window(T0 + 4e6, T0 + 10e6)
    assert window_of(spans, last_s=100) == Window(T0, T0 + 10e6)
    assert window_of(spans, last_s=3, since_s=(T0 + 8e6) / 1e6) == Window(T0 + 8e6, T0 + 10e6)
    with pytest.raises(ValueError, match="no spans after"):
        window_of(spans, since_s=(T0 + 11e6) / 1e6)
    with pytest.raises(ValueError, match="no spans"):
        window_of([])


def test_spans_are_cut_to_the_window():
    spans = [span("compute", 0, 1), span("compute", 5, 3), span("compute", 9, 1)]
    cut = in_window(spans, Window(T0 + 6e6, T0 + 9.5e6))
    assert [(e["ts"] - T0, e["dur"]) for e in cut] == [(6e6, 2e6), (9e6, 0.5e6)]


def test_since_takes_iso_times_and_unix_seconds():
    assert since_time("1700000000.5") == 1700000000.5
    local = datetime.datetime(2026, 12, 5, 7, 30)
    assert since_time("2026-12-05T07:30:00") == local.timestamp()
    assert since_time("2026-12-05T07:30:00+00:00") == datetime.datetime(2026, 12, 5, 7, 30,
                                                                         tzinfo=datetime.timezone.utc).timestamp()
    with pytest.raises(argparse.ArgumentTypeError, match="ISO 8601"):
        since_time("yesterday")


@pytest.mark.parametrize("device, compute, copy", [
    ("cpu", "cpu compute", "adapter loads (cpu memory)"),
    ("cuda:0", "cuda:0 compute", "host->device copy (adapter loads)"),
    (None, "compute", "adapter loads")])
def test_lanes_are_named_by_the_servers_device(device, compute, copy):
    args = {} if device is None else {"device": device}
    labels = lane_labels([span("compute", 0, 1, **args), span("pcie", 0, 1, "a", **args)])
    assert labels == {"compute": compute, "pcie": copy}
    figure = timeline_figure({"traceEvents": [span("compute", 0, 1, **args), span("pcie", 0, 1, "a", **args)]})
    assert [label.get_text() for label in figure.axes[0].get_yticklabels()] == [compute, copy]
    plt.close(figure)


def test_the_worker_records_its_device_in_every_span():
    timeline = Timeline(torch.device("cpu"))
    timeline.end(timeline.begin(COMPUTE_LANE, "forward"))
    assert [e["args"]["device"] for e in timeline.chrome_trace()] == ["cpu"]
    assert lane_labels(timeline.chrome_trace())["compute"] == "cpu compute"


def test_request_counts_over_time():
    spans = [span("r1", 0, 2, "running", "scheduler"), span("r2", 1, 2, "running", "scheduler"),
             span("r2", 0, 1, "queued", "scheduler")]
    times, counts = request_counts(spans, "running")
    assert [(t - T0) / 1e6 for t in times] == [0, 1, 2, 3] and counts == [1, 2, 1, 0]


@pytest.mark.parametrize("requests", [0, 12, 40, 41, 700])
def test_the_figure_stays_bounded_and_its_labels_do_not_overlap(requests):
    figure = timeline_figure(trace_of(requests))
    width, height = figure.get_size_inches()
    assert width == FIGURE_WIDTH_IN and height <= MAX_FIGURE_HEIGHT_IN
    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()
    texts = [text for axis in figure.axes for text in (*axis.get_yticklabels(), *axis.texts) if text.get_text()]
    boxes = [text.get_window_extent(renderer) for text in texts]
    assert not [(a, b) for (a, b) in itertools.combinations(boxes, 2) if a.overlaps(b)]
    rows = len(figure.axes[0].patches)
    if requests > 40:  # counts instead of one row per request: the lanes hold only forwards and loads
        assert rows == 104 and len(figure.axes) == 2
    plt.close(figure)


def test_the_command_draws_a_window_and_refuses_a_bad_one(tmp_path, capsys):
    trace_file = tmp_path / "trace.json"
    trace_file.write_text(json.dumps(trace_of(700)))
    assert cli(["timeline", str(trace_file), "-o", str(tmp_path / "t.png"), "--last", "1"]) == 0
    height, width = plt.imread(tmp_path / "t.png").shape[:2]
    assert width == FIGURE_WIDTH_IN * DPI and height <= MAX_FIGURE_HEIGHT_IN * DPI
    assert cli(["timeline", str(trace_file), "--since", str(T0 / 1e6 + 100)]) == 1
    assert "no spans after the window's start" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        cli(["timeline", str(trace_file), "--last", "0"])
    assert exit_.value.code == 2
