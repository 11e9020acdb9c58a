"""A stand-in for a reader kernel with the LoRA expand folded in, to price that fold before the
readers are rebuilt (`benchmarks.fused_shrink_gemm`; imported only on CUDA machines or under
TRITON_INTERPRET=1).

The reader reads a module's output and writes it back; folded, it first adds `h @ B^T` for its
rows' slot, where h is the shrunk rows the base GEMM left in extra output columns (each slot's
`rank` columns side by side) and B is kept transposed per slot ([slots, rank, outputs]) so that a
tile's loads are coalesced. Rows come in the engine's multi-LoRA block tables
(`worker.kernels.lora_blocks`): a prompt's rows `BLOCK_M` at a time, each decode token alone.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from worker.batch import NO_ADAPTER
from worker.kernels._triton_common import lora_block
from worker.kernels.lora_blocks import lora_blocks

BLOCK_M, BLOCK_N = 16, 128


@triton.jit
def _reader_kernel(y_ptr, h_ptr, b_ptr, blocks_ptr, outputs, stride_y, stride_h, stride_bs, RANK: tl.constexpr,
                   RANK_STEP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, EXPAND: tl.constexpr):
    slot, start, end, _ = lora_block(blocks_ptr, tl.program_id(0))
    offsets = tl.arange(0, BM)
    rows = (start + offsets).to(tl.int64)
    row_ok = offsets < end - start
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    col_ok = cols < outputs
    tile = y_ptr + rows[:, None] * stride_y + cols[None, :]
    mask = row_ok[:, None] & col_ok[None, :]
    y = tl.load(tile, mask=mask, other=0.0)
    if EXPAND:
        delta = tl.zeros((BM, BN), dtype=tl.float32)
        for first in tl.static_range(0, RANK, RANK_STEP):
            ranks = first + tl.arange(0, RANK_STEP)
            h = tl.load(h_ptr + rows[:, None] * stride_h + slot * RANK + ranks[None, :], mask=row_ok[:, None],
                        other=0.0)
            b = tl.load(b_ptr + slot * stride_bs + ranks[:, None] * outputs + cols[None, :], mask=col_ok[None, :],
                        other=0.0)
            delta += tl.dot(h, b)
        y = (y.to(tl.float32) + delta.to(y.dtype).to(tl.float32)).to(y.dtype)
    tl.store(tile, y, mask=mask)


def row_blocks(decodes: int, prompt: int, slots: int, rank: int) -> torch.Tensor:
    """The adapted rows' block table: the decodes first, one row each over the slots in turn, then
    the prompt on slot 0 (rows after it are padding, in no block)."""
    token_slots = [row % slots for row in range(decodes)] + [0] * prompt + [NO_ADAPTER]
    table = lora_blocks(token_slots, [rank] * slots, block_m=BLOCK_M)
    return torch.from_numpy(table[table[:, 3] > 0])


def read_back(y: torch.Tensor, h: torch.Tensor, b: torch.Tensor, blocks: torch.Tensor, expand: bool) -> None:
    """The reader over `y` in place: `y[rows] += h[rows, slot's columns] @ b[slot]` where `expand`
    (`blocks`: a `row_blocks` table)."""
    slots, rank, outputs = b.shape
    if h.shape[1] < slots * rank or y.shape[1] != outputs:
        raise ValueError(f"h needs {slots * rank} columns and y {outputs}")
    grid = (blocks.shape[0], triton.cdiv(outputs, BLOCK_N))
    _reader_kernel[grid](y, h, b, blocks, outputs, y.stride(0), h.stride(0), b.stride(0), RANK=rank,
                         RANK_STEP=min(rank, 64), BM=BLOCK_M, BN=BLOCK_N, EXPAND=expand, num_warps=4)
