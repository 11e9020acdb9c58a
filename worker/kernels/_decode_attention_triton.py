"""Triton kernel of `worker.kernels.decode_attention` (imported only on CUDA machines)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from worker.kernels._triton_common import dot
from worker.kernels.lora_blocks import ATTENTION_BLOCK_M


@triton.jit
def _decode_kernel(q_ptr, k_ptr, v_ptr, out_ptr, page_table_ptr, seq_lens_ptr, scale, window,
                   stride_qb, stride_qh, stride_kt, stride_kh, stride_ob, stride_oh, stride_pb,
                   PAGE_SIZE: tl.constexpr, GROUP: tl.constexpr, BLOCK_G: tl.constexpr,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    seq_len = tl.load(seq_lens_ptr + seq)
    group = tl.arange(0, BLOCK_G)
    dims = tl.arange(0, BLOCK_D)
    heads = kv_head * GROUP + group
    head_ok = group < GROUP
    dim_ok = dims < HEAD_DIM
    q = tl.load(q_ptr + seq * stride_qb + heads[:, None] * stride_qh + dims[None, :],
                mask=head_ok[:, None] & dim_ok[None, :], other=0.0)
    first = tl.where(window > 0, tl.maximum(seq_len - window, 0), 0)
    m_i = tl.full((BLOCK_G,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_G,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_G, BLOCK_D), dtype=tl.float32)
    for block_start in range((first // BLOCK_N) * BLOCK_N, seq_len, BLOCK_N):
        positions = block_start + tl.arange(0, BLOCK_N)
        visible = (positions < seq_len) & (positions >= first)
        page = tl.load(page_table_ptr + seq * stride_pb + positions // PAGE_SIZE, mask=visible, other=0)
        rows = page.to(tl.int64) * PAGE_SIZE + positions % PAGE_SIZE
        kv_offsets = rows[:, None] * stride_kt + kv_head * stride_kh + dims[None, :]
        kv_mask = visible[:, None] & dim_ok[None, :]
        k = tl.load(k_ptr + kv_offsets, mask=kv_mask, other=0.0)
        scores = dot(q, tl.trans(k), IEEE) * scale
        scores = tl.where(visible[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + kv_offsets, mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + dot(p.to(v.dtype), v, IEEE)
        m_i = m_new
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(out_ptr + seq * stride_ob + heads[:, None] * stride_oh + dims[None, :],
             out.to(out_ptr.dtype.element_ty), mask=head_ok[:, None] & dim_ok[None, :])


def decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, page_table: torch.Tensor,
                     seq_lens: torch.Tensor, page_size: int, scale: float, window: int) -> torch.Tensor:
    batch, heads, head_dim = q.shape
    kv_heads = keys.shape[1]
    if keys.stride(-1) != 1 or q.stride(-1) != 1 or page_table.stride(-1) != 1:
        raise ValueError("decode attention needs a unit stride in the last dimension")
    out = torch.empty_like(q)
    group = heads // kv_heads
    _decode_kernel[(batch, kv_heads)](
        q, keys, values, out, page_table, seq_lens, scale, window,
        q.stride(0), q.stride(1), keys.stride(0), keys.stride(1), out.stride(0), out.stride(1),
        page_table.stride(0),
        PAGE_SIZE=page_size, GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=head_dim, BLOCK_D=max(16, triton.next_power_of_2(head_dim)), BLOCK_N=64,
        IEEE=q.dtype == torch.float32,
    )
    return out


@triton.jit
def _ragged_kernel(q_ptr, k_ptr, v_ptr, out_ptr, page_table_ptr, positions_ptr, blocks_ptr, scale, window,
                   stride_qt, stride_qh, stride_kt, stride_kh, stride_ot, stride_oh, stride_pb,
                   PAGE_SIZE: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr):
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
            scores = tl.where(visible, dot(q, tl.trans(k), IEEE) * scale, float("-inf"))
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
                     window: int) -> torch.Tensor:
    tokens, heads, head_dim = q.shape
    if keys.stride(-1) != 1 or q.stride(-1) != 1 or page_table.stride(-1) != 1:
        raise ValueError("ragged attention needs a unit stride in the last dimension")
    out = torch.zeros_like(q)
    _ragged_kernel[(blocks.shape[0], heads)](
        q, keys, values, out, page_table, positions, blocks, scale, window,
        q.stride(0), q.stride(1), keys.stride(0), keys.stride(1), out.stride(0), out.stride(1),
        page_table.stride(0),
        PAGE_SIZE=page_size, GROUP=heads // keys.shape[1], HEAD_DIM=head_dim,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)), BLOCK_M=ATTENTION_BLOCK_M, BLOCK_N=64,
        IEEE=q.dtype == torch.float32,
    )
    return out
