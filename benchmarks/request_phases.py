"""Where each request's time to first token went, from a server's timeline trace.

    python -m benchmarks.request_phases OUT/large-on.trace.json.gz   # written by seed_workload

For every finished request it lines up, in milliseconds after the request's arrival: its
adapter's copy (the load of that adapter whose copy was the latest to start before the
request's first forward ended), the moment the scheduler heard the adapter was ready, its
admission into a forward, that forward on the GPU (the first forward carrying the adapter and a
prompt that started after the admission) and the moment the scheduler had its first token.
Prints the median, P90 and mean of each moment and of the gaps between them, for the requests
whose adapter was copied after they arrived and for the others. `each_request` gives every
request's moments in arrival order (a seed run's result file keeps them, so that which request
got a slot when can be read off both modes' runs of the same workload). Asserts nothing.
"""

from __future__ import annotations

import argparse
import bisect
import statistics
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from benchmarks.common import read_trace
from loraserve.bench import nearest_rank

# Host and GPU times share the host clock to within the worker's alignment at start-up; a
# forward may appear to start this much before the admission that put the request in it.
CLOCK_TOLERANCE_US = 2_000.0


@dataclass(frozen=True)
class RequestPhases:
    """Moments of one request in ms after its arrival; None where the trace does not have it."""

    adapter: str
    arrival_us: float  # trace time
    output_tokens: int
    copy_start: float | None
    copy_end: float | None
    adapter_ready: float | None
    admitted: float
    forward_start: float | None
    forward_end: float | None
    first_token: float | None
    finished: float | None

    @property
    def copied_after_arrival(self) -> bool:
        return self.copy_end is not None and self.copy_end > 0


MOMENTS = ("copy_start", "copy_end", "adapter_ready", "admitted", "forward_start", "forward_end", "first_token",
           "finished")
GAPS = (("copy_end", "forward_start"), ("copy_end", "admitted"), ("admitted", "forward_start"),
        ("forward_start", "forward_end"), ("forward_end", "first_token"))


def request_phases(trace: dict) -> list[RequestPhases]:
    events = [e for e in trace["traceEvents"] if e.get("ph") == "X"]
    loads = _spans_by_adapter(e for e in events if e.get("tid") == "pcie")
    prompt_forwards = _prompt_forwards_by_adapter(e for e in events if e.get("name") == "forward")
    spans = [e for e in events if e.get("pid") == "scheduler"]
    running_ends = {e["tid"]: e["ts"] + e["dur"] for e in spans if e["name"] == "running"}
    phases = []
    for queued in (e for e in spans if e["name"] == "queued"):
        args = queued["args"]
        arrival = queued["ts"]
        admitted = arrival + queued["dur"]
        adapter = args.get("adapter", "")

        def ms(moment: float | None) -> float | None:
            return None if moment is None else (moment - arrival) / 1e3

        forward = _first_after(prompt_forwards.get(adapter, []), admitted - CLOCK_TOLERANCE_US)
        forward_end = forward["ts"] + forward["dur"] if forward else None
        copy = _latest_copy_before(loads.get(adapter, []), forward_end if forward_end is not None else admitted)
        phases.append(RequestPhases(
            adapter=adapter, arrival_us=arrival, output_tokens=args.get("output_tokens", 0),
            copy_start=ms(copy and copy["ts"]), copy_end=ms(copy and copy["ts"] + copy["dur"]),
            adapter_ready=ms(args.get("adapter_ready_us")), admitted=ms(admitted),
            forward_start=ms(forward and forward["ts"]), forward_end=ms(forward_end),
            first_token=ms(args.get("first_token_us")), finished=ms(running_ends.get(queued["tid"]))))
    return sorted(phases, key=lambda p: p.arrival_us)


