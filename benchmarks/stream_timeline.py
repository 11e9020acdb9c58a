"""Where a step's time goes across CUDA streams, from a torch.profiler chrome trace.

    python benchmarks/stream_timeline.py step.json.gz      # written by profile_decode.py --trace

Kernel tables sum overlapping kernels, so they cannot say what a step waits on. This splits
the trace into steps (at gaps where no stream runs anything), takes the stream that runs the
most kernels as the step's stream, and prints for the median step: its span, each stream's
busy time, the time both streams are busy, and the step stream's idle gaps grouped by the
kernel that ends them (a gap before `_rope_cache_kernel` is the step waiting for the q/k/v
LoRA deltas on the side stream, or a launch gap inside the graph).
"""

from __future__ import annotations

import argparse
import gzip
import json
import statistics
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

STEP_GAP_US = 50.0  # no kernel on any stream for this long: the host is between steps


@dataclass(frozen=True)
class Kernel:
    name: str
    stream: int
    start: float  # microseconds
    end: float


def load_kernels(path: Path) -> list[Kernel]:
    raw = path.read_bytes()
    trace = json.loads(gzip.decompress(raw) if path.suffix == ".gz" else raw)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    kernels = [Kernel(e["name"], int(e["args"].get("stream", e.get("tid", 0))), e["ts"], e["ts"] + e["dur"])
               for e in events if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memset", "gpu_memcpy")]
    return sorted(kernels, key=lambda k: k.start)


def split_steps(kernels: list[Kernel]) -> list[list[Kernel]]:
    steps: list[list[Kernel]] = []
    horizon = float("-inf")
    for kernel in kernels:
        if kernel.start - horizon > STEP_GAP_US:
            steps.append([])
        steps[-1].append(kernel)
        horizon = max(horizon, kernel.end)
    return steps


def busy(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The union of intervals, merged and sorted."""
    merged: list[tuple[float, float]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def total(intervals: list[tuple[float, float]]) -> float:
    return sum(end - start for start, end in intervals)


def overlap(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> float:
    result, j = 0.0, 0
    for start, end in a:
        while j < len(b) and b[j][1] <= start:
            j += 1
        k = j
        while k < len(b) and b[k][0] < end:
            result += min(end, b[k][1]) - max(start, b[k][0])
            k += 1
    return result


def short(name: str) -> str:
    return name if len(name) <= 56 else name[:53] + "..."


def describe(step: list[Kernel]) -> str:
    streams = Counter(k.stream for k in step)
    main = streams.most_common(1)[0][0]
    span = max(k.end for k in step) - min(k.start for k in step)
    lines = [f"step span {span:.0f} us, {len(step)} kernels on streams {dict(streams)} (step stream {main})"]
    per_stream = {s: busy([(k.start, k.end) for k in step if k.stream == s]) for s in streams}
    for stream, intervals in per_stream.items():
        lines.append(f"  stream {stream}: busy {total(intervals):.0f} us")
    side = busy([iv for s, ivs in per_stream.items() if s != main for iv in ivs])
    lines.append(f"  step stream and another both busy: {overlap(per_stream[main], side):.0f} us")
    gaps: dict[str, list[float]] = defaultdict(list)
    main_kernels = [k for k in step if k.stream == main]
    for before, after in zip(main_kernels, main_kernels[1:]):
        gaps[after.name].append(max(0.0, after.start - before.end))
    lines.append(f"  step stream idle inside the step: {sum(sum(g) for g in gaps.values()):.0f} us, by the kernel after the gap:")
    for name, values in sorted(gaps.items(), key=lambda item: -sum(item[1]))[:12]:
        lines.append(f"    {sum(values):7.0f} us over {len(values):4d} gaps (median {statistics.median(values):5.1f})  {short(name)}")
    lines.append("  kernels (us per step: total, count, median) per stream:")
    for stream in streams:
        durations: dict[str, list[float]] = defaultdict(list)
        for k in step:
            if k.stream == stream:
                durations[k.name].append(k.end - k.start)
        for name, values in sorted(durations.items(), key=lambda item: -sum(item[1]))[:10]:
            lines.append(f"    [{stream}] {sum(values):7.0f} {len(values):4d} {statistics.median(values):6.1f}  {short(name)}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("trace", type=Path)
    args = parser.parse_args()
    steps = [s for s in split_steps(load_kernels(args.trace)) if len(s) > 100]
    spans = [max(k.end for k in s) - min(k.start for k in s) for s in steps]
    print(f"{len(steps)} steps, spans (us): {[round(s) for s in spans]}")
    median_step = sorted(zip(spans, range(len(steps))))[len(steps) // 2][1]
    print(describe(steps[median_step]))


if __name__ == "__main__":
    main()
