"""Kernel-level profile of one decode step on the 8B shape (dummy weights), with and without LoRA.

    python -m benchmarks.profile_decode --batch 64 --adapters 8
    python -m benchmarks.profile_decode --batch 8 --adapters 8 --prefill 400   # a mixed step
    python -m benchmarks.profile_decode --batch 9 --trace step.json.gz   # then python -m benchmarks.stream_timeline
Prints the wall-clock time of a step, then torch.profiler's table of GPU kernels (the CUDA-graph
replay is expanded into its kernels; kernels that overlap are summed, so the table's total can
exceed the step). `--trace` also writes the profiled steps' chrome trace.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from loraserve.synthetic import write_model_config, write_random_adapter
from settings.config import TARGET_MODULES, EngineConfig
from worker.batch import NO_ADAPTER, SequenceInput
from worker.engine import Engine


def build_engine(rank: int, adapters: int, static_decode: bool = True, lora_fold: bool = False) -> Engine:
    """The 8B shape with dummy weights and `adapters` copies of one random adapter, resident in slots
    (`lora_fold`: folded into the base GEMMs, `--lora-fold`)."""
    root = Path(tempfile.mkdtemp())
    write_model_config(root / "model")
    engine = Engine(EngineConfig(str(root / "model"), load_format="dummy", dtype="bfloat16", device="cuda",
                                 num_kv_pages=8192, page_size=16, max_loras_per_batch=8, max_lora_rank=rank,
                                 host_cache_bytes=12 << 30, max_loaded_loras=8, static_decode=static_decode,
                                 lora_fold=lora_fold))
    if adapters:
        path = write_random_adapter(root / "adapter", engine.model_config, rank=rank, alpha=2 * rank,
                                    modules=TARGET_MODULES)
        for slot in range(adapters):
            engine.register_adapter(f"a{slot}", path)
            engine.stage_adapter(f"a{slot}")
            engine.wait_staged(f"a{slot}")
            engine.load_adapter(f"a{slot}", slot, blocking=True)
        engine.poll()
    return engine


def step_batch(batch: int, adapters: int, context: int, prefill: int, *, adapted_decodes: bool = True,
               adapted_prompt: bool = True) -> list[SequenceInput]:
    """`batch` decodes at `context` tokens, round robin over the adapters, and a `prefill`-token prompt
    with adapter 0; `adapted_decodes` or `adapted_prompt` False gives those the base model instead."""
    pages = -(-(context + 1) // 16)
    sequences = [SequenceInput(f"r{i}", [7], context, list(range(i * pages, (i + 1) * pages)),
                               adapter_slot=i % adapters if adapters and adapted_decodes else NO_ADAPTER)
                 for i in range(batch)]
    if prefill:
        first_page = batch * pages
        prompt_pages = list(range(first_page, first_page + -(-prefill // 16)))
        sequences.append(SequenceInput("prompt", [7] * prefill, 0, prompt_pages,
                                       adapter_slot=0 if adapters and adapted_prompt else NO_ADAPTER))
    return sequences


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--adapters", type=int, default=8, help="0: base model only")
    parser.add_argument("--rank", type=int, default=256)
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--prefill", type=int, default=0, help="add one prompt of this many tokens (a mixed step)")
    parser.add_argument("--eager", action="store_true")
    parser.add_argument("--lora-fold", action="store_true", help="LoRA folded into the base GEMMs (rank up to 16)")
    parser.add_argument("--trace", type=Path, help="write the profiled steps' chrome trace (.json or .json.gz)")
    args = parser.parse_args()
    engine = build_engine(args.rank, args.adapters, static_decode=not args.eager, lora_fold=args.lora_fold)
    decode = step_batch(args.batch, args.adapters, args.context, args.prefill)
    for _ in range(3):
        engine.forward(decode)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(20):
        engine.forward(decode)
    print(f"{'mixed' if args.prefill else 'decode'} step, batch {args.batch}, prefill {args.prefill}, "
          f"{args.adapters} adapters: "
          f"{(time.perf_counter() - start) * 1e3 / 20:.2f} ms wall clock (mean of 20, each waits for its tokens)")
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            engine.forward(decode)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60))
    if args.trace:
        prof.export_chrome_trace(str(args.trace))


if __name__ == "__main__":
    main()
