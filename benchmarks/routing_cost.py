"""What routing costs the frontend per request: `Router.choose` (and `finished`) with views of N
replicas over 1,000 adapters, Zipf(1.1) requests, each replica holding 8 on its GPU and 16 in host
memory; and `update`, once per replica per state interval.

    python -m benchmarks.routing_cost --out benchmarks/results/routing-cost-COMMIT.json
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from pathlib import Path

from benchmarks.common import run_record, write_result
from frontend.routing import ReplicaView, Router

ADAPTERS = [f"adapter{i}" for i in range(1000)]


def views(replicas: int, rng: random.Random) -> list[ReplicaView]:
    return [ReplicaView(str(i), gpu_adapters=frozenset(rng.sample(ADAPTERS, 8)),
                        host_adapters=frozenset(rng.sample(ADAPTERS, 16)), requests=rng.randrange(64))
            for i in range(replicas)]


def microseconds_per_call(replicas: int, requests: int, seed: int = 0) -> dict[str, float]:
    rng = random.Random(seed)
    weights = [1 / (rank + 1) ** 1.1 for rank in range(len(ADAPTERS))]
    picks = rng.choices(ADAPTERS, weights, k=requests)
    router = Router()
    published = views(replicas, rng)
    start = time.perf_counter()
    for view in published:
        router.update(view)
    update_us = (time.perf_counter() - start) / replicas * 1e6
    samples = []
    for i, adapter in enumerate(picks):
        if i % 64 == 0:  # a new view now and then, as the state polls bring them
            router.update(published[i % replicas])
        start = time.perf_counter()
        router.choose(adapter, now=i * 1e-3)
        router.finished(adapter)
        samples.append((time.perf_counter() - start) * 1e6)
    return {"choose_median_us": statistics.median(samples),
            "choose_p99_us": statistics.quantiles(samples, n=100)[98], "update_us": update_us}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2, 8, 64])
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    figures = {str(n): microseconds_per_call(n, args.requests) for n in args.replicas}
    print("| replicas | choose median µs | choose P99 µs | update µs |\n| ---: | ---: | ---: | ---: |")
    for n, f in figures.items():
        print(f"| {n} | {f['choose_median_us']:.1f} | {f['choose_p99_us']:.1f} | {f['update_us']:.1f} |")
    if args.out:
        write_result(args.out, run_record("routing_cost", requests=args.requests, figures=figures))


if __name__ == "__main__":
    main()
