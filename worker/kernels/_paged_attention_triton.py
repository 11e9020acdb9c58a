"""Triton kernels of `worker.kernels.paged_attention` (imported only on CUDA machines)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from worker.kernels._triton_common import dot, tanh

BLOCK_N = 64  # keys per loop iteration: 4 pages of 16
# Launch shapes from `attention_bench.py --decode-sweep` on an H200 (results/attention-shapes-h200/):
# about 6 programs per SM (132 SMs), so the key loads of several programs overlap; a one-warp reducer.
# Against 1024 programs, 4 warps and a 4-warp reducer: 13.7 -> 11.4 us for 9 sequences in the
# 12-row bucket, and the seed's decode step of 9 over 8 adapters 7823 -> 7750 us.
TARGET_PROGRAMS = 768
REDUCE_WARPS = 1
MAX_SPLITS = 64  # the reducer loads a head's splits as one [splits, head_dim] tile


def num_splits(batch: int, kv_heads: int, max_keys: int, block_n: int = BLOCK_N,
               target_programs: int = TARGET_PROGRAMS) -> int:
    """Splits of each sequence's keys, from shapes only (fixed per captured graph); at most one per key block."""
    wanted = -(-target_programs // (batch * kv_heads))
    return max(1, min(wanted, MAX_SPLITS, -(-max_keys // block_n)))


def decode_warps(splits: int) -> int:
    """Measured: 2 warps win where keys are split 8 to 15 ways (the 8- and 12-row buckets at 64-page
    rows), 4 elsewhere (one sequence over 16 splits; 24 rows over 4)."""
    return 2 if 8 <= splits < 16 else 4


@triton.jit
def _scores(q, k, scale, softcap, SOFTCAP: tl.constexpr, IEEE: tl.constexpr):
    """Scaled q.k for a tile of queries [M, D] and keys [N, D]; soft-capped (Gemma 2) with SOFTCAP."""
    scores = dot(q, tl.trans(k), IEEE) * scale
    if SOFTCAP:
        scores = softcap * tanh(scores / softcap)
    return scores


@triton.jit
def _split_range(seq_len, window, split, NUM_SPLITS: tl.constexpr, BLOCK_N: tl.constexpr):
    """(first visible key, start, end) of one split: the key blocks over [first, seq_len) dealt out in order."""
    first = tl.where(window > 0, tl.maximum(seq_len - window, 0), 0)
    first_block = first // BLOCK_N
    blocks_per_split = tl.cdiv(tl.cdiv(seq_len, BLOCK_N) - first_block, NUM_SPLITS)
    start = (first_block + split * blocks_per_split) * BLOCK_N
    return first, start, tl.minimum(start + blocks_per_split * BLOCK_N, seq_len)


@triton.jit
def _decode_kernel(q_ptr, k_ptr, v_ptr, out_ptr, acc_ptr, stats_ptr, page_table_ptr, seq_lens_ptr, scale, window,
                   softcap, stride_qb, stride_qh, stride_kt, stride_kh, stride_ob, stride_oh, stride_pb,
                   PAGE_SIZE: tl.constexpr, GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr,
                   BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr, IEEE: tl.constexpr,
                   SOFTCAP: tl.constexpr):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq)
    first, start, end = _split_range(seq_len, window, split, NUM_SPLITS, BLOCK_N)
    group = tl.arange(0, BLOCK_G)
    dims = tl.arange(0, BLOCK_D)
    heads = kv_head * GROUP + group
    head_ok = group < GROUP
    dim_ok = dims < HEAD_DIM
    q = tl.load(q_ptr + seq * stride_qb + heads[:, None] * stride_qh + dims[None, :],
                mask=head_ok[:, None] & dim_ok[None, :], other=0.0)
    m_i = tl.full((BLOCK_G,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_G,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_G, BLOCK_D), dtype=tl.float32)
    # Each block of [start, end) holds a visible key (blocks start at first's block), so m_new stays finite.
    for block_start in range(start, end, BLOCK_N):
        positions = block_start + tl.arange(0, BLOCK_N)
        visible = (positions < end) & (positions >= first)
        page = tl.load(page_table_ptr + seq * stride_pb + positions // PAGE_SIZE, mask=visible, other=0)
        rows = page.to(tl.int64) * PAGE_SIZE + positions % PAGE_SIZE
        kv_offsets = rows[:, None] * stride_kt + kv_head * stride_kh + dims[None, :]
        kv_mask = visible[:, None] & dim_ok[None, :]
        k = tl.load(k_ptr + kv_offsets, mask=kv_mask, other=0.0)
        scores = tl.where(visible[None, :], _scores(q, k, scale, softcap, SOFTCAP, IEEE), float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + kv_offsets, mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + dot(p.to(v.dtype), v, IEEE)
        m_i = m_new
    if NUM_SPLITS == 1:
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(out_ptr + seq * stride_ob + heads[:, None] * stride_oh + dims[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=head_ok[:, None] & dim_ok[None, :])
    else:
        # An empty split (past seq_len) leaves (-inf, 0) and no acc: the reducer reads acc only where l > 0.
        rows = (seq * tl.num_programs(1) * GROUP + heads) * NUM_SPLITS + split
        tl.store(stats_ptr + rows * 2, m_i, mask=head_ok)
        tl.store(stats_ptr + rows * 2 + 1, l_i, mask=head_ok)
        tl.store(acc_ptr + rows[:, None] * HEAD_DIM + dims[None, :], acc,
                 mask=(head_ok & (l_i > 0))[:, None] & dim_ok[None, :])


@triton.jit
def _reduce_kernel(acc_ptr, stats_ptr, out_ptr, stride_ob, stride_oh, HEAD_DIM: tl.constexpr,
                   BLOCK_D: tl.constexpr, NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr):
    """out = sum_s e^(m_s - M) acc_s / sum_s e^(m_s - M) l_s over one (sequence, head)'s splits, in a fixed order."""
    seq = tl.program_id(0)
    head = tl.program_id(1)
    splits = tl.arange(0, BLOCK_S)
    dims = tl.arange(0, BLOCK_D)
    rows = (seq * tl.num_programs(1) + head) * NUM_SPLITS + splits
    split_ok = splits < NUM_SPLITS
    m = tl.load(stats_ptr + rows * 2, mask=split_ok, other=float("-inf"))
    l = tl.load(stats_ptr + rows * 2 + 1, mask=split_ok, other=0.0)
    m_max = tl.max(m, 0)
    weight = tl.exp(m - tl.where(m_max == float("-inf"), 0.0, m_max))  # 0 for empty splits; all 0 for padding
    total = tl.sum(weight * l, 0)
    acc = tl.load(acc_ptr + rows[:, None] * HEAD_DIM + dims[None, :],
                  mask=(l > 0)[:, None] & (dims < HEAD_DIM)[None, :], other=0.0)
    out = tl.sum(weight[:, None] * acc, 0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + seq * stride_ob + head * stride_oh + dims, out.to(out_ptr.dtype.element_ty),
             mask=dims < HEAD_DIM)


def decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, page_table: torch.Tensor,
                     seq_lens: torch.Tensor, page_size: int, scale: float, window: int, softcap: float = 0.0, *,
                     splits: int | None = None, block_n: int = BLOCK_N, warps: int | None = None,
                     reduce_warps: int = REDUCE_WARPS, target_programs: int = TARGET_PROGRAMS) -> torch.Tensor:
    """`splits` (default: `num_splits`), `block_n`, the warps and `target_programs` are for benchmarks;
    splits=1 is the one-pass kernel."""
    batch, heads, head_dim = q.shape
    kv_heads = keys.shape[1]
    if keys.stride(-1) != 1 or q.stride(-1) != 1 or page_table.stride(-1) != 1:
        raise ValueError("decode attention needs a unit stride in the last dimension")
    splits = splits or num_splits(batch, kv_heads, page_table.shape[1] * page_size, block_n, target_programs)
    out = torch.empty_like(q)
    if splits == 1:  # the one-pass kernel writes out itself and never reads acc or stats
        acc = stats = out
    else:  # under capture from the graph's private pool; the shape depends on shapes only, so replays fit
        acc = torch.empty(batch, heads, splits, head_dim, dtype=torch.float32, device=q.device)
        stats = torch.empty(batch, heads, splits, 2, dtype=torch.float32, device=q.device)
    group = heads // kv_heads
    block_d = max(16, triton.next_power_of_2(head_dim))
    _decode_kernel[(batch, kv_heads, splits)](
        q, keys, values, out, acc, stats, page_table, seq_lens, scale, window, float(softcap),
        q.stride(0), q.stride(1), keys.stride(0), keys.stride(1), out.stride(0), out.stride(1),
        page_table.stride(0),
        PAGE_SIZE=page_size, GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim,
        BLOCK_D=block_d, BLOCK_N=block_n, NUM_SPLITS=splits, IEEE=q.dtype == torch.float32,
        SOFTCAP=softcap > 0, num_warps=warps or decode_warps(splits),
    )
    if splits > 1:
        _reduce_kernel[(batch, heads)](acc, stats, out, out.stride(0), out.stride(1), HEAD_DIM=head_dim,
                                       BLOCK_D=block_d, NUM_SPLITS=splits, BLOCK_S=triton.next_power_of_2(splits),
                                       num_warps=reduce_warps)
    return out


@triton.jit
def _ragged_kernel(q_ptr, k_ptr, v_ptr, out_ptr, page_table_ptr, positions_ptr, blocks_ptr, scale, window, softcap,
                   stride_qt, stride_qh, stride_kt, stride_kh, stride_ot, stride_oh, stride_pb,
                   PAGE_SIZE: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr, SOFTCAP: tl.constexpr):
    row = blocks_ptr + tl.program_id(0) * 3
    seq = tl.load(row)
    start = tl.load(row + 1)
    end = tl.load(row + 2)
    head = tl.program_id(1)
    kv_head = head // GROUP
    if start < end:
        tokens = start + tl.arange(0, BLOCK_M)
        token_ok = tokens < end
        dims = tl.arange(0, BLOCK_D)
        dim_ok = dims < HEAD_DIM
        q = tl.load(q_ptr + tokens[:, None] * stride_qt + head * stride_qh + dims[None, :],
                    mask=token_ok[:, None] & dim_ok[None, :], other=0.0)
        q_pos = tl.load(positions_ptr + tokens, mask=token_ok, other=-1)
        last = tl.load(positions_ptr + end - 1)
        first = tl.where(window > 0, tl.maximum(tl.load(positions_ptr + start) - window + 1, 0), 0)
        m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
        l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
        acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        for block_start in range((first // BLOCK_N) * BLOCK_N, last + 1, BLOCK_N):
            key_pos = block_start + tl.arange(0, BLOCK_N)
            key_ok = key_pos <= last
            page = tl.load(page_table_ptr + seq * stride_pb + key_pos // PAGE_SIZE, mask=key_ok, other=0)
            rows = page.to(tl.int64) * PAGE_SIZE + key_pos % PAGE_SIZE
            kv_offsets = rows[:, None] * stride_kt + kv_head * stride_kh + dims[None, :]
            kv_mask = key_ok[:, None] & dim_ok[None, :]
            k = tl.load(k_ptr + kv_offsets, mask=kv_mask, other=0.0)
            visible = (key_pos[None, :] <= q_pos[:, None]) & key_ok[None, :]
            visible &= (window <= 0) | (key_pos[None, :] > q_pos[:, None] - window)
            scores = tl.where(visible, _scores(q, k, scale, softcap, SOFTCAP, IEEE), float("-inf"))
            m_new = tl.maximum(m_i, tl.max(scores, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that have seen no key yet
            alpha = tl.exp(m_i - m_safe)
            p = tl.exp(scores - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_ptr + kv_offsets, mask=kv_mask, other=0.0)
            acc = acc * alpha[:, None] + dot(p.to(v.dtype), v, IEEE)
            m_i = m_new
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(out_ptr + tokens[:, None] * stride_ot + head * stride_oh + dims[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=token_ok[:, None] & dim_ok[None, :])


def ragged_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, page_table: torch.Tensor,
                     blocks: torch.Tensor, positions: torch.Tensor, page_size: int, scale: float,
                     window: int, softcap: float = 0.0, *, block_m: int, block_n: int = BLOCK_N,
                     warps: int = 4) -> torch.Tensor:
    """`block_m`: at least the blocks' tokens; `block_n` and `warps` are for benchmarks."""
    tokens, heads, head_dim = q.shape
    if keys.stride(-1) != 1 or q.stride(-1) != 1 or page_table.stride(-1) != 1:
        raise ValueError("ragged attention needs a unit stride in the last dimension")
    out = torch.zeros_like(q)
    _ragged_kernel[(blocks.shape[0], heads)](
        q, keys, values, out, page_table, positions, blocks, scale, window, float(softcap),
        q.stride(0), q.stride(1), keys.stride(0), keys.stride(1), out.stride(0), out.stride(1),
        page_table.stride(0),
        PAGE_SIZE=page_size, GROUP=heads // keys.shape[1], HEAD_DIM=head_dim,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)), BLOCK_M=block_m, BLOCK_N=block_n,
        IEEE=q.dtype == torch.float32, SOFTCAP=softcap > 0, num_warps=warps,
    )
    return out
