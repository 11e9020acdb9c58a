"""`loraserve trace` fetches a running server's Chrome trace; `loraserve timeline` draws it.

The drawing follows the seed's picture: a compute lane (forwards), a PCIe lane (adapter
loads), and one row per request (queued, then running), coloured by adapter.
"""

from __future__ import annotations

import argparse
import bisect
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


def draw(trace: dict, output: Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    events = [e for e in trace["traceEvents"] if e.get("ph") == "X"]
    if not events:
        raise ValueError("the trace has no spans")
    origin = min(e["ts"] for e in events)
    requests = sorted({e["tid"] for e in events if e["pid"] == "scheduler"},
                      key=lambda tid: min(e["ts"] for e in events if e["tid"] == tid))
    rows = ["compute", "pcie", *requests]
    colours = _adapter_colours(events)
    height = min(30.0, 2 + 0.12 * len(rows))
    figure, axis = plt.subplots(figsize=(14, height))
    for event in events:
        row = rows.index(event["tid"]) if event["tid"] in rows else None
        if row is None:
            continue
        start, width = (event["ts"] - origin) / 1e3, max(event["dur"] / 1e3, 0.05)
        colour, alpha = _style(event, colours)
        axis.barh(row, width, left=start, height=0.8, color=colour, alpha=alpha, linewidth=0)
    axis.set_yticks(range(len(rows)), ["GPU compute", "PCIe (adapter loads)", *[""] * len(requests)])
    axis.invert_yaxis()
    axis.set_xlabel("time (ms)")
    axis.set_title(title or "loraserve timeline: forwards, adapter loads, requests by adapter")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in colours.values()]
    axis.legend(handles, [name or "base model" for name in colours], loc="lower right", fontsize=7, ncol=4)
    figure.tight_layout()
    figure.savefig(output, dpi=120)
    plt.close(figure)


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
    timeline.add_argument("-o", "--output", type=Path, default=Path("timeline.png"))
    timeline.add_argument("--title", default="")
    timeline.set_defaults(run=run_timeline)


def run_trace(args: argparse.Namespace) -> int:
    args.output.write_text(json.dumps(fetch_trace(connection_from_args(args.parser, args))))
    print(f"wrote {args.output}")
    return 0


def run_timeline(args: argparse.Namespace) -> int:
    trace = json.loads(args.trace.read_text())
    if not isinstance(trace, dict) or not isinstance(trace.get("traceEvents"), list):
        raise CommandError(f"{args.trace} is not a Chrome trace (no traceEvents); pass a file of `loraserve trace`")
    try:
        draw(trace, args.output, args.title)
    except ValueError as error:
        raise CommandError(f"{args.trace}: {error}") from error
    print(f"wrote {args.output}")
    return 0
