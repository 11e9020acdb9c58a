"""Where a pipelined cold request's time goes: host time of each call, GPU times of the copy's
layers and of the forward, and a torch profiler trace (the "pipelined" case of cold_start.py).

    python benchmarks/cold_start_trace.py --trace pipelined.json.gz
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from cold_start import PROMPT, engine_with_staged_adapter, settle  # a sibling: benchmarks/ is on sys.path
from worker.batch import SequenceInput
from worker.engine import Engine


def pipelined(engine: Engine) -> dict[str, float]:
    """Loads "a" into slot 0 and prefills at once; host and GPU milliseconds of each part."""
    torch.cuda.synchronize()
    before = torch.cuda.Event(enable_timing=True)
    before.record()
    t0 = time.perf_counter()
    engine.load_adapter("a", 0)
    t1 = time.perf_counter()
    job = engine.pending[0]
    launched = torch.cuda.Event(enable_timing=True)
    launched.record()
    pending = engine.launch([SequenceInput("cold", PROMPT, 0, list(range(32)), adapter_slot=0)])
    t2 = time.perf_counter()
    after = torch.cuda.Event(enable_timing=True)
    after.record()
    engine.finish(pending)
    t3 = time.perf_counter()
    engine.copier.wait(job)
    torch.cuda.synchronize()
    return {
        "host_load_adapter_ms": (t1 - t0) * 1e3, "host_launch_ms": (t2 - t1) * 1e3, "host_finish_ms": (t3 - t2) * 1e3,
        "gpu_copy_start_ms": before.elapsed_time(job.copy_started),
        "gpu_layer0_copied_ms": before.elapsed_time(job.layer_ready[0]),
        "gpu_last_layer_copied_ms": before.elapsed_time(job.layer_ready[-1]),
        "gpu_forward_queued_ms": before.elapsed_time(launched),
        "gpu_forward_done_ms": before.elapsed_time(after),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trace", type=Path, help="chrome trace of one pipelined request (.json or .json.gz)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    engine, _ = engine_with_staged_adapter()
    rounds = []
    for _ in range(args.repeats + 1):  # the first round warms up (kernels, graph captures)
        rounds.append(pipelined(engine))
        settle(engine)
        engine.evict_slot(0)
    print(json.dumps(rounds[1:], indent=2))
    if args.trace:
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as profiler:
            pipelined(engine)
        settle(engine)
        profiler.export_chrome_trace(str(args.trace))


if __name__ == "__main__":
    main()
