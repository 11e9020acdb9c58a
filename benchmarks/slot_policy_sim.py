"""The scheduler's slot policy on the seed's workload, simulated on CPU (no model, no GPU).

The real SchedulerCore drives an in-memory worker (tests/scheduler/fake_worker.py) on a
simulated clock: each step lasts what the H200 engine measured (`step_ms`); a load lasts
one step (26 ms of copy). Workload as the seed's: 100 requests, Poisson at 4/s,
input and output uniform over [1, 512], `distinct` over 16 adapter names, 8 slots.

    python benchmarks/slot_policy_sim.py [--seeds 10] [--drain-after-s 0 2] [--out FILE]
Prints TTFT and E2E (simulated ms) and the number of loads; run it at two commits to
compare scheduling policies on the same step-time model.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from protos.loraserve.v1 import internal_pb2 as pb  # noqa: E402
from protos.loraserve.v1 import serving_pb2  # noqa: E402
from scheduler.config import SchedulerConfig  # noqa: E402
from scheduler.core import SchedulerCore  # noqa: E402
from tests.scheduler.fake_worker import FakeWorker, hello  # noqa: E402

CLIENT = b"bench"
ADAPTERS = [f"adapter{i}" for i in range(16)]


def step_ms(batch: pb.Forward) -> float:
    """From the H200 timeline at 779a7e2 (`results/h200-seed-large-pipelined/`): a decode step
    costs ~6.6 ms plus ~0.46 ms per distinct adapter (up to the 8 slots); a step with prefill
    chunks (CUDA graphs too) ~11 ms plus ~0.045 ms a token."""
    tokens = sum(max(1, len(s.token_ids)) for s in batch.sequences)
    adapters = len({s.adapter_slot for s in batch.sequences if s.adapter_slot >= 0})
    if tokens == len(batch.sequences):
        return 6.6 + 0.46 * adapters
    return 11.0 + 0.045 * tokens


def workload(seed: int, count: int, rate: float) -> list[tuple[float, int, int, str]]:
    rng = random.Random(seed)
    arrival, requests = 0.0, []
    for i in range(count):
        arrival += rng.expovariate(rate) * 1e3
        requests.append((arrival, rng.randint(1, 512), rng.randint(1, 512), ADAPTERS[i % len(ADAPTERS)]))
    return requests


@dataclass
class SimulatedClock:
    ms: float = 0.0

    def monotonic(self) -> float:
        return self.ms / 1e3


def simulate(count: int, rate: float, seed: int, config: SchedulerConfig | None = None) -> dict:
    """The core sees the simulated clock as `time.monotonic` (arrival times, waits)."""
    clock = SimulatedClock()
    with mock.patch.object(time, "monotonic", clock.monotonic):
        return _simulate(count, rate, seed, config or SchedulerConfig(max_batch_tokens=4096), clock)


def _simulate(count: int, rate: float, seed: int, config: SchedulerConfig, clock: SimulatedClock) -> dict:
    core = SchedulerCore(config, hello(max_loras_per_batch=8, max_loaded_loras=16, num_kv_pages=16384, page_size=16,
                                       max_context_length=2048, host_cache_bytes=1 << 40))
    worker = FakeWorker(core)
    for name in ADAPTERS:
        worker.register(name, size=1_342_177_280, rank=256)
    pending = workload(seed, count, rate)
    arrivals, first_token, finished = {}, {}, {}
    seen_outputs = 0
    while len(finished) < count:
        while pending and pending[0][0] <= clock.ms:
            arrival, prompt_len, output_len, adapter = pending.pop(0)
            request_id = f"r{len(arrivals)}"
            arrivals[request_id] = arrival
            params = serving_pb2.SamplingParams(max_new_tokens=output_len, temperature=0, top_p=1, top_k=-1,
                                                ignore_eos=True)
            core.submit(CLIENT, pb.SubmitRequest(request_id=request_id, input_ids=[7] * prompt_len,
                                                 adapter=adapter, sampling=params))
        ran = worker.step()
        clock.ms = clock.ms + step_ms(worker.batches[-1]) if ran else (pending[0][0] if pending else clock.ms + 1.0)
        for _, message in core.outputs[seen_outputs:]:
            output = message.output
            if output.token_ids and output.request_id not in first_token:
                first_token[output.request_id] = clock.ms
            if output.finished:
                finished[output.request_id] = clock.ms
        seen_outputs = len(core.outputs)
    ttft = [first_token[r] - arrivals[r] for r in arrivals]
    e2e = [finished[r] - arrivals[r] for r in arrivals]
    loads = sum(1 for c in worker.log if c.WhichOneof("kind") == "load_slot")
    return {"median_ttft_ms": statistics.median(ttft), "mean_ttft_ms": statistics.fmean(ttft),
            "p99_ttft_ms": sorted(ttft)[int(0.99 * len(ttft))], "mean_e2e_ms": statistics.fmean(e2e),
            "loads": loads, "duration_s": clock.ms / 1e3}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--num-prompts", type=int, default=100)
    parser.add_argument("--request-rate", type=float, default=4.0)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--drain-after-s", type=float, nargs="+", default=[SchedulerConfig.drain_after_s],
                        help="SchedulerConfig.drain_after_s values to compare")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    results = {}
    for drain_after_s in args.drain_after_s:
        config = SchedulerConfig(max_batch_tokens=4096, drain_after_s=drain_after_s)
        runs = [simulate(args.num_prompts, args.request_rate, seed, config) for seed in range(args.seeds)]
        summary = {key: statistics.fmean(run[key] for run in runs) for key in runs[0]}
        results[f"drain_after_s={drain_after_s:g}"] = {"mean over seeds": summary, "runs": runs}
    print(json.dumps({name: result["mean over seeds"] for name, result in results.items()}, indent=1))
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
