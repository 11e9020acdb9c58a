"""Where a step's time goes when kernels run on several streams, from a torch.profiler chrome trace.

    python -m benchmarks.stream_timeline step.json.gz      # written by profile_decode.py --trace

Kernel tables sum overlapping kernels, so they cannot say what a step waits on. This splits
the trace into steps (at gaps where no kernel runs), and prints for the median step: its span,
how long the LoRA kernels and the base model's kernels run, alone and together, and the base
path's idle gaps grouped by the kernel that ends them (a gap before `_rope_cache_kernel` is
the step waiting for the q/k/v LoRA deltas, or a launch gap inside the graph).
"""

from __future__ import annotations

import argparse
import statistics
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from benchmarks.common import read_trace

STEP_GAP_US = 50.0  # no kernel running for this long: the host is between steps


@dataclass(frozen=True)
class Kernel:
    name: str
    start: float  # microseconds
    end: float


def load_kernels(path: Path) -> list[Kernel]:
    trace = read_trace(path)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    kernels = [Kernel(e["name"], e["ts"], e["ts"] + e["dur"])
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


LORA_KERNELS = ("_shrink_kernel", "_expand_kernel")


def is_lora(kernel: Kernel) -> bool:
    return kernel.name in LORA_KERNELS


def describe(step: list[Kernel]) -> str:
    """A graph replay runs its nodes on internal streams the trace numbers one by one, so the
    step is split by kernel kind instead: the LoRA kernels against everything else."""
    begin, finish = min(k.start for k in step), max(k.end for k in step)
    lora = busy([(k.start, k.end) for k in step if is_lora(k)])
    base = busy([(k.start, k.end) for k in step if not is_lora(k)])
    both = overlap(lora, base)
    anything = total(busy(lora + base))
    lines = [f"step span {finish - begin:.0f} us, {len(step)} kernels",
             f"  base kernels running {total(base):.0f} us, LoRA kernels {total(lora):.0f} us, both {both:.0f} us",
             f"  only LoRA running (the base path waits): {total(lora) - both:.0f} us; "
             f"nothing running: {finish - begin - anything:.0f} us"]
    gaps: dict[str, list[float]] = defaultdict(list)
    base_kernels = [k for k in step if not is_lora(k)]
    horizon = base_kernels[0].end
    for kernel in base_kernels[1:]:
        gaps[kernel.name].append(max(0.0, kernel.start - horizon))
        horizon = max(horizon, kernel.end)
    lines.append(f"  base path idle: {sum(sum(g) for g in gaps.values()):.0f} us, by the kernel that ends the gap:")
    for name, values in sorted(gaps.items(), key=lambda item: -sum(item[1]))[:10]:
        lines.append(f"    {sum(values):7.0f} us over {len(values):4d} gaps (median {statistics.median(values):5.1f})  "
                     f"{short(name)}")
    durations: dict[str, list[float]] = defaultdict(list)
    for k in step:
        durations[k.name].append(k.end - k.start)
    lines.append("  kernels: us per step, count, median us")
    for name, values in sorted(durations.items(), key=lambda item: -sum(item[1]))[:14]:
        lines.append(f"    {sum(values):7.0f} {len(values):4d} {statistics.median(values):6.1f}  {short(name)}")
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
