"""Per-step cost of the engine on the 8B shape (dummy weights): prefill and decode, with LoRA.

    python benchmarks/engine_step.py --out $OUT/engine_step.json
Records the GPU, commit and raw timings; a baseline for the GPU-performance work.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from loraserve.synthetic import write_model_config, write_random_adapter
from settings.config import EngineConfig
from worker.batch import SequenceInput
from worker.engine import Engine
from worker.lora.adapter import TARGET_MODULES



def timed(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path)
    parser.add_argument("--rank", type=int, default=256)
    parser.add_argument("--eager", action="store_true", help="no static decode path / CUDA graphs (the old engine)")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp())
    write_model_config(root / "model")
    engine = Engine(EngineConfig(str(root / "model"), load_format="dummy", dtype="bfloat16", device="cuda",
                                 num_kv_pages=8192, page_size=16, max_loras_per_batch=8, max_lora_rank=args.rank,
                                 host_cache_bytes=12 << 30, max_loaded_loras=8,
                                 static_decode=not args.eager))
    adapter = write_random_adapter(root / "adapter", engine.model_config, rank=args.rank, alpha=2 * args.rank,
                                   modules=TARGET_MODULES)
    info = engine.register_adapter("big", adapter)
    engine.stage_adapter("big")
    engine.wait_staged("big")
    copy_ms = timed(lambda: engine.load_adapter("big", 0, blocking=True) or engine.poll(), 3)
    results = {"gpu": torch.cuda.get_device_name(), "adapter_bytes": info.nbytes,
               "blocking_load_ms": copy_ms, "decode_path": "eager" if args.eager else "cuda graphs",
               "commit": os.environ.get("LORASERVE_COMMIT") or subprocess.run(
                   ["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()}
    for name in (f"big{i}" for i in range(1, 8)):  # eight slots, as the seed's server
        engine.register_adapter(name, adapter)
        engine.stage_adapter(name)
        engine.wait_staged(name)
        engine.load_adapter(name, int(name[3:]), blocking=True)
    engine.poll()
    tables = [list(range(i * 64, i * 64 + 64)) for i in range(64)]
    spread = [SequenceInput(f"r{i}", [7], 512, tables[i], adapter_slot=i % 8) for i in range(64)]
    engine.forward([SequenceInput(f"r{i}", list(range(100, 612)), 0, tables[i], adapter_slot=i % 8)
                    for i in range(8)])
    results["decode_b64_8adapters_ms"] = timed(lambda: engine.forward(spread), 10)
    for batch, lora in ((1, False), (32, False), (32, True), (64, True)):
        tables = [list(range(i * 64, i * 64 + 64)) for i in range(batch)]
        slot = 0 if lora else -1
        prefill = [SequenceInput(f"r{i}", list(range(100, 612)), 0, tables[i], adapter_slot=slot) for i in range(batch)]
        decode = [SequenceInput(f"r{i}", [7], 512, tables[i], adapter_slot=slot) for i in range(batch)]
        engine.forward(prefill[:4])
        engine.forward(decode)
        results[f"decode_b{batch}_lora{int(lora)}_ms"] = timed(lambda: engine.forward(decode), 10)
        if batch == 1 or lora:
            results[f"prefill512_b{min(batch, 4)}_lora{int(lora)}_ms"] = timed(
                lambda: engine.forward(prefill[:min(batch, 4)]), 3)
    summary = {k: (sorted(v)[len(v) // 2] if isinstance(v, list) else v) for k, v in results.items()}
    print(json.dumps(summary, indent=2))
    if args.out:
        args.out.write_text(json.dumps({"median": summary, "raw": results}, indent=2))


if __name__ == "__main__":
    main()
