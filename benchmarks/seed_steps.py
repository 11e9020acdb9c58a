"""A seed run's forwards by kind, from the worker's timeline in its trace.

    python -m benchmarks.seed_steps OUT/large-on.trace.json.gz   # written by seed_workload

Decode steps are grouped by (sequences, adapters); steps carrying a prompt by the mixed
token bucket their tokens pad to (`worker.graph_step.MIXED_TOKEN_BUCKETS`, or `--buckets`:
the trace does not say which buckets the run had) and their path
(`static`, `static-waiting` while a load lands, `eager`). Prints each group's count, median
and total milliseconds, the largest totals first, and the share of the forwards' time that
steps carrying a prompt take. Asserts nothing.
"""

from __future__ import annotations

import argparse
import bisect
import statistics
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from benchmarks.common import read_trace
from worker.graph_step import MIXED_TOKEN_BUCKETS


@dataclass(frozen=True)
class StepGroup:
    name: str
    durations_ms: list[float]

    @property
    def total_ms(self) -> float:
        return sum(self.durations_ms)


def step_groups(trace: dict, buckets: tuple[int, ...] = MIXED_TOKEN_BUCKETS) -> list[StepGroup]:
    """The trace's forwards grouped as described above, the largest total first."""
    groups: dict[str, list[float]] = defaultdict(list)
    for event in trace["traceEvents"]:
        if event.get("ph") != "X" or event.get("name") != "forward":
            continue
        args = event["args"]
        tokens, sequences = args["tokens"], args["sequences"]
        if tokens == sequences:
            name = f"decode, {sequences} sequences over {len(args.get('adapters', []))} adapters"
        else:
            index = bisect.bisect_left(buckets, tokens)
            bucket = buckets[index] if index < len(buckets) else f"over {buckets[-1]}"
            name = f"prompt, bucket {bucket} tokens, {args.get('path', '?')}"
        groups[name].append(event["dur"] / 1e3)
    return sorted((StepGroup(name, durations) for name, durations in groups.items()),
                  key=lambda group: -group.total_ms)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trace", type=Path)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--buckets", default=",".join(map(str, MIXED_TOKEN_BUCKETS)),
                        help="the run's mixed token buckets, comma-separated")
    args = parser.parse_args()
    buckets = tuple(int(b) for b in args.buckets.split(","))
    groups = step_groups(read_trace(args.trace), buckets)
    total = sum(group.total_ms for group in groups)
    prompt = sum(group.total_ms for group in groups if group.name.startswith("prompt"))
    print(f"{sum(len(g.durations_ms) for g in groups)} forwards, {total:.0f} ms; steps carrying a prompt "
          f"{prompt:.0f} ms ({prompt / total:.1%})")
    for group in groups[:args.top]:
        print(f"{len(group.durations_ms):6d} {statistics.median(group.durations_ms):8.2f} ms median "
              f"{group.total_ms:9.0f} ms total  {group.name}")


if __name__ == "__main__":
    main()
