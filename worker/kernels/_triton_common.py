"""Triton helpers shared by the kernels (imported only on CUDA machines)."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def dot(a, b, IEEE: tl.constexpr):
    """tl.dot; float32 inputs use exact IEEE products instead of TF32."""
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def lora_block(blocks_ptr, index):
    """Row `index` of a multi-LoRA block table: (slot, start, end, rank)."""
    row = blocks_ptr + index * 4
    return tl.load(row), tl.load(row + 1), tl.load(row + 2), tl.load(row + 3)


@triton.jit
def store_rounded(out_tile, acc, mask):
    # Rounded once to the output's dtype, like the unfused product (x @ W.T is a tensor of that dtype).
    tl.store(out_tile, acc.to(out_tile.dtype.element_ty), mask=mask)


@triton.jit
def reduce_splits(acc, partial_tile, stride_ps, counters_ptr, split, out_tile, mask, SPLITS: tl.constexpr):
    """Split-K without a second launch: every split stores its partial sum; the last of a
    tile's splits to finish (one counter per tile, acq_rel atomics) adds them in split order,
    so the result does not depend on scheduling, and resets the counter for the next launch."""
    tl.store(partial_tile + split * stride_ps, acc, mask=mask)
    tile = (tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)) * (tl.num_programs(2) // SPLITS) \
        + tl.program_id(2) // SPLITS
    if tl.atomic_add(counters_ptr + tile, 1) == SPLITS - 1:
        total = tl.zeros(acc.shape, dtype=tl.float32)
        for other in range(0, SPLITS):
            total += tl.load(partial_tile + other * stride_ps, mask=mask, other=0.0, cache_modifier=".cg")
        store_rounded(out_tile, total, mask)
        tl.store(counters_ptr + tile, 0)
