"""The readers of `worker.kernels.elementwise` with a folded LoRA expand (`FoldedDeltas`; imported
only on CUDA machines or under TRITON_INTERPRET=1).

Each program takes several rows of one block of the step's LoRA block table (rows of one slot)
instead of one row, so that the expand `shrunk @ B^T` is a `tl.dot` of those rows against their
slot's B, read once for them: row by row a 400-token prompt would read its B 400 times. The
arithmetic after the delta is the per-row kernels' own (`_elementwise_triton`), on [rows, columns]
tiles, rounding in the same places.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from worker.kernels import _elementwise_triton as row_kernels
from worker.kernels._elementwise_triton import ACTIVATIONS, _act_times, _check, _check_norm_weight, _rope_head
from worker.kernels._triton_common import dot, lora_block, pick
from worker.kernels.staged_deltas import ACT_TILES, NORM_TILES, ROPE_TILES, FoldedDeltas, FoldedTiles


@triton.jit
def _block_rows(blocks_ptr, BM: tl.constexpr):
    """The program's rows: the `BM`-row part program_id(1) of block program_id(0), as (slot, rank, its
    rows [BM] int64, which of them exist, how many do)."""
    slot, start, end, rank = lora_block(blocks_ptr, tl.program_id(0))
    first = start + tl.program_id(1) * BM
    offsets = tl.arange(0, BM)
    return slot, rank, (first + offsets).to(tl.int64), offsets < end - first, end - first


@triton.jit
def _plus_folded(y, h_ptr, stride_h, h_column, b_ptr, stride_bs, stride_br, slot, rank, rows, row_ok, cols, col_ok,
                 RANK: tl.constexpr, IEEE: tl.constexpr):
    """y [rows, cols] plus its rows' LoRA delta, the delta rounded to the model dtype and then the sum,
    as the unfused `out += delta`; rows of rank 0 (no adapter) are left as they are."""
    if rank > 0:
        ranks = tl.arange(0, RANK)
        h = tl.load(h_ptr + rows[:, None] * stride_h + h_column + slot * RANK + ranks[None, :],
                    mask=row_ok[:, None], other=0.0)
        b = tl.load(b_ptr + slot * stride_bs + ranks[:, None] * stride_br + cols[None, :], mask=col_ok[None, :],
                    other=0.0)
        delta = dot(h, b, IEEE)
        y = (y.to(tl.float32) + delta.to(y.dtype).to(tl.float32)).to(y.dtype)
    return y


@triton.jit
def residual_sum_tile(hidden_ptr, out_ptr, h_ptr, b_ptr, sum_ptr, size, stride_hidden, stride_o, stride_h, stride_bs,
                      stride_s, slot, rank, rows, row_ok, BN: tl.constexpr, RANK: tl.constexpr, IEEE: tl.constexpr):
    """hidden + (out + its LoRA delta) on the program's [rows, BN] tile (column tile program_id(2)),
    stored to sum_ptr and returned."""
    cols = tl.program_id(2) * BN + tl.arange(0, BN)
    col_ok = cols < size
    mask = row_ok[:, None] & col_ok[None, :]
    out = tl.load(out_ptr + rows[:, None] * stride_o + cols[None, :], mask=mask, other=0.0)
    out = _plus_folded(out, h_ptr, stride_h, 0, b_ptr, stride_bs, size, slot, rank, rows, row_ok, cols, col_ok,
                       RANK, IEEE)
    x = tl.load(hidden_ptr + rows[:, None] * stride_hidden + cols[None, :], mask=mask, other=0.0)
    x = (x.to(tl.float32) + out.to(tl.float32)).to(x.dtype)  # the residual add is in the model dtype
    tl.store(sum_ptr + rows[:, None] * stride_s + cols[None, :], x, mask=mask)
    return x


@triton.jit
def _add_expanded_kernel(hidden_ptr, out_ptr, h_ptr, b_ptr, blocks_ptr, sum_ptr, size, stride_hidden, stride_o,
                         stride_h, stride_bs, stride_s, BM: tl.constexpr, BN: tl.constexpr, RANK: tl.constexpr,
                         IEEE: tl.constexpr):
    slot, rank, rows, row_ok, count = _block_rows(blocks_ptr, BM)
    if count > 0:
        residual_sum_tile(hidden_ptr, out_ptr, h_ptr, b_ptr, sum_ptr, size, stride_hidden, stride_o, stride_h,
                          stride_bs, stride_s, slot, rank, rows, row_ok, BN, RANK, IEEE)


def add_rms_norm(hidden: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float,
                 lora_delta: FoldedDeltas, tiles: FoldedTiles = NORM_TILES) -> tuple[torch.Tensor, torch.Tensor]:
    """Two kernels: the residual sum with the expand, over [rows, columns] tiles of every block in
    parallel, then the row kernel's norm of it. One kernel would walk each block's rows' columns in
    turn for their sum of squares: a step's few blocks then kept a few SMs busy (a mixed step's
    norms +4 ms). The sum's extra read replaces the staged deltas' read, so the bytes are as many."""
    tokens, size = hidden.shape
    _check_norm_weight(hidden, weight)
    _check_folded(lora_delta, delta, [size])
    summed = torch.empty_like(hidden)
    (b_t,) = lora_delta.b_t
    _add_expanded_kernel[_grid(lora_delta, tiles, triton.cdiv(size, tiles.columns))](
        hidden, delta, lora_delta.shrunk, b_t, lora_delta.blocks, summed, size, hidden.stride(0), delta.stride(0),
        lora_delta.shrunk.stride(0), b_t.stride(0), summed.stride(0), BM=tiles.rows, BN=tiles.columns,
        RANK=lora_delta.rank, IEEE=hidden.dtype == torch.float32, num_warps=tiles.warps, enable_fp_fusion=False,
    )
    return row_kernels.add_rms_norm(summed, None, weight, eps)


@triton.jit
def _rope_cache_kernel(qkv_ptr, h_ptr, bq_ptr, bk_ptr, bv_ptr, blocks_ptr, cos_ptr, sin_ptr, q_ptr, keys_ptr,
                       values_ptr, index_ptr, q_norm_ptr, k_norm_ptr, eps, stride_x, stride_h, stride_c, stride_s,
                       stride_q, stride_kv, HEADS: tl.constexpr, KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                       BLOCK_HALF: tl.constexpr, QK_NORM: tl.constexpr, SLOTS: tl.constexpr, BM: tl.constexpr,
                       RANK: tl.constexpr, IEEE: tl.constexpr):
    slot, rank, rows, row_ok, count = _block_rows(blocks_ptr, BM)
    if count > 0:
        head = tl.program_id(2)  # q heads, then k heads, then v heads, as in qkv's columns
        half: tl.constexpr = HEAD_DIM // 2
        dims = tl.arange(0, BLOCK_HALF)
        ok = dims < half
        mask = row_ok[:, None] & ok[None, :]
        column = head * HEAD_DIM
        # The head's module (q, k or v): its B, its outputs (B's row stride) and its first column.
        module = (head >= HEADS).to(tl.int32) + (head >= HEADS + KV_HEADS).to(tl.int32)
        b_ptr = pick(module, bq_ptr, bk_ptr, bv_ptr)
        outputs = tl.where(module == 0, HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM)
        b_ptr += column - tl.where(module == 0, 0, tl.where(module == 1, HEADS, HEADS + KV_HEADS) * HEAD_DIM)
        x1 = tl.load(qkv_ptr + rows[:, None] * stride_x + column + dims[None, :], mask=mask, other=0.0)
        x2 = tl.load(qkv_ptr + rows[:, None] * stride_x + column + half + dims[None, :], mask=mask, other=0.0)
        x1 = _plus_folded(x1, h_ptr, stride_h, module * SLOTS * RANK, b_ptr, RANK * outputs, outputs, slot, rank,
                          rows, row_ok, dims, ok, RANK, IEEE)
        x2 = _plus_folded(x2, h_ptr, stride_h, module * SLOTS * RANK, b_ptr + half, RANK * outputs, outputs, slot,
                          rank, rows, row_ok, dims, ok, RANK, IEEE)
        cache_row = tl.load(index_ptr + rows, mask=row_ok, other=0) * stride_kv
        cos_rows, sin_rows = cos_ptr + rows[:, None] * stride_c, sin_ptr + rows[:, None] * stride_s
        per_row = tl.zeros((BM, 1), dtype=tl.int32)  # a norm weight's pointers, one row per token, as the masks
        if head < HEADS:
            _rope_head(x1, x2, cos_rows, sin_rows, q_ptr + rows[:, None] * stride_q + column, q_norm_ptr + per_row, eps,
                       dims[None, :], mask, HEAD_DIM, QK_NORM, 1)
        elif head < HEADS + KV_HEADS:
            _rope_head(x1, x2, cos_rows, sin_rows, keys_ptr + cache_row[:, None] + (head - HEADS) * HEAD_DIM,
                       k_norm_ptr + per_row, eps, dims[None, :], mask, HEAD_DIM, QK_NORM, 1)
        else:
            v_ptr = values_ptr + cache_row[:, None] + (head - HEADS - KV_HEADS) * HEAD_DIM
            tl.store(v_ptr + dims[None, :], x1, mask=mask)
            tl.store(v_ptr + half + dims[None, :], x2, mask=mask)


def rope_and_cache_kv(qkv: torch.Tensor, lora_delta: FoldedDeltas, heads: int, kv_heads: int, head_dim: int,
                      cos: torch.Tensor, sin: torch.Tensor, q_norm: torch.Tensor | None, k_norm: torch.Tensor | None,
                      eps: float, *, keys: torch.Tensor, values: torch.Tensor,
                      write_index: torch.Tensor, tiles: FoldedTiles = ROPE_TILES) -> torch.Tensor:
    tokens = qkv.shape[0]
    _check(qkv, cos)
    _check_folded(lora_delta, qkv, [heads * head_dim, kv_heads * head_dim, kv_heads * head_dim])
    qk_norm = q_norm is not None
    if qk_norm:
        _check_norm_weight(qkv, q_norm)
        _check_norm_weight(qkv, k_norm)
    q = torch.empty(tokens, heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    _rope_cache_kernel[_grid(lora_delta, tiles, heads + 2 * kv_heads)](
        qkv, lora_delta.shrunk, *lora_delta.b_t, lora_delta.blocks, cos, sin, q, keys, values, write_index,
        q_norm if qk_norm else qkv, k_norm if qk_norm else qkv, eps, qkv.stride(0), lora_delta.shrunk.stride(0),
        cos.stride(0), sin.stride(0), q.stride(0), keys.stride(0), HEADS=heads, KV_HEADS=kv_heads,
        HEAD_DIM=head_dim, BLOCK_HALF=triton.next_power_of_2(head_dim // 2), QK_NORM=qk_norm,
        SLOTS=lora_delta.slots, BM=tiles.rows, RANK=lora_delta.rank, IEEE=qkv.dtype == torch.float32,
        num_warps=tiles.warps, enable_fp_fusion=False,
    )
    return q


@triton.jit
def _act_mul_kernel(gate_up_ptr, h_ptr, b_gate_ptr, b_up_ptr, blocks_ptr, out_ptr, size, stride_g, stride_h,
                    stride_o, SLOTS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, RANK: tl.constexpr,
                    IEEE: tl.constexpr, ACTIVATION: tl.constexpr):
    slot, rank, rows, row_ok, count = _block_rows(blocks_ptr, BM)
    if count > 0:
        cols = tl.program_id(2) * BN + tl.arange(0, BN)
        col_ok = cols < size
        mask = row_ok[:, None] & col_ok[None, :]
        tile = gate_up_ptr + rows[:, None] * stride_g + cols[None, :]
        gate = _plus_folded(tl.load(tile, mask=mask, other=0.0), h_ptr, stride_h, 0, b_gate_ptr, RANK * size, size,
                            slot, rank, rows, row_ok, cols, col_ok, RANK, IEEE)
        up = _plus_folded(tl.load(tile + size, mask=mask, other=0.0), h_ptr, stride_h, SLOTS * RANK, b_up_ptr,
                          RANK * size, size, slot, rank, rows, row_ok, cols, col_ok, RANK, IEEE)
        tl.store(out_ptr + rows[:, None] * stride_o + cols[None, :], _act_times(gate, up, ACTIVATION), mask=mask)


def act_mul(gate_up: torch.Tensor, lora_delta: FoldedDeltas, activation: str = "silu",
            tiles: FoldedTiles = ACT_TILES) -> torch.Tensor:
    tokens, width = gate_up.shape
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}")
    size = width // 2
    _check_folded(lora_delta, gate_up, [size, size])
    out = torch.empty(tokens, size, dtype=gate_up.dtype, device=gate_up.device)
    _act_mul_kernel[_grid(lora_delta, tiles, triton.cdiv(size, tiles.columns))](
        gate_up, lora_delta.shrunk, *lora_delta.b_t, lora_delta.blocks, out, size, gate_up.stride(0),
        lora_delta.shrunk.stride(0), out.stride(0), SLOTS=lora_delta.slots, BM=tiles.rows, BN=tiles.columns,
        RANK=lora_delta.rank, IEEE=gate_up.dtype == torch.float32, ACTIVATION=activation, num_warps=tiles.warps,
        enable_fp_fusion=False,
    )
    return out


def _grid(lora_delta: FoldedDeltas, tiles: FoldedTiles, column_tiles: int) -> tuple[int, int, int]:
    """(blocks, parts of a block, column tiles of a part): parts past a block's rows exit at once."""
    return lora_delta.blocks.shape[0], triton.cdiv(lora_delta.block_m, tiles.rows), column_tiles


