"""Triton kernels of `worker.kernels.multi_lora` (imported only on CUDA machines)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from worker.kernels._triton_common import dot, lora_block
from worker.kernels.lora_blocks import BLOCK_M
from worker.kernels.multi_lora import K_PER_SPLIT


def num_splits(in_features: int) -> int:
    return triton.cdiv(in_features, K_PER_SPLIT)


@triton.jit
def _shrink_kernel(x_ptr, a_ptr, partial_ptr, blocks_ptr, in_features,
                   stride_xt, stride_as, stride_ar, stride_ps, stride_pt,
                   BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
                   K_PER_SPLIT: tl.constexpr, IEEE: tl.constexpr):
    slot, start, end, rank = lora_block(blocks_ptr, tl.program_id(0))
    if (start < end) & (tl.program_id(1) * BLOCK_R < rank):
        rows = start + tl.arange(0, BLOCK_M)
        ranks = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
        row_ok = rows < end
        rank_ok = ranks < rank
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        a_base = a_ptr + slot * stride_as
        k_begin = tl.program_id(2) * K_PER_SPLIT
        for k0 in range(k_begin, tl.minimum(k_begin + K_PER_SPLIT, in_features), BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            col_ok = cols < in_features
            x = tl.load(x_ptr + rows[:, None] * stride_xt + cols[None, :],
                        mask=row_ok[:, None] & col_ok[None, :], other=0.0)
            a = tl.load(a_base + ranks[:, None] * stride_ar + cols[None, :],
                        mask=rank_ok[:, None] & col_ok[None, :], other=0.0)
            acc += dot(x, tl.trans(a), IEEE)
        tl.store(partial_ptr + tl.program_id(2) * stride_ps + rows[:, None] * stride_pt + ranks[None, :], acc,
                 mask=row_ok[:, None] & rank_ok[None, :])


@triton.jit
def _sum_splits_kernel(partial_ptr, shrunk_ptr, blocks_ptr, splits, stride_ps, stride_pt, stride_st,
                       BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr):
    _, start, end, rank = lora_block(blocks_ptr, tl.program_id(0))
    if (start < end) & (tl.program_id(1) * BLOCK_R < rank):
        rows = start + tl.arange(0, BLOCK_M)
        ranks = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
        mask = (rows < end)[:, None] & (ranks < rank)[None, :]
        offsets = rows[:, None] * stride_pt + ranks[None, :]
        total = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for split in range(0, splits):
            total += tl.load(partial_ptr + split * stride_ps + offsets, mask=mask, other=0.0)
        # Rounded to the weights' dtype like the unfused product (x @ A.T is a tensor of that dtype).
        tl.store(shrunk_ptr + rows[:, None] * stride_st + ranks[None, :], total.to(shrunk_ptr.dtype.element_ty),
                 mask=mask)


@triton.jit
def _expand_kernel(shrunk_ptr, b_ptr, out_ptr, blocks_ptr, out_features,
                   stride_st, stride_bs, stride_br, stride_ot,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, IEEE: tl.constexpr):
    slot, start, end, rank = lora_block(blocks_ptr, tl.program_id(0))
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
            s = tl.load(shrunk_ptr + rows[:, None] * stride_st + ranks[None, :],
                        mask=row_ok[:, None] & rank_ok[None, :], other=0.0)
            b = tl.load(b_base + ranks[:, None] * stride_br + cols[None, :],
                        mask=rank_ok[:, None] & col_ok[None, :], other=0.0)
            acc += dot(s, b, IEEE)
        out_tile = out_ptr + rows[:, None] * stride_ot + cols[None, :]
        mask = row_ok[:, None] & col_ok[None, :]
        previous = tl.load(out_tile, mask=mask, other=0.0)
        tl.store(out_tile, (previous.to(tl.float32) + acc).to(out_ptr.dtype.element_ty), mask=mask)


def _rank_tile(rank: int) -> int:
    return max(16, min(64, triton.next_power_of_2(rank)))


def shrink(x: torch.Tensor, a: torch.Tensor, blocks: torch.Tensor, partials: torch.Tensor) -> None:
    _check_unit_stride(x, a, partials)
    max_rank = a.shape[1]
    block_r = _rank_tile(max_rank)
    grid = (blocks.shape[0], triton.cdiv(max_rank, block_r), num_splits(x.shape[1]))
    _shrink_kernel[grid](x, a, partials, blocks, x.shape[1],
                         x.stride(0), a.stride(0), a.stride(1), partials.stride(0), partials.stride(1),
                         BLOCK_M=BLOCK_M, BLOCK_R=block_r, BLOCK_K=128, K_PER_SPLIT=K_PER_SPLIT,
                         IEEE=x.dtype == torch.float32)


def sum_splits(partials: torch.Tensor, splits: int, blocks: torch.Tensor, shrunk: torch.Tensor) -> None:
    _check_unit_stride(partials, shrunk)
    block_r = _rank_tile(shrunk.shape[1])
    grid = (blocks.shape[0], triton.cdiv(shrunk.shape[1], block_r))
    _sum_splits_kernel[grid](partials, shrunk, blocks, splits, partials.stride(0), partials.stride(1),
                             shrunk.stride(0), BLOCK_M=BLOCK_M, BLOCK_R=block_r)


def expand(shrunk: torch.Tensor, b_t: torch.Tensor, blocks: torch.Tensor, out: torch.Tensor) -> None:
    _check_unit_stride(out, b_t, shrunk)
    block_n = 128
    grid = (blocks.shape[0], triton.cdiv(out.shape[1], block_n))
    _expand_kernel[grid](shrunk, b_t, out, blocks, out.shape[1],
                         shrunk.stride(0), b_t.stride(0), b_t.stride(1), out.stride(0),
                         BLOCK_M=BLOCK_M, BLOCK_N=block_n, BLOCK_R=_rank_tile(b_t.shape[1]),
                         IEEE=out.dtype == torch.float32)


def _check_unit_stride(*tensors: torch.Tensor) -> None:
    if any(tensor.stride(-1) != 1 for tensor in tensors):
        raise ValueError("multi-LoRA kernels need a unit stride in the last dimension")
