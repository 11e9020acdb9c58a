"""Candidate folded o/down readers: the residual sum with the expand and the RMSNorm in one kernel,
where `add_rms_norm` of `worker.kernels._folded_readers_triton` launches two (the column-parallel
sum, then the row norm). `benchmarks.folded_reader_sweep` times them all; the server keeps the fastest.

`sum_and_norm_rows`: a program takes a few rows of one block (1 to 16, `RowTiles`) and walks their
columns twice: the sum with the expand (outer products over the rank, as tl.dot needs 16 rows)
and its sum of squares, then the norm of the sum read back (from L2: just written). Few rows a
program keep a step's programs many (a 400-token prompt: 200 of 2 rows), and each reads its slot's
B once for its rows, from L2 after the first.

`SumAndNorm`: programs are `_add_expanded_kernel`'s (rows of one block x a column tile). Each also stores its rows'
sum of squares over its columns, then counts itself done for its part; the program that counts
last norms the part's rows, reading back the sums the others stored (from L2: just written). The
partial sums of squares are added in column order, so the result does not depend on which program
ends last. A part's count is reset by its last program, so the counts are zeroed once, not per call.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from worker.kernels._elementwise_triton import _check_norm_weight, _scale_by_weight
from worker.kernels._folded_readers_triton import _block_rows, _check_folded, _grid, residual_sum_tile
from worker.kernels.staged_deltas import NORM_TILES, FoldedDeltas, FoldedTiles


@dataclass(frozen=True)
class RowTiles:
    """`sum_and_norm_rows`' launch shape: `rows` of one block a program (a power of two), its
    columns walked `columns` at a time."""

    rows: int = 2
    columns: int = 2048
    warps: int = 8

    def __post_init__(self) -> None:
        if self.rows < 1 or self.rows & (self.rows - 1):
            raise ValueError(f"a program takes a power of two of rows, got {self.rows}")


@triton.jit
def _sum_norm_rows_kernel(hidden_ptr, out_ptr, h_ptr, b_ptr, blocks_ptr, weight_ptr, sum_ptr, normed_ptr, eps, size,
                          stride_hidden, stride_o, stride_h, stride_bs, stride_s, stride_n, BM: tl.constexpr,
                          BN: tl.constexpr, RANK: tl.constexpr):
    slot, rank, rows, row_ok, count = _block_rows(blocks_ptr, BM)
    if count > 0:
        squares = tl.zeros((BM,), dtype=tl.float32)
        for start in range(0, size, BN):
            cols = start + tl.arange(0, BN)
            col_ok = cols < size
            mask = row_ok[:, None] & col_ok[None, :]
            out = tl.load(out_ptr + rows[:, None] * stride_o + cols[None, :], mask=mask, other=0.0)
            if rank > 0:
                delta = tl.zeros((BM, BN), dtype=tl.float32)
                for r in tl.static_range(RANK):
                    h = tl.load(h_ptr + rows * stride_h + slot * RANK + r, mask=row_ok, other=0.0)
                    b = tl.load(b_ptr + slot * stride_bs + r * size + cols, mask=col_ok, other=0.0)
                    delta += h.to(tl.float32)[:, None] * b.to(tl.float32)[None, :]
                out = (out.to(tl.float32) + delta.to(out.dtype).to(tl.float32)).to(out.dtype)
            x = tl.load(hidden_ptr + rows[:, None] * stride_hidden + cols[None, :], mask=mask, other=0.0)
            x = (x.to(tl.float32) + out.to(tl.float32)).to(x.dtype)  # the residual add is in the model dtype
            tl.store(sum_ptr + rows[:, None] * stride_s + cols[None, :], x, mask=mask)
            x32 = x.to(tl.float32)
            squares += tl.sum(x32 * x32, 1)
        rstd = tl.math.rsqrt(squares / size + eps)
        tl.debug_barrier()  # the sums read back below may have been stored by other threads of the program
        for start in range(0, size, BN):
            cols = start + tl.arange(0, BN)
            col_ok = cols < size
            mask = row_ok[:, None] & col_ok[None, :]
            summed = tl.load(sum_ptr + rows[:, None] * stride_s + cols[None, :], mask=mask, other=0.0)
            weight = tl.load(weight_ptr + cols, mask=col_ok, other=0.0)
            normed = _scale_by_weight(summed.to(tl.float32), rstd[:, None], weight[None, :])
            tl.store(normed_ptr + rows[:, None] * stride_n + cols[None, :], normed.to(normed_ptr.dtype.element_ty),
                     mask=mask)


def sum_and_norm_rows(hidden: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float,
                      lora_delta: FoldedDeltas, tiles: RowTiles = RowTiles()) -> tuple[torch.Tensor, torch.Tensor]:
    size = hidden.shape[1]
    _check_norm_weight(hidden, weight)
    _check_folded(lora_delta, delta, [size])
    summed, normed = torch.empty_like(hidden), torch.empty_like(hidden)
    (b_t,) = lora_delta.b_t
    _sum_norm_rows_kernel[_grid(lora_delta, tiles, 1)[:2]](
        hidden, delta, lora_delta.shrunk, b_t, lora_delta.blocks, weight, summed, normed, eps, size, hidden.stride(0),
        delta.stride(0), lora_delta.shrunk.stride(0), b_t.stride(0), summed.stride(0), normed.stride(0),
        BM=tiles.rows, BN=tiles.columns, RANK=lora_delta.rank, num_warps=tiles.warps, enable_fp_fusion=False,
    )
    return summed, normed


@triton.jit
def _sum_and_norm_kernel(hidden_ptr, out_ptr, h_ptr, b_ptr, blocks_ptr, weight_ptr, sum_ptr, normed_ptr, squares_ptr,
                         counts_ptr, eps, size, stride_hidden, stride_o, stride_h, stride_bs, stride_s, stride_n,
                         TILES: tl.constexpr, TILES_POW2: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                         RANK: tl.constexpr, IEEE: tl.constexpr):
    slot, rank, rows, row_ok, count = _block_rows(blocks_ptr, BM)
    if count > 0:
        x32 = residual_sum_tile(hidden_ptr, out_ptr, h_ptr, b_ptr, sum_ptr, size, stride_hidden, stride_o, stride_h,
                                stride_bs, stride_s, slot, rank, rows, row_ok, BN, RANK, IEEE).to(tl.float32)
        tl.store(squares_ptr + rows * TILES + tl.program_id(2), tl.sum(x32 * x32, 1), mask=row_ok)
        part = tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
        if tl.atomic_add(counts_ptr + part, 1, sem="acq_rel") == TILES - 1:
            tl.store(counts_ptr + part, 0)
            tiles = tl.arange(0, TILES_POW2)
            squares = tl.load(squares_ptr + rows[:, None] * TILES + tiles[None, :],
                              mask=row_ok[:, None] & (tiles < TILES)[None, :], other=0.0, cache_modifier=".cg")
            rstd = tl.math.rsqrt(tl.sum(squares, 1) / size + eps)
            for column_tile in range(TILES):
                cols = column_tile * BN + tl.arange(0, BN)
                col_ok = cols < size
                mask = row_ok[:, None] & col_ok[None, :]
                summed = tl.load(sum_ptr + rows[:, None] * stride_s + cols[None, :], mask=mask, other=0.0,
                                 cache_modifier=".cg")
                weight = tl.load(weight_ptr + cols, mask=col_ok, other=0.0)
                normed = _scale_by_weight(summed.to(tl.float32), rstd[:, None], weight[None, :])
                tl.store(normed_ptr + rows[:, None] * stride_n + cols[None, :], normed.to(normed_ptr.dtype.element_ty),
                         mask=mask)


class SumAndNorm:
    """The one-kernel reader with its scratch (each row's sum of squares per column tile, the parts'
    counts), sized for `tokens` rows and a block table of `blocks` rows."""

    def __init__(self, tokens: int, size: int, blocks: int, block_m: int, tiles: FoldedTiles = NORM_TILES,
                 device: torch.device | str = "cuda") -> None:
        self.tiles = tiles
        self.column_tiles = triton.cdiv(size, tiles.columns)
        self.squares = torch.empty(tokens, self.column_tiles, dtype=torch.float32, device=device)
        self.counts = torch.zeros(blocks * triton.cdiv(block_m, tiles.rows), dtype=torch.int32, device=device)

    def __call__(self, hidden: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float,
                 lora_delta: FoldedDeltas) -> tuple[torch.Tensor, torch.Tensor]:
        size = hidden.shape[1]
        _check_norm_weight(hidden, weight)
        _check_folded(lora_delta, delta, [size])
        summed, normed = torch.empty_like(hidden), torch.empty_like(hidden)
        (b_t,) = lora_delta.b_t
        grid = _grid(lora_delta, self.tiles, self.column_tiles)
        if grid[0] * grid[1] > self.counts.numel() or hidden.shape[0] > self.squares.shape[0]:
            raise ValueError(f"the scratch holds {self.counts.numel()} parts and {self.squares.shape[0]} rows, "
                             f"not {grid[0] * grid[1]} and {hidden.shape[0]}")
        _sum_and_norm_kernel[grid](
            hidden, delta, lora_delta.shrunk, b_t, lora_delta.blocks, weight, summed, normed, self.squares,
            self.counts, eps, size, hidden.stride(0), delta.stride(0), lora_delta.shrunk.stride(0), b_t.stride(0),
            summed.stride(0), normed.stride(0), TILES=self.column_tiles,
            TILES_POW2=triton.next_power_of_2(self.column_tiles), BM=self.tiles.rows, BN=self.tiles.columns,
            RANK=lora_delta.rank, IEEE=hidden.dtype == torch.float32, num_warps=self.tiles.warps,
            enable_fp_fusion=False,
        )
        return summed, normed