def _check_folded(lora_delta: FoldedDeltas, out: torch.Tensor, module_outputs: list[int]) -> None:
    """The folded operands fit the output they are added to: one contiguous [slots, rank, outputs] B^T
    per module of the output's columns, shrunk columns for each, and a power-of-two rank (`tl.dot`)."""
    if out.stride(-1) != 1 or lora_delta.shrunk.stride(-1) != 1:
        raise ValueError("the folded readers need a unit stride in the last dimension")
    shapes = [tuple(b_t.shape) for b_t in lora_delta.b_t]
    slots, rank = lora_delta.slots, lora_delta.rank
    if shapes != [(slots, rank, n) for n in module_outputs] or not all(b.is_contiguous() for b in lora_delta.b_t):
        raise ValueError(f"folded LoRA needs contiguous B^T of shapes {[(slots, rank, n) for n in module_outputs]}, "
                         f"got {shapes}")
    if lora_delta.shrunk.shape != (out.shape[0], len(module_outputs) * slots * rank):
        raise ValueError(f"folded LoRA needs shrunk columns [{out.shape[0]}, {len(module_outputs) * slots * rank}], "
                         f"got {list(lora_delta.shrunk.shape)}")
    if rank < 16 or rank & (rank - 1):
        raise ValueError(f"folded LoRA needs a power-of-two rank of at least 16 (tl.dot), got {rank}")
    for operand in (lora_delta.shrunk, *lora_delta.b_t):
        _check(out, operand)
