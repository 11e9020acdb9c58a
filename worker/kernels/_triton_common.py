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
def tanh(x):
    """tanh from exp (float32 x): exp(2x) overflowing to inf or vanishing gives exactly +-1."""
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def pick(index, first, second, third):
    """The group member `index` selects (pointers or sizes of up to three modules)."""
    chosen = first
    if index == 1:
        chosen = second
    if index == 2:
        chosen = third
    return chosen
