"""The cost of the process split: the three-process server against the in-process engine.

Tiny demo model on CPU, N concurrent decoding requests. Reports tokens/s of both and the
time per step spent outside the worker's forward (scheduling, ZeroMQ, protobuf, frontend).

    python -m benchmarks.process_split --concurrency 64 --new-tokens 64 --out benchmarks/results/process_split.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from benchmarks.common import run_record, write_result
from loraserve.client import LoraServeClient
from loraserve.demo import ensure_demo
from loraserve.launcher import Launcher
from settings.config import EngineConfig, ServeConfig
from worker.batch import SamplingParams, SequenceInput
from worker.engine import Engine

PROMPT_LEN = 16


def prompts(count: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(4, 250, (PROMPT_LEN,), generator=generator).tolist() for _ in range(count)]


def in_process(model_dir: Path, concurrency: int, new_tokens: int) -> dict:
    engine = Engine(EngineConfig(str(model_dir), device="cpu", dtype="float32", num_kv_pages=4096, page_size=16,
                                 host_cache_bytes=1 << 30))
    pages_per = -(-(PROMPT_LEN + new_tokens) // 16)
    tables = [list(range(i * pages_per, (i + 1) * pages_per)) for i in range(concurrency)]
    sequences = [SequenceInput(f"r{i}", p, 0, tables[i]) for i, p in enumerate(prompts(concurrency))]
    last = {s.request_id: t.token_id for s, t in zip(sequences, engine.forward(sequences).tokens)}
    started = time.perf_counter()
    for step in range(1, new_tokens):
        batch = [SequenceInput(f"r{i}", [last[f"r{i}"]], PROMPT_LEN + step - 1, tables[i],
                               sampling=SamplingParams()) for i in range(concurrency)]
        last = {t.request_id: t.token_id for t in engine.forward(batch).tokens}
    elapsed = time.perf_counter() - started
    engine.close()
    steps = new_tokens - 1
    return {"decode_tokens_per_s": concurrency * steps / elapsed, "ms_per_step": elapsed / steps * 1e3}


def three_process(model_dir: Path, concurrency: int, new_tokens: int, port: int) -> dict:
    config = ServeConfig.of(model_path=str(model_dir), tokenizer_path=str(model_dir), port=port, device="cpu",
                         dtype="float32", num_kv_pages=4096, max_batch_tokens=4096, log_level="warning")
    launcher = Launcher(config)
    launcher.start()
    try:
        launcher.wait_until_serving()
        with LoraServeClient(launcher.address) as client:
            run_clients(client, concurrency, 4)  # warm-up
            before = client.stats()
            started = time.perf_counter()
            run_clients(client, concurrency, new_tokens)
            elapsed = time.perf_counter() - started
            after = client.stats()
    finally:
        launcher.stop()
    steps = after.forward_steps - before.forward_steps
    forward_s = after.worker_forward_seconds - before.worker_forward_seconds
    scheduling_s = after.scheduler_step_seconds - before.scheduler_step_seconds
    return {
        "tokens_per_s": concurrency * new_tokens / elapsed,
        "steps": steps,
        "ms_per_step": elapsed / steps * 1e3,
        "worker_forward_ms_per_step": forward_s / steps * 1e3,
        "outside_forward_us_per_step": (elapsed - forward_s) / steps * 1e6,
        "scheduler_us_per_step": scheduling_s / steps * 1e6,
        "zmq_and_idle_us_per_step": (elapsed - forward_s - scheduling_s) / steps * 1e6,
    }


def run_clients(client: LoraServeClient, concurrency: int, new_tokens: int) -> None:
    def one(ids: list[int]) -> int:
        count = 0
        for message in client.generate_stream(input_ids=ids, max_new_tokens=new_tokens, ignore_eos=True):
            count += len(message.token_ids)
        return count

    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        assert sum(pool.map(one, prompts(concurrency))) == concurrency * new_tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--port", type=int, default=50077)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    model_dir = ensure_demo().model_dir
    result = {
        **run_record("process_split"),
        "machine": f"{platform.machine()} {platform.processor() or ''} cores={torch.get_num_threads()}",
        "concurrency": args.concurrency,
        "new_tokens": args.new_tokens,
        "in_process": in_process(model_dir, args.concurrency, args.new_tokens),
        "three_process": three_process(model_dir, args.concurrency, args.new_tokens, args.port),
    }
    print(json.dumps(result, indent=2))
    if args.out:
        write_result(args.out, result)


if __name__ == "__main__":
    main()
