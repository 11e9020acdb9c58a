"""Triton kernel of `worker.kernels.skinny_gemm` (imported only on CUDA machines)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from worker.kernels._triton_common import dot, reduce_splits, store_rounded
from worker.kernels.skinny_gemm import MAX_TOKENS, GemmScratch, GemmTiles


@triton.jit
def _skinny_kernel(x_ptr, w_ptr, out_ptr, partials_ptr, counters_ptr, tokens, in_features, out_features,
                   k_per_split, stride_xt, stride_wn, stride_ot, stride_ps, stride_pt, SPLITS: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr):
    split = tl.program_id(2)
    rows = tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < tokens
    col_ok = cols < out_features
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    k_begin = split * k_per_split
    for k0 in range(k_begin, tl.minimum(k_begin + k_per_split, in_features), BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < in_features
        w = tl.load(w_ptr + cols[:, None] * stride_wn + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        x = tl.load(x_ptr + rows[:, None] * stride_xt + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        acc += dot(w, tl.trans(x), IEEE)
    mask = col_ok[:, None] & row_ok[None, :]
    out_tile = out_ptr + rows[None, :] * stride_ot + cols[:, None]
    if SPLITS == 1:
        store_rounded(out_tile, acc, mask)
    else:
        reduce_splits(acc, partials_ptr + rows[None, :] * stride_pt + cols[:, None], stride_ps, counters_ptr, split,
                      out_tile, mask, SPLITS)


def skinny_matmul(x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor, scratch: GemmScratch,
                  tiles: GemmTiles) -> None:
    if x.stride(-1) != 1 or weight.stride(-1) != 1 or out.stride(-1) != 1:
        raise ValueError("the skinny GEMM needs a unit stride in the last dimension")
    if tiles.k_per_split % tiles.k:
        raise ValueError("a split must be a whole number of K steps")
    out_features, in_features = weight.shape
    splits = tiles.splits(in_features)
    grid = (1, triton.cdiv(out_features, tiles.n), splits)
    _skinny_kernel[grid](x, weight, out, scratch.partials, scratch.counters, x.shape[0], in_features, out_features,
                         tiles.k_per_split, x.stride(0), weight.stride(0), out.stride(0), scratch.partials.stride(0),
                         scratch.partials.stride(1), SPLITS=splits, BLOCK_M=MAX_TOKENS, BLOCK_N=tiles.n,
                         BLOCK_K=tiles.k, IEEE=x.dtype == torch.float32, num_warps=tiles.warps,
                         num_stages=tiles.stages)
