"""Decode attention on the 8B head shape (32 q heads, 8 kv heads, head_dim 128, bf16, page size 16):
microseconds per call, one-pass (splits=1, the kernel before split-K) against split-K; then the
ragged kernel of mixed steps on a 400-token prompt, 8 decodes at 512 keys, and both (a
512-token bucket's block table), by tokens per block, keys per block and warps.

    python -m benchmarks.attention_bench [--ragged-only]
    python -m benchmarks.attention_bench --decode-sweep   # the seed's decode step: shapes of the kernel
Each variant's calls are captured in a CUDA graph and replayed (as the engine runs them), so the
figures are GPU time without Python launch overhead. Prints a table; asserts nothing.
"""

from __future__ import annotations

import argparse
import itertools

import torch

from benchmarks.common import graph_microseconds
from worker.graph_step import decode_shape
from worker.kernels import _paged_attention_triton as kernels
from worker.kernels.lora_blocks import max_blocks
from worker.kernels.paged_attention import attention_blocks

HEADS, KV_HEADS, HEAD_DIM, PAGE_SIZE = 32, 8, 128, 16
CALLS_PER_GRAPH = 20


def timed(call) -> float:
    return graph_microseconds(call, calls_per_graph=CALLS_PER_GRAPH)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ragged-only", action="store_true", help="skip the decode kernel's table")
    parser.add_argument("--decode-sweep", action="store_true", help="only the decode kernel's launch shapes")
    args = parser.parse_args()
    if args.decode_sweep:
        decode_sweep()
        return
    if not args.ragged_only:
        decode_table()
    ragged()


def decode_inputs(rows: int, width: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Random queries, a cache of `rows * width` pages and a page table dealing them out at random."""
    num_pages = rows * width
    keys = torch.randn(num_pages * PAGE_SIZE, KV_HEADS, HEAD_DIM, device="cuda", generator=gen, dtype=torch.bfloat16)
    values = torch.randn_like(keys)
    q = torch.randn(rows, HEADS, HEAD_DIM, device="cuda", generator=gen, dtype=torch.bfloat16)
    page_table = torch.randperm(num_pages, device="cuda", generator=gen).view(rows, width)
    return q, keys, values, page_table


def decode_table() -> None:
    print(f"{'batch':>5} {'context':>7} {'splits':>6} {'one-pass us':>11} {'split-K us':>10} {'BLOCK_N 128 us':>14} "
          f"{'split-K GB/s':>12}")
    for context in (256, 1024, 4096):
        for batch in (1, 8, 64):
            width = decode_shape(batch, -(-(context + 1) // PAGE_SIZE)).pages  # the engine's width bucket
            gen = torch.Generator(device="cuda").manual_seed(0)
            q, keys, values, page_table = decode_inputs(batch, width, gen)
            lens = torch.full((batch,), context, device="cuda")
            args = (q, keys, values, page_table, lens, PAGE_SIZE, HEAD_DIM**-0.5, 0)
            one_pass = timed(lambda: kernels.decode_attention(*args, splits=1))
            split_k = timed(lambda: kernels.decode_attention(*args))
            wide = timed(lambda: kernels.decode_attention(*args, block_n=128))
            splits = kernels.num_splits(batch, KV_HEADS, width * PAGE_SIZE)
            kv_bytes = 2 * batch * context * KV_HEADS * HEAD_DIM * keys.element_size()
            print(f"{batch:>5} {context:>7} {splits:>6} {one_pass:>11.1f} {split_k:>10.1f} {wide:>14.1f} "
                  f"{kv_bytes / split_k / 1e3:>12.0f}")


def decode_sweep(width: int = 64) -> None:
    """Decode steps of 1 to 32 sequences of 100 to 900 keys (64-page rows, as in the seed's steps) in
    their batch buckets: the decode kernel's programs per launch, warps, and the reducer's warps."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    print(f"{'batch':>5} {'bucket':>6} {'target':>6} {'splits':>6} {'warps':>5} {'reduce_warps':>12} {'us':>7} "
          f"{'difference':>10}")
    for batch in (1, 3, 6, 9, 12, 18, 24):
        bucket = decode_shape(batch, 1).seqs
        q, keys, values, page_table = decode_inputs(bucket, width, gen)
        lens = torch.zeros(bucket, dtype=torch.long, device="cuda")
        lens[:batch] = torch.randint(100, 900, (batch,), device="cuda", generator=gen)
        args = (q, keys, values, page_table, lens, PAGE_SIZE, HEAD_DIM**-0.5, 0)
        expected = kernels.decode_attention(*args, splits=1)
        for target, warps, reduce_warps in itertools.product((256, 384, 512, 768, 1024), (2, 4), (1, 4)):
            shape = dict(target_programs=target, warps=warps, reduce_warps=reduce_warps)
            splits = kernels.num_splits(bucket, KV_HEADS, width * PAGE_SIZE, target_programs=target)
            difference = (kernels.decode_attention(*args, **shape).float() - expected.float()).abs().max().item()
            us = timed(lambda: kernels.decode_attention(*args, **shape))
            print(f"{batch:>5} {bucket:>6} {target:>6} {splits:>6} {warps:>5} {reduce_warps:>12} {us:>7.2f} "
                  f"{difference:>10.3g}", flush=True)


def ragged(prompt: int = 400, decodes: int = 8, context: int = 512, bucket: int = 512, max_seqs: int = 256) -> None:
    width = -(-max(prompt, context + 1) // PAGE_SIZE)
    gen = torch.Generator(device="cuda").manual_seed(0)
    num_pages = (decodes + 1) * width
    keys = torch.randn(num_pages * PAGE_SIZE, KV_HEADS, HEAD_DIM, device="cuda", generator=gen, dtype=torch.bfloat16)
    values = torch.randn_like(keys)
    page_table = torch.randperm(num_pages, device="cuda", generator=gen).view(decodes + 1, width)
    q = torch.randn(bucket, HEADS, HEAD_DIM, device="cuda", generator=gen, dtype=torch.bfloat16)
    cases = {"prompt": [prompt], "decodes": [1] * decodes, "both": [1] * decodes + [prompt]}
    print(f"{'case':>8} {'block_m':>7} {'block_n':>7} {'warps':>5} {'us':>7}")
    for case, counts in cases.items():
        positions = [context if count == 1 else i for count in counts for i in range(count)]
        position_tensor = torch.zeros(bucket, dtype=torch.long, device="cuda")
        position_tensor[:len(positions)] = torch.tensor(positions)
        table = page_table[:len(counts)] if case != "prompt" else page_table[decodes:]
        for block_m, block_n, warps in [(32, 64, 4), (16, 64, 4), (64, 64, 4), (32, 32, 4), (32, 64, 8), (64, 64, 8),
                                        (16, 32, 4), (64, 32, 4)]:
            blocks = torch.from_numpy(attention_blocks(counts, max_blocks(bucket, max_seqs, block_m), block_m)).cuda()
            us = timed(lambda: kernels.ragged_attention(q, keys, values, table, blocks, position_tensor, PAGE_SIZE,
                                                         HEAD_DIM**-0.5, 0, block_m=block_m, block_n=block_n,
                                                         warps=warps))
            print(f"{case:>8} {block_m:>7} {block_n:>7} {warps:>5} {us:>7.1f}", flush=True)


if __name__ == "__main__":
    main()
