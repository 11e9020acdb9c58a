"""`loraserve trace` fetches a running server's Chrome trace; `loraserve timeline` draws it.

The drawing follows the seed's picture: a compute lane (forwards), an adapter-load lane
(host->device copies on CUDA), both named by the server's device, and one row per request
(queued, then running) coloured by adapter; past `MAX_REQUEST_ROWS` requests, counts of
queued and running requests over time instead, so the figure keeps its size. `--last` and
`--since` draw a window of the trace.
"""

from __future__ import annotations

import argparse
import bisect
import datetime
import json
import statistics
from dataclasses import dataclass
from pathlib import Path

from loraserve.client import Connection
from loraserve.command_line import CommandError, add_connection_arguments, connection_from_args, existing_file

BASE_MODEL_COLOUR = "#9e9e9e"


def fetch_trace(connection: Connection) -> dict:
    with connection.client(timeout=60) as client:
        return json.loads(client.timeline().chrome_trace_json)


STEADY_GAP_US = 50_000  # a longer pause between forwards means no work was waiting, not a slow host


@dataclass(frozen=True)
class StepGaps:
    """Decode-only forwards of a trace: their GPU time and the GPU's idle time between them."""

    steps: int
    median_step_ms: float
    median_gap_ms: float
    idle_fraction: float  # idle / (busy + idle) over consecutive decode steps


def decode_step_gaps(trace: dict) -> StepGaps | None:
    """Idle time between consecutive decode-only forwards (forward spans end after sampling)."""
    forwards = sorted((e for e in trace["traceEvents"] if e.get("ph") == "X" and e.get("name") == "forward"),
                      key=lambda e: e["ts"])
    pairs = [(a, b) for a, b in zip(forwards, forwards[1:])
             if a["args"]["tokens"] == a["args"]["sequences"] and b["ts"] - a["ts"] - a["dur"] < STEADY_GAP_US]
    if not pairs:
        return None
    busy = [a["dur"] for a, _ in pairs]
    gaps = [max(0.0, b["ts"] - a["ts"] - a["dur"]) for a, b in pairs]
    return StepGaps(len(pairs), statistics.median(busy) / 1e3, statistics.median(gaps) / 1e3,
                    sum(gaps) / (sum(busy) + sum(gaps)))


@dataclass(frozen=True)
class LoadStalls:
    """Idle gaps between forwards during which an adapter load began: the engine's thread was
    queueing the load's copies instead of launching the next forward."""

    gaps: int
    total_ms: float
    idle_fraction: float  # their idle time / (busy + idle) over consecutive forwards


def load_start_stalls(trace: dict) -> LoadStalls | None:
    events = [e for e in trace["traceEvents"] if e.get("ph") == "X"]
    forwards = sorted((e for e in events if e.get("name") == "forward"), key=lambda e: e["ts"])
    load_starts = sorted(e["ts"] for e in events if e.get("tid") == "pcie")

    def a_load_began(start: float, end: float) -> bool:
        first = bisect.bisect_left(load_starts, start)
        return first < len(load_starts) and load_starts[first] < end

    pairs = [(a, b) for a, b in zip(forwards, forwards[1:]) if b["ts"] - a["ts"] - a["dur"] < STEADY_GAP_US]
    if not pairs:
        return None
    stalls = [b["ts"] - a["ts"] - a["dur"] for a, b in pairs if a_load_began(a["ts"] + a["dur"], b["ts"])]
    span = sum(b["ts"] - a["ts"] for a, b in pairs)
    return LoadStalls(len(stalls), sum(stalls) / 1e3, sum(stalls) / span)


@dataclass(frozen=True)
class Window:
    """The stretch of a trace drawn, in the trace's microseconds of wall-clock time."""

    start_us: float
    end_us: float

    @property
    def seconds(self) -> float:
        return (self.end_us - self.start_us) / 1e6


def spans_of(trace: dict) -> list[dict]:
    return [e for e in trace["traceEvents"] if e.get("ph") == "X"]


def window_of(spans: list[dict], last_s: float | None = None, since_s: float | None = None) -> Window:
    """The whole trace, cut to its last `last_s` seconds and to after `since_s` (Unix time)."""
    if not spans:
        raise ValueError("the trace has no spans: fetch it after the server has run requests")
    first, end = min(e["ts"] for e in spans), max(e["ts"] + e["dur"] for e in spans)
    start = first
    if last_s is not None:
        start = max(start, end - last_s * 1e6)
    if since_s is not None:
        start = max(start, since_s * 1e6)
    if start >= end:
        raise ValueError(f"no spans after the window's start: the trace ends at {_clock(end)}")
    return Window(start, end)


def in_window(spans: list[dict], window: Window) -> list[dict]:
    """The spans that overlap `window`, cut to it."""
    cut = []
    for event in spans:
        start, end = max(event["ts"], window.start_us), min(event["ts"] + event["dur"], window.end_us)
        if start < end or (start == end == event["ts"]):
            cut.append(event | {"ts": start, "dur": end - start})
    return cut


