"""Triton kernels of `worker.kernels.multi_lora` (imported only on CUDA machines)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from worker.kernels.lora_blocks import BLOCK_M


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _shrink_kernel(x_ptr, a_ptr, s_ptr, blocks_ptr, in_features,
                   stride_xt, stride_as, stride_ar, stride_st,
                   BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr):
    row = blocks_ptr + tl.program_id(0) * 4
    slot = tl.load(row)
    start = tl.load(row + 1)
    end = tl.load(row + 2)
    rank = tl.load(row + 3)
    if (start < end) & (tl.program_id(1) * BLOCK_R < rank):
        rows = start + tl.arange(0, BLOCK_M)
        ranks = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
        row_ok = rows < end
        rank_ok = ranks < rank
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        a_base = a_ptr + slot * stride_as
        for k0 in range(0, in_features, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            col_ok = cols < in_features
            x = tl.load(x_ptr + rows[:, None] * stride_xt + cols[None, :],
                        mask=row_ok[:, None] & col_ok[None, :], other=0.0)
            a = tl.load(a_base + ranks[:, None] * stride_ar + cols[None, :],
                        mask=rank_ok[:, None] & col_ok[None, :], other=0.0)
            acc += _dot(x, tl.trans(a), IEEE)
        tl.store(s_ptr + rows[:, None] * stride_st + ranks[None, :], acc.to(s_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & rank_ok[None, :])


@triton.jit
def _expand_kernel(s_ptr, b_ptr, out_ptr, blocks_ptr, out_features,
                   stride_st, stride_bs, stride_br, stride_ot,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, IEEE: tl.constexpr):
    row = blocks_ptr + tl.program_id(0) * 4
    slot = tl.load(row)
    start = tl.load(row + 1)
    end = tl.load(row + 2)
    rank = tl.load(row + 3)
    if start < end:
        rows = start + tl.arange(0, BLOCK_M)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < end
        col_ok = cols < out_features
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        b_base = b_ptr + slot * stride_bs
        for r0 in range(0, rank, BLOCK_R):
            ranks = r0 + tl.arange(0, BLOCK_R)
            rank_ok = ranks < rank
            s = tl.load(s_ptr + rows[:, None] * stride_st + ranks[None, :],
                        mask=row_ok[:, None] & rank_ok[None, :], other=0.0)
            b = tl.load(b_base + ranks[:, None] * stride_br + cols[None, :],
                        mask=rank_ok[:, None] & col_ok[None, :], other=0.0)
            acc += _dot(s, b, IEEE)
        out_tile = out_ptr + rows[:, None] * stride_ot + cols[None, :]
        mask = row_ok[:, None] & col_ok[None, :]
        previous = tl.load(out_tile, mask=mask, other=0.0)
        tl.store(out_tile, (previous.to(tl.float32) + acc).to(out_ptr.dtype.element_ty), mask=mask)


def _rank_tile(rank: int) -> int:
    return max(16, min(64, triton.next_power_of_2(rank)))


def shrink(x: torch.Tensor, a: torch.Tensor, blocks: torch.Tensor, max_rank: int, shrunk: torch.Tensor) -> None:
    _check_rows(x, a, shrunk)
    block_r = _rank_tile(max_rank)
    grid = (blocks.shape[0], triton.cdiv(max_rank, block_r))
    _shrink_kernel[grid](x, a, shrunk, blocks, x.shape[1],
                         x.stride(0), a.stride(0), a.stride(1), shrunk.stride(0),
                         BLOCK_M=BLOCK_M, BLOCK_R=block_r, BLOCK_K=128, IEEE=x.dtype == torch.float32)


def expand(shrunk: torch.Tensor, b_t: torch.Tensor, blocks: torch.Tensor, max_rank: int, out: torch.Tensor) -> None:
    _check_rows(out, b_t, shrunk)
    block_n = 128
    grid = (blocks.shape[0], triton.cdiv(out.shape[1], block_n))
    _expand_kernel[grid](shrunk, b_t, out, blocks, out.shape[1],
                         shrunk.stride(0), b_t.stride(0), b_t.stride(1), out.stride(0),
                         BLOCK_M=BLOCK_M, BLOCK_N=block_n, BLOCK_R=_rank_tile(max_rank),
                         IEEE=out.dtype == torch.float32)


def _check_rows(matrix: torch.Tensor, weights: torch.Tensor, shrunk: torch.Tensor) -> None:
    """Kernels index the innermost dimension with stride 1."""
    for tensor in (matrix, weights, shrunk):
        if tensor.stride(-1) != 1:
            raise ValueError("multi-LoRA kernels need a unit stride in the last dimension")
