"""loraserve's engine against transformers + PEFT on the same 16 adapters, in one invocation.

    LORASERVE_COMMIT=$(git rev-parse HEAD) python -m benchmarks.peft_peer --out peer.json
8B shape with random bf16 weights, one rank-256 all-module adapter under 16 names (the seed's
large set). PEFT serves a mixed batch with `adapter_names` (one request per adapter, the batch
that fit in its measured run); loraserve's engine serves the same prompts, `--per-adapter`
requests per adapter (16: a decode batch of 256, the largest graph bucket), all 16 adapters in
GPU slots as PEFT holds all 16 (loaded before the clock starts, as PEFT's are), prompts
prefilled in chunks of the server's default `--max-batch-tokens`, then decode steps over the
whole batch. Both sides run a short warm-up first. Output tokens per second of
each, and their ratio (the target is >= 100).
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
import time
from pathlib import Path

import torch
from peft import PeftModel
from transformers import LlamaConfig, LlamaForCausalLM

from benchmarks.common import run_record, write_result
from loraserve.synthetic import LLAMA31_8B, write_model_config, write_random_adapter
from settings.config import TARGET_MODULES, EngineConfig
from worker.batch import SequenceInput
from worker.engine import Engine
from worker.model.config import load_model_config

NAMES = [f"a{i}" for i in range(16)]
PREFILL_CHUNK_TOKENS = 2048  # the server's default --max-batch-tokens
# --smoke: a tiny model on CPU, to check the script without a GPU.
TINY = {**LLAMA31_8B, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 32000}


def prompts(count: int, length: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(100, 30000, (length,), generator=gen).tolist() for _ in range(count)]


def hf_config(config: dict) -> LlamaConfig:
    return LlamaConfig(**{k: v for k, v in config.items() if k != "architectures"})


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def peft_throughput(config: dict, adapter: Path, prompt_len: int, new_tokens: int, device: str) -> dict:
    with torch.device(device):
        model = LlamaForCausalLM(hf_config(config)).to(torch.bfloat16)  # random weights
    model = PeftModel.from_pretrained(model, str(adapter), adapter_name=NAMES[0])
    for name in NAMES[1:]:
        model.load_adapter(str(adapter), adapter_name=name)
    batch = torch.tensor(prompts(len(NAMES), prompt_len), device=device)
    generate = dict(adapter_names=NAMES, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    model.generate(batch[:, :8], **{**generate, "max_new_tokens": 2, "min_new_tokens": 2})  # warm-up
    sync(device)
    start = time.perf_counter()
    out = model.generate(batch, attention_mask=torch.ones_like(batch), **generate)
    sync(device)
    seconds = time.perf_counter() - start
    produced = (out.shape[1] - prompt_len) * out.shape[0]
    del model
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return {"batch": len(NAMES), "output_tokens": produced, "seconds": seconds, "tokens_per_s": produced / seconds}


def loraserve_throughput(model_dir: Path, adapter: Path, prompt_len: int, new_tokens: int, per_adapter: int,
                         device: str) -> dict:
    engine = Engine(EngineConfig(str(model_dir), load_format="dummy", dtype="bfloat16", device=device,
                                 num_kv_pages=8192, page_size=16, max_loras_per_batch=len(NAMES), max_lora_rank=256,
                                 host_cache_bytes=(24 << 30) if device == "cuda" else 1 << 28,
                                 max_loaded_loras=len(NAMES)))
    for slot, name in enumerate(NAMES):
        engine.register_adapter(name, adapter)
        engine.stage_adapter(name)
        engine.wait_staged(name)
        engine.load_adapter(name, slot, blocking=True)
    engine.poll()
    # Warm-up, as PEFT's: the shapes served (prefill chunks, the decode batch) compile and
    # capture their CUDA graphs before the clock starts (the worker captures every bucket at start).
    _serve(engine, prompts(len(NAMES), prompt_len), prompt_len, 2, per_adapter)
    sync(device)
    start = time.perf_counter()
    produced = _serve(engine, prompts(len(NAMES), prompt_len), prompt_len, new_tokens, per_adapter)
    sync(device)
    seconds = time.perf_counter() - start
    engine.close()
    return {"requests": len(NAMES) * per_adapter, "batch": len(NAMES) * per_adapter, "output_tokens": produced,
            "seconds": seconds, "tokens_per_s": produced / seconds}


def _serve(engine: Engine, texts: list[list[int]], prompt_len: int, new_tokens: int, per_adapter: int) -> int:
    """Prefills every request in chunks, then decodes them together; returns the tokens made."""
    pages = -(-(prompt_len + new_tokens) // 16)
    seqs = []  # (request id, prompt, slot, page table)
    for slot, name in enumerate(NAMES):
        for i in range(per_adapter):
            first_page = (slot * per_adapter + i) * pages
            seqs.append((f"{name}-{i}", texts[slot], slot, list(range(first_page, first_page + pages))))
    per_chunk = max(1, PREFILL_CHUNK_TOKENS // prompt_len)
    tokens = []
    for chunk in range(0, len(seqs), per_chunk):
        tokens += engine.forward([SequenceInput(rid, prompt, 0, table, adapter_slot=slot)
                                  for rid, prompt, slot, table in seqs[chunk:chunk + per_chunk]]).tokens
    produced = len(tokens)
    for step in range(1, new_tokens):
        last = {t.request_id: t.token_id for t in tokens}
        tokens = engine.forward([SequenceInput(rid, [last[rid]], prompt_len + step - 1, table, adapter_slot=slot)
                                 for rid, _, slot, table in seqs]).tokens
        produced += len(tokens)
    return produced


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--per-adapter", type=int, default=16)
    parser.add_argument("--smoke", action="store_true", help="tiny model on CPU: checks the script, not a figure")
    args = parser.parse_args()
    config, device = (TINY, "cpu") if args.smoke else (LLAMA31_8B, "cuda")
    root = Path(tempfile.mkdtemp())
    write_model_config(root / "model", config)
    adapter = write_random_adapter(root / "adapter", load_model_config(root / "model"), rank=256, alpha=512,
                                   modules=TARGET_MODULES)
    peft = peft_throughput(config, adapter, args.prompt_len, args.new_tokens, device)
    print("peft", peft, flush=True)
    ours = loraserve_throughput(root / "model", adapter, args.prompt_len, args.new_tokens, args.per_adapter,
                                device)
    print("loraserve", ours, flush=True)
    result = {**run_record("peft_peer"), "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "adapter": "rank 256, all modules, bf16",
              "peft": peft, "loraserve": ours, "ratio": ours["tokens_per_s"] / peft["tokens_per_s"]}
    print(json.dumps({"ratio": result["ratio"]}))
    if args.out:
        write_result(args.out, result)


if __name__ == "__main__":
    main()