def lane_labels(spans: list[dict]) -> dict[str, str]:
    """The worker's lanes named by the device the server ran on (in each worker span's args)."""
    device = next((e["args"]["device"] for e in spans if e["pid"] == "worker" and "device" in e["args"]), "")
    if device.startswith("cuda"):
        return {"compute": f"{device} compute", "pcie": "host->device copy (adapter loads)"}
    if device:
        return {"compute": f"{device} compute", "pcie": f"adapter loads ({device} memory)"}
    return {"compute": "compute", "pcie": "adapter loads"}


MAX_REQUEST_ROWS = 40  # beyond this, requests are drawn as counts over time instead of one row each
MAX_LEGEND_ADAPTERS = 12
FIGURE_WIDTH_IN, MAX_FIGURE_HEIGHT_IN, DPI = 14.0, 9.0, 120


def draw(trace: dict, output: Path, title: str = "", last_s: float | None = None,
         since_s: float | None = None) -> None:
    import matplotlib.pyplot as plt

    figure = timeline_figure(trace, title, last_s, since_s)
    figure.savefig(output, dpi=DPI)
    plt.close(figure)


def timeline_figure(trace: dict, title: str = "", last_s: float | None = None, since_s: float | None = None):
    """The timeline picture, at most FIGURE_WIDTH_IN x MAX_FIGURE_HEIGHT_IN inches whatever the request count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    spans = spans_of(trace)
    window = window_of(spans, last_s, since_s)
    events = in_window(spans, window)
    requests = _requests_by_start(events)
    one_row_each = len(requests) <= MAX_REQUEST_ROWS
    rows = ["compute", "pcie", *(requests if one_row_each else [])]
    height = min(MAX_FIGURE_HEIGHT_IN, 2.5 + 0.18 * len(rows) + (0 if one_row_each else 3))
    figure, axes = plt.subplots(1 if one_row_each else 2, 1, figsize=(FIGURE_WIDTH_IN, height), sharex=True,
                                squeeze=False, gridspec_kw=None if one_row_each else {"height_ratios": [1, 2]})
    lanes = axes[0][0]
    scale, unit = (1e6, "s") if window.seconds > 2 else (1e3, "ms")
    colours = _adapter_colours(events)
    for event in events:
        if event["tid"] in rows:
            colour, alpha = _style(event, colours)
            lanes.barh(rows.index(event["tid"]), max(event["dur"] / scale, window.seconds * 1e6 / scale / 2000),
                       left=(event["ts"] - window.start_us) / scale, height=0.8, color=colour, alpha=alpha,
                       linewidth=0)
    labels = lane_labels(events)
    lanes.set_yticks([0, 1], [labels["compute"], labels["pcie"]])
    if one_row_each and requests:
        lanes.text(-0.01, (2 + len(rows) - 1) / 2, f"{len(requests)} requests\n(queued faint,\nthen running)",
                   transform=lanes.get_yaxis_transform(), ha="right", va="center", fontsize=8)
    lanes.set_ylim(len(rows) - 0.5, -0.5)
    if not one_row_each:
        _draw_request_counts(axes[1][0], events, window, scale)
    axes[-1][0].set_xlabel(f"time ({unit}) from {_clock(window.start_us)}")
    lanes.set_title(title or _default_title(window, len(requests), one_row_each, last_s, since_s), fontsize=10)
    _legend(figure, colours, events)
    figure.tight_layout(rect=(0, 0, 0.86, 1))
    return figure


def _requests_by_start(events: list[dict]) -> list[str]:
    starts: dict[str, float] = {}
    for event in events:
        if event["pid"] == "scheduler":
            starts[event["tid"]] = min(event["ts"], starts.get(event["tid"], event["ts"]))
    return sorted(starts, key=starts.__getitem__)


def request_counts(events: list[dict], state: str) -> tuple[list[float], list[int]]:
    """How many requests were in `state` ("queued" or "running") over time: step points (ts, count)."""
    changes = sorted([(e["ts"], 1) for e in events if e["pid"] == "scheduler" and e["name"] == state]
                     + [(e["ts"] + e["dur"], -1) for e in events if e["pid"] == "scheduler" and e["name"] == state])
    times, counts, count = [], [], 0
    for ts, change in changes:
        count += change
        times.append(ts)
        counts.append(count)
    return times, counts


def _draw_request_counts(axis, events: list[dict], window: Window, scale: float) -> None:
    for state, colour in (("running", "#1e88e5"), ("queued", "#fb8c00")):
        times, counts = request_counts(events, state)
        axis.step([(t - window.start_us) / scale for t in times], counts, where="post", color=colour, label=state)
    axis.set_ylabel("requests")
    axis.legend(loc="upper right", fontsize=8)


def _legend(figure, colours: dict[str, str], events: list[dict]) -> None:
    import matplotlib.pyplot as plt

    uses = {name: 0 for name in colours}
    for event in events:
        name = event["args"].get("adapter", "") if event["pid"] == "scheduler" else event["name"]
        if name in uses:
            uses[name] += 1
    shown = sorted(uses, key=lambda name: (-uses[name], name))[:MAX_LEGEND_ADAPTERS]
    handles = [plt.Rectangle((0, 0), 1, 1, color=colours[name]) for name in shown]
    names = [name or "base model" for name in shown]
    hidden = len(uses) - len(shown)
    title = "adapters" + (f" (top {len(shown)}; {hidden} more)" if hidden else "")
    figure.legend(handles, names, loc="upper right", fontsize=7, title=title, title_fontsize=8, frameon=False)


def _default_title(window: Window, requests: int, one_row_each: bool, last_s: float | None,
                   since_s: float | None) -> str:
    span = f"last {last_s:g} s" if last_s is not None else f"since {_clock(since_s * 1e6)}" if since_s else "whole trace"
    shown = "one row each" if one_row_each else f"more than {MAX_REQUEST_ROWS}: counts of queued and running"
    return f"loraserve timeline, {span} ({window.seconds:.2f} s): forwards, adapter loads, {requests} requests ({shown})"


def _clock(ts_us: float) -> str:
    return datetime.datetime.fromtimestamp(ts_us / 1e6).strftime("%H:%M:%S.%f")[:-3]


def _adapter_colours(events: list[dict]) -> dict[str, str]:
    import matplotlib

    names = sorted({e["args"].get("adapter", "") for e in events if e["pid"] == "scheduler"}
                   | {e["name"] for e in events if e["tid"] == "pcie"})
    palette = matplotlib.colormaps["tab20"]
    return {name: BASE_MODEL_COLOUR if not name else matplotlib.colors.to_hex(palette(i % 20))
            for i, name in enumerate(names)}


def _style(event: dict, colours: dict[str, str]) -> tuple[str, float]:
    if event["tid"] == "compute":
        return "#37474f", 0.9
    if event["tid"] == "pcie":
        return colours.get(event["name"], "#000000"), 0.9
    colour = colours.get(event["args"].get("adapter", ""), BASE_MODEL_COLOUR)
    return colour, 0.3 if event["name"] == "queued" else 0.9


def add_timeline_parsers(commands) -> None:
    trace = commands.add_parser("trace", help="save a running server's timeline as a Chrome trace")
    add_connection_arguments(trace)
    trace.add_argument("-o", "--output", type=Path, default=Path("trace.json"), help="(default: %(default)s)")
    trace.set_defaults(run=run_trace, parser=trace)
    timeline = commands.add_parser("timeline", help="draw a Chrome trace as the seed's timeline picture")
    timeline.add_argument("trace", type=existing_file, help="a Chrome trace of `loraserve trace`")
    timeline.add_argument("-o", "--output", type=Path, default=Path("timeline.png"), help="(default: %(default)s)")
    timeline.add_argument("--title", default="", help="(default: what is shown, and the window)")
    timeline.add_argument("--last", type=positive_seconds, metavar="SECONDS",
                          help="draw only the trace's last SECONDS (default: the whole trace)")
    timeline.add_argument("--since", type=since_time, metavar="TIME",
                          help="draw only from TIME: ISO 8601 (local time unless it names a zone, e.g. "
                               "2026-12-05T07:30:00) or Unix seconds (default: the trace's start)")
    timeline.set_defaults(run=run_timeline)


def positive_seconds(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise argparse.ArgumentTypeError(f"expected a number of seconds above 0, got {text!r}")
    return seconds


def since_time(text: str) -> float:
    """`--since`: an ISO 8601 time (local unless it names a zone) or Unix seconds -> Unix seconds."""
    try:
        return float(text)
    except ValueError:
        pass
    try:
        return datetime.datetime.fromisoformat(text).timestamp()
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an ISO 8601 time such as 2026-12-05T07:30:00 or Unix seconds, "
                                         f"got {text!r}") from None


def run_trace(args: argparse.Namespace) -> int:
    args.output.write_text(json.dumps(fetch_trace(connection_from_args(args.parser, args))))
    print(f"wrote {args.output}")
    return 0


def run_timeline(args: argparse.Namespace) -> int:
    trace = json.loads(args.trace.read_text())
    if not isinstance(trace, dict) or not isinstance(trace.get("traceEvents"), list):
        raise CommandError(f"{args.trace} is not a Chrome trace (no traceEvents); pass a file of `loraserve trace`")
    try:
        draw(trace, args.output, args.title, args.last, args.since)
    except ValueError as error:
        raise CommandError(f"{args.trace}: {error}") from error
    print(f"wrote {args.output}")
    return 0
