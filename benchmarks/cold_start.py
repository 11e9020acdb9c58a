"""Time to first token of one cold request on an idle engine (8B shape, dummy weights).

    LORASERVE_COMMIT=$(git rev-parse HEAD) python -m benchmarks.cold_start --out cold.json
Measures, for a 512-token prompt and a rank-256 all-module adapter (1.34 GB):
- warm: the adapter already in a GPU slot;
- copy: the host-cache -> GPU copy alone (blocking load);
- sequential: the copy, then the prefill (what a server without pipelining does);
- pipelined: the copy starts and the prefill is issued at once, each layer waiting on that
  layer's copy event (target: <= 1.1 x max(copy, warm));
- disk_read: reading the file alone into the pinned cache (page cache dropped where the
  kernel allows), beside the file size and the read bandwidth it implies;
- from_disk: the adapter only on disk, staged, loaded and prefilled at once: the load streams
  (each layer copied once read) and the prefill waits per layer, so the time to first token
  should be about the read's, against the sequential estimate read + copy + warm.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import run_record, write_result
from loraserve.synthetic import write_model_config, write_random_adapter
from settings.config import TARGET_MODULES, EngineConfig
from worker.batch import SequenceInput
from worker.engine import AdapterInfo, Engine

PROMPT = list(range(100, 612))
CASES = ("warm", "copy", "sequential", "pipelined", "from_disk", "disk_read")


def prefill(engine: Engine, slot: int) -> None:
    engine.forward([SequenceInput("cold", PROMPT, 0, list(range(32)), adapter_slot=slot)])  # samples: syncs


def clock(fn) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3


def drop_page_cache(file: Path) -> None:
    descriptor = os.open(file, os.O_RDONLY)
    try:
        os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(descriptor)


def settle(engine: Engine) -> None:
    while engine.busy_loading:
        engine.poll()
    engine.poll()


def engine_with_staged_adapter() -> tuple[Engine, AdapterInfo]:
    """The 8B shape (dummy weights) with adapter "a" registered and in the host cache."""
    root = Path(tempfile.mkdtemp())
    write_model_config(root / "model")
    engine = Engine(EngineConfig(str(root / "model"), load_format="dummy", dtype="bfloat16", device="cuda",
                                 num_kv_pages=4096, page_size=16, max_loras_per_batch=2, max_lora_rank=256,
                                 host_cache_bytes=4 << 30, max_loaded_loras=2))
    path = write_random_adapter(root / "adapter", engine.model_config, rank=256, alpha=512, modules=TARGET_MODULES)
    info = engine.register_adapter("a", path)
    engine.stage_adapter("a")
    engine.wait_staged("a")
    return engine, info


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    engine, info = engine_with_staged_adapter()
    file_bytes = sum(f.stat().st_size for f in info.path.iterdir())
    weights = info.path / "adapter_model.safetensors"
    times: dict[str, list[float]] = {k: [] for k in CASES}
    for _ in range(args.repeats + 1):  # the first round warms up (kernels, allocator)
        if engine.slot_of("a") is not None:
            engine.evict_slot(0)
        times["copy"].append(clock(lambda: engine.load_adapter("a", 0, blocking=True)))
        settle(engine)
        times["warm"].append(clock(lambda: prefill(engine, 0)))
        engine.evict_slot(0)
        times["sequential"].append(clock(lambda: (engine.load_adapter("a", 0, blocking=True), prefill(engine, 0))))
        settle(engine)
        engine.evict_slot(0)
        times["pipelined"].append(clock(lambda: (engine.load_adapter("a", 0), prefill(engine, 0))))
        settle(engine)
        engine.evict_slot(0)
        engine.evict_host("a")
        drop_page_cache(weights)
        times["disk_read"].append(clock(lambda: (engine.stage_adapter("a"), engine.wait_staged("a"))))
        settle(engine)
        engine.evict_host("a")
        drop_page_cache(weights)
        times["from_disk"].append(clock(lambda: (engine.stage_adapter("a"), engine.load_adapter("a", 0),
                                                 prefill(engine, 0))))
        settle(engine)
    median = {k: statistics.median(v[1:]) for k, v in times.items()}
    result = {
        **run_record("cold_start"),
        "adapter_bytes": info.nbytes, "file_bytes": file_bytes, "median_ms": median, "raw_ms": times,
        "pipelined_vs_max_copy_warm": median["pipelined"] / max(median["copy"], median["warm"]),
        "copy_gbps": info.nbytes / median["copy"] / 1e6,
        "disk_read_gbps (page cache dropped where the kernel allows)": file_bytes / median["disk_read"] / 1e6,
        # What a load that waits for the whole file, then copies, then prefills would take.
        "from_disk_sequential_estimate_ms": median["disk_read"] + median["copy"] + median["warm"],
        "from_disk_vs_read": median["from_disk"] / median["disk_read"],
    }
    print(json.dumps({k: v for k, v in result.items() if k != "raw_ms"}, indent=2))
    if args.out:
        write_result(args.out, result)


if __name__ == "__main__":
    main()
