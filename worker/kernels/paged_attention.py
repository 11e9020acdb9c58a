"""Attention over the paged KV cache on fixed-size buffers: the decode step's kernel (one new
token per sequence) and the ragged kernel of mixed steps (prefill chunks beside decodes).

Decode. Shapes: q [B, heads, D]; keys/values one layer's cache [pages * page_size, kv_heads, D];
page_table [B, W] page ids (W * page_size >= every sequence's length); seq_lens [B], the
keys each query sees (its own position + 1; 0 for a padding row, whose output is 0).
With a sliding window w only keys at positions >= seq_len - w are seen. With softcap > 0
(Gemma 2's attention logit soft-capping) each score is `softcap * tanh(scale * q.k / softcap)`
before the softmax, as in HF's eager attention; 0 leaves the scores alone.

The Triton decode kernels are flash-decoding. The aligned key blocks covering [first, seq_len)
(first = seq_len - w with a window, else 0; BLOCK_N = 64 keys, four pages) are dealt out in
order to S splits of ceil(blocks / S) contiguous blocks. One program per (sequence, kv head,
split): the query heads of that kv head's GQA group attend together (one K/V read for the
group), walking the split's blocks through the page table with an online softmax, and write
float32 partials to scratch [B, heads, S, ...]: m_s = max score, l_s = sum_j e^(score_j - m_s),
acc_s = sum_j e^(score_j - m_s) v_j. A reduce kernel, one program per (sequence, head),
combines them in a fixed order: out = sum_s e^(m_s - M) acc_s / sum_s e^(m_s - M) l_s with
M = max_s m_s. A split past the sequence's keys leaves (m, l) = (-inf, 0) and weighs 0, so a
padding row gets 0.

S depends on shapes only (one per captured graph): about 768 programs over the grid (the
132 SMs of an H200, several times; `_paged_attention_triton.TARGET_PROGRAMS`), at most 64, at
most one split per key block of W * page_size; at S = 1 (B * kv_heads >= 768) one pass writes
out, no reduce. The loops are bounded by seq_lens read on the GPU, so one CUDA graph serves any
lengths up to W * page_size.

Ragged. q [T, heads, D] flat; each token has a page-table row and a position. The Triton
kernel takes a work list (`attention_blocks`): each sequence's tokens cut into blocks of up
to ATTENTION_BLOCK_M, one program per (block, query head).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

# Query tokens per ragged-attention program. 16 against 32 (`attention_bench.py --ragged-only`,
# results/attention-shapes-h200/): a 400-token prompt beside 8 decodes 67.2 -> 52.5 us a layer.
ATTENTION_BLOCK_M = 16


def reference_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float,
                   softcap: float) -> torch.Tensor:
    """F.scaled_dot_product_attention with GQA ([B, heads or kv_heads, L, D], a bool mask), which
    cannot soft-cap: with softcap > 0 the steps of HF's eager attention instead."""
    if softcap <= 0:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)  # as HF's repeat_kv
    scores = torch.tanh(torch.matmul(q, k.transpose(-1, -2)) * scale / softcap) * softcap
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(scores.softmax(-1, dtype=torch.float32).to(q.dtype), v)


def decode_attention_reference(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, page_table: torch.Tensor,
                               seq_lens: torch.Tensor, page_size: int, scale: float, window: int,
                               softcap: float = 0.0) -> torch.Tensor:
    """Plain torch: gathers [B, W * page_size] keys through the page table, masks, SDPA."""
    positions = torch.arange(page_table.shape[1] * page_size, device=q.device)
    kv_index = page_table[:, positions // page_size] * page_size + positions % page_size
    visible = positions[None, :] < seq_lens[:, None]
    if window > 0:
        visible &= positions[None, :] >= seq_lens[:, None] - window
    visible[:, 0] |= seq_lens == 0  # a padding row attends to something: no all-masked softmax
    k = keys[kv_index].transpose(1, 2)  # [B, KVH, L, D]
    v = values[kv_index].transpose(1, 2)
    out = reference_sdpa(q[:, :, None, :], k, v, visible[:, None, None, :], scale, softcap)[:, :, 0]
    return torch.where((seq_lens > 0)[:, None, None], out, torch.zeros((), dtype=out.dtype, device=out.device))


def decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, page_table: torch.Tensor,
                     seq_lens: torch.Tensor, page_size: int, scale: float, window: int,
                     softcap: float = 0.0) -> torch.Tensor:
    """The Triton kernel on CUDA tensors; same contract as the reference."""
    from worker.kernels import _paged_attention_triton as kernels

    return kernels.decode_attention(q, keys, values, page_table, seq_lens, page_size, scale, window, softcap)


def ragged_attention_reference(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, page_table: torch.Tensor,
                               token_rows: torch.Tensor, positions: torch.Tensor, page_size: int, scale: float,
                               window: int, softcap: float = 0.0) -> torch.Tensor:
    """Any mix of prefill chunks and decodes, flat: q [T, heads, D]; token t belongs to row
    token_rows[t] of page_table (-1: a padding token, output 0) and sits at positions[t]; it
    sees its sequence's keys at positions <= its own (and > its own - window)."""
    key_positions = torch.arange(page_table.shape[1] * page_size, device=q.device)
    rows = page_table[token_rows.clamp(min=0)]  # [T, W]
    kv_index = rows[:, key_positions // page_size] * page_size + key_positions % page_size
    visible = key_positions[None, :] <= positions[:, None]
    if window > 0:
        visible &= key_positions[None, :] > positions[:, None] - window
    real = token_rows >= 0
    visible[:, 0] |= ~real
    k = keys[kv_index].transpose(1, 2)  # [T, KVH, L, D]
    v = values[kv_index].transpose(1, 2)
    out = reference_sdpa(q[:, :, None, :], k, v, visible[:, None, None, :], scale, softcap)[:, :, 0]
    return torch.where(real[:, None, None], out, torch.zeros((), dtype=out.dtype, device=out.device))


def ragged_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, page_table: torch.Tensor,
                     blocks: torch.Tensor, positions: torch.Tensor, page_size: int, scale: float,
                     window: int, softcap: float = 0.0) -> torch.Tensor:
    """Triton: one program per (block of up to ATTENTION_BLOCK_M tokens of one sequence, query head);
    `blocks` rows are (page-table row, first token, end token); tokens in no block get 0."""
    from worker.kernels import _paged_attention_triton as kernels

    return kernels.ragged_attention(q, keys, values, page_table, blocks, positions, page_size, scale, window,
                                   softcap, block_m=ATTENTION_BLOCK_M)


def attention_blocks(token_counts: Sequence[int], num_rows: int, block_m: int = ATTENTION_BLOCK_M) -> np.ndarray:
    """[num_rows, 3] int64 (sequence row, start, end): each sequence's flat tokens (laid out in
    order) cut into blocks of at most `block_m`, padded with empty rows (the ragged attention
    kernel's work list)."""
    rows: list[tuple[int, int, int]] = []
    position = 0
    for row, count in enumerate(token_counts):
        rows.extend((row, start, min(start + block_m, position + count))
                    for start in range(position, position + count, block_m))
        position += count
    if len(rows) > num_rows:
        raise ValueError(f"{len(rows)} attention blocks do not fit a table of {num_rows}")
    table = np.zeros((num_rows, 3), dtype=np.int64)
    if rows:
        table[:len(rows)] = rows
    return table