def _spans_by_adapter(events) -> dict[str, list[dict]]:
    spans: dict[str, list[dict]] = defaultdict(list)
    for event in events:
        spans[event["name"]].append(event)
    for adapter_spans in spans.values():
        adapter_spans.sort(key=lambda e: e["ts"])
    return spans


def _prompt_forwards_by_adapter(forwards) -> dict[str, list[dict]]:
    by_adapter: dict[str, list[dict]] = defaultdict(list)
    for forward in forwards:
        args = forward["args"]
        if args["tokens"] > args["sequences"]:
            for adapter in args.get("adapters", []):
                by_adapter[adapter].append(forward)
    for spans in by_adapter.values():
        spans.sort(key=lambda e: e["ts"])
    return by_adapter


def _first_after(spans: list[dict], moment: float) -> dict | None:
    index = bisect.bisect_left([s["ts"] for s in spans], moment)
    return spans[index] if index < len(spans) else None


def _latest_copy_before(spans: list[dict], moment: float) -> dict | None:
    index = bisect.bisect_right([s["ts"] for s in spans], moment)
    return spans[index - 1] if index else None


@dataclass(frozen=True)
class Summary:
    name: str
    count: int
    median: float
    p90: float
    mean: float


def summarise(phases: list[RequestPhases]) -> list[Summary]:
    """Each moment's and gap's median, P90 and mean over the requests that have it."""
    series: list[tuple[str, list[float]]] = []
    for moment in MOMENTS:
        series.append((moment, [v for p in phases if (v := getattr(p, moment)) is not None]))
    for since, until in GAPS:
        values = [getattr(p, until) - getattr(p, since) for p in phases
                  if getattr(p, since) is not None and getattr(p, until) is not None]
        series.append((f"{since} -> {until}", values))
    return [Summary(name, len(values), statistics.median(values), nearest_rank(sorted(values), 0.9),
                    statistics.fmean(values)) for name, values in series if values]


def groups(phases: list[RequestPhases]) -> dict[str, tuple[int, list[Summary]]]:
    """Requests whose adapter was copied after they arrived, and the others: (count, summaries)."""
    copied = [p for p in phases if p.copied_after_arrival]
    others = [p for p in phases if not p.copied_after_arrival]
    return {name: (len(members), summarise(members)) for name, members in
            (("adapter copied after arrival", copied), ("adapter already on the GPU", others)) if members}


def as_figures(summaries: dict[str, tuple[int, list[Summary]]]) -> dict:
    """The groups for a result file: per group, its request count and each row's figures (ms)."""
    return {name: {"requests": count} | {r.name: {"median": round(r.median, 2), "p90": round(r.p90, 2),
                                                  "mean": round(r.mean, 2), "count": r.count} for r in rows}
            for name, (count, rows) in summaries.items()}


def each_request(phases: list[RequestPhases]) -> list[dict]:
    """Every request in arrival order: its adapter, output tokens, arrival (ms after the first
    request's) and each moment it has (ms after its own arrival)."""
    first = phases[0].arrival_us if phases else 0.0
    return [{"adapter": p.adapter, "output_tokens": p.output_tokens,
             "arrival": round((p.arrival_us - first) / 1e3, 2)}
            | {moment: round(value, 2) for moment in MOMENTS if (value := getattr(p, moment)) is not None}
            for p in phases]


def format_groups(summaries: dict[str, tuple[int, list[Summary]]]) -> str:
    lines = []
    for name, (count, rows) in summaries.items():
        lines.append(f"{name}: {count} requests")
        lines.append(f"  {'ms after arrival':34s} {'count':>6s} {'median':>9s} {'P90':>9s} {'mean':>9s}")
        lines.extend(f"  {r.name:34s} {r.count:6d} {r.median:9.1f} {r.p90:9.1f} {r.mean:9.1f}" for r in rows)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trace", type=Path)
    args = parser.parse_args()
    print(format_groups(groups(request_phases(read_trace(args.trace)))))


if __name__ == "__main__":
    main()
