"""Triton kernels of `worker.kernels.multi_lora` (imported only on CUDA machines)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from worker.kernels._triton_common import dot, lora_block, pick
from worker.kernels.lora_launch import MAX_GROUP, ExpandTiles, LoraScratch, ShrinkTiles, fit_shared_memory


@triton.jit
def _shrink_kernel(x_ptr, a0_ptr, a1_ptr, a2_ptr, shrunk_ptr, partials_ptr, counters_ptr, blocks_ptr,
                   in_features, max_rank, k_per_split, stride_xt, stride_as, stride_ar, stride_st, stride_ps,
                   stride_pt, SPLITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
                   BLOCK_K: tl.constexpr, IEEE: tl.constexpr):
    slot, start, end, rank = lora_block(blocks_ptr, tl.program_id(0))
    module = tl.program_id(2) // SPLITS
    split = tl.program_id(2) % SPLITS
    if (start < end) & (tl.program_id(1) * BLOCK_R < rank):
        rows = start + tl.arange(0, BLOCK_M)
        ranks = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
        mask = (rows < end)[:, None] & (ranks < rank)[None, :]
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        a_base = pick(module, a0_ptr, a1_ptr, a2_ptr) + slot * stride_as
        k_begin = split * k_per_split
        for k0 in range(k_begin, tl.minimum(k_begin + k_per_split, in_features), BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            col_ok = cols < in_features
            x = tl.load(x_ptr + rows[:, None] * stride_xt + cols[None, :],
                        mask=(rows < end)[:, None] & col_ok[None, :], other=0.0)
            a = tl.load(a_base + ranks[:, None] * stride_ar + cols[None, :],
                        mask=(ranks < rank)[:, None] & col_ok[None, :], other=0.0)
            acc += dot(x, tl.trans(a), IEEE)
        columns = module * max_rank + ranks[None, :]
        shrunk_tile = shrunk_ptr + rows[:, None] * stride_st + columns
        if SPLITS == 1:
            _store_rounded(shrunk_tile, acc, mask)
        else:
            _reduce_splits(acc, partials_ptr + rows[:, None] * stride_pt + columns, stride_ps, counters_ptr, split,
                           shrunk_tile, mask, SPLITS)


@triton.jit
def _store_rounded(shrunk_tile, acc, mask):
    # Rounded to the weights' dtype like the unfused product (x @ A.T is a tensor of that dtype).
    tl.store(shrunk_tile, acc.to(shrunk_tile.dtype.element_ty), mask=mask)


@triton.jit
def _reduce_splits(acc, partial_tile, stride_ps, counters_ptr, split, shrunk_tile, mask, SPLITS: tl.constexpr):
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
        _store_rounded(shrunk_tile, total, mask)
        tl.store(counters_ptr + tile, 0)


@triton.jit
def _expand_kernel(shrunk_ptr, b0_ptr, b1_ptr, b2_ptr, out0_ptr, out1_ptr, out2_ptr, blocks_ptr,
                   out0_features, out1_features, out2_features, tiles0, tiles1, max_rank, stride_st, stride_ot,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, IEEE: tl.constexpr,
                   ACCUMULATE: tl.constexpr):
    slot, start, end, rank = lora_block(blocks_ptr, tl.program_id(0))
    # A base-model block has no delta: adding its zeros changes nothing, and a stored delta's
    # reader skips its rows (`worker.kernels.elementwise.StagedDeltas`).
    if (start < end) & (rank > 0):
        # Output tiles are numbered across the group: module 0's, then module 1's, then 2's.
        tile = tl.program_id(1)
        module = (tile >= tiles0).to(tl.int32) + (tile >= tiles0 + tiles1).to(tl.int32)
        tile -= tl.where(module > 0, tiles0, 0) + tl.where(module > 1, tiles1, 0)
        out_features = pick(module, out0_features, out1_features, out2_features)
        rows = start + tl.arange(0, BLOCK_M)
        cols = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < end
        col_ok = cols < out_features
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        b_base = pick(module, b0_ptr, b1_ptr, b2_ptr) + slot * max_rank * out_features  # [slots, R, out]
        for r0 in range(0, rank, BLOCK_R):
            ranks = r0 + tl.arange(0, BLOCK_R)
            rank_ok = ranks < rank
            s = tl.load(shrunk_ptr + rows[:, None] * stride_st + module * max_rank + ranks[None, :],
                        mask=row_ok[:, None] & rank_ok[None, :], other=0.0)
            b = tl.load(b_base + ranks[:, None] * out_features + cols[None, :],
                        mask=rank_ok[:, None] & col_ok[None, :], other=0.0)
            acc += dot(s, b, IEEE)
        out_tile = pick(module, out0_ptr, out1_ptr, out2_ptr) + rows[:, None] * stride_ot + cols[None, :]
        mask = row_ok[:, None] & col_ok[None, :]
        if ACCUMULATE:
            acc += tl.load(out_tile, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_tile, acc.to(out_tile.dtype.element_ty), mask=mask)


def _padded(items: Sequence, filler) -> list:
    """A group padded to MAX_GROUP entries (the kernels take three of everything)."""
    return [*items, *[filler] * (MAX_GROUP - len(items))]


def shrink(x: torch.Tensor, a: Sequence[torch.Tensor], blocks: torch.Tensor, scratch: LoraScratch,
           tiles: ShrinkTiles) -> None:
    _check_unit_stride(x, scratch.shrunk, *a)
    if any(w.shape != a[0].shape or w.stride() != a[0].stride() for w in a):
        raise ValueError("modules of a LoRA group need A buffers of one shape")
    tiles = fit_shared_memory(tiles, x.element_size())
    if tiles.k_per_split % tiles.k:
        raise ValueError("a shrink split must be a whole number of K steps")
    max_rank, in_features = a[0].shape[1], x.shape[1]
    splits = tiles.splits(in_features)
    grid = (blocks.shape[0], triton.cdiv(max_rank, tiles.rank), len(a) * splits)
    if splits > 1 and (scratch.counters.numel() < grid[0] * grid[1] * len(a) or scratch.partials.shape[0] < splits):
        raise ValueError("the LoRA scratch is too small for this batch's split-K shrink")
    _shrink_kernel[grid](x, *_padded(a, a[0]), scratch.shrunk, scratch.partials, scratch.counters, blocks,
                         in_features, max_rank, tiles.k_per_split or in_features, x.stride(0), a[0].stride(0),
                         a[0].stride(1), scratch.shrunk.stride(0), scratch.partials.stride(0),
                         scratch.partials.stride(1), SPLITS=splits, BLOCK_M=tiles.tokens, BLOCK_R=tiles.rank,
                         BLOCK_K=tiles.k, IEEE=x.dtype == torch.float32, num_warps=tiles.warps,
                         num_stages=tiles.stages)


def expand(shrunk: torch.Tensor, b_t: Sequence[torch.Tensor], blocks: torch.Tensor,
           outs: Sequence[torch.Tensor], tiles: ExpandTiles, accumulate: bool = True) -> None:
    _check_unit_stride(shrunk, *b_t, *outs)
    if any(not b.is_contiguous() for b in b_t) or any(o.stride(0) != outs[0].stride(0) for o in outs):
        raise ValueError("expand needs contiguous B buffers and outputs of one row stride")
    max_rank = b_t[0].shape[1]
    column_tiles = [triton.cdiv(out.shape[1], tiles.n) for out in outs]
    grid = (blocks.shape[0], sum(column_tiles))
    _expand_kernel[grid](shrunk, *_padded(b_t, b_t[0]), *_padded(outs, outs[0]), blocks,
                         *_padded([out.shape[1] for out in outs], 0), *_padded(column_tiles, 0)[:2], max_rank,
                         shrunk.stride(0), outs[0].stride(0),
                         BLOCK_M=tiles.tokens, BLOCK_N=tiles.n, BLOCK_R=tiles.rank,
                         IEEE=outs[0].dtype == torch.float32, ACCUMULATE=accumulate, num_warps=tiles.warps,
                         num_stages=tiles.stages)


def _check_unit_stride(*tensors: torch.Tensor) -> None:
    if any(tensor.stride(-1) != 1 for tensor in tensors):
        raise ValueError("multi-LoRA kernels need a unit stride in the last dimension")
