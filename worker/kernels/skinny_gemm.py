"""Base-model projections of a decode step, `out = x @ W.T` over a few tokens, in one launch.

At a decode step's few tokens a projection reads its whole weight for a handful of rows: it
is bound by HBM, and only a split of the reduction over `in` gives the GPU enough programs
to stream the weight at full bandwidth. cuBLAS then sums the splits in a second kernel
(`splitKreduce`, about 2.4 us, twice a layer on an 8B decode step's critical path, plus the
gap before it). This kernel sums them in the same launch, as the LoRA shrink does.

Shapes: x [T, in] with T <= MAX_TOKENS, weight [out, in] (nn.Linear's layout, unit stride in
`in`), out [T, out] in the weights' dtype. One program per (output tile of `n` columns, K
split of `k_per_split` columns): `acc[n, T] = W[n0:n1, k0:k1] @ x[:, k0:k1].T` in float32
(the weight tile is the MMA's wide side), stored as a float32 partial; the tile's last split
to finish adds the partials in split order (deterministic) and rounds once to the output
dtype, as cuBLAS does. The split counters return to zero, so a CUDA graph replays it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

MAX_TOKENS = 16  # the MMA's narrow side; larger batches read each weight tile for enough rows to use cuBLAS

Linear = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


@dataclass(frozen=True)
class GemmTiles:
    """The kernel's launch shape."""

    n: int  # output columns per program
    k: int  # columns of `in` per loop step
    k_per_split: int  # columns of `in` per program (a multiple of k)
    warps: int = 4
    stages: int = 4

    def splits(self, in_features: int) -> int:
        return -(-in_features // self.k_per_split)


GEMM_TILES = GemmTiles(n=64, k=128, k_per_split=1024)


@dataclass(frozen=True)
class GemmScratch:
    """Split partials and counters for projections up to `out_features` wide and `in_features` deep."""

    partials: torch.Tensor  # [splits, MAX_TOKENS, out] float32
    counters: torch.Tensor  # [output tiles] int32, zero between launches

    @classmethod
    def allocate(cls, out_features: int, in_features: int, device: torch.device,
                 tiles: GemmTiles = GEMM_TILES) -> GemmScratch:
        return cls(partials=torch.zeros(tiles.splits(in_features), MAX_TOKENS, out_features, device=device),
                   counters=torch.zeros(-(-out_features // tiles.n), dtype=torch.int32, device=device))

    def serves(self, x: torch.Tensor, weight: torch.Tensor, tiles: GemmTiles) -> bool:
        out_features, in_features = weight.shape
        return (x.shape[0] <= MAX_TOKENS and out_features <= self.partials.shape[2]
                and tiles.splits(in_features) <= self.partials.shape[0]
                and -(-out_features // tiles.n) <= self.counters.numel())


def skinny_linear(scratch: GemmScratch, tiles: GemmTiles = GEMM_TILES) -> Linear:
    """`F.linear` that sends bias-free projections of up to MAX_TOKENS CUDA rows to the kernel."""

    def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if bias is not None or not x.is_cuda or not scratch.serves(x, weight, tiles):
            return F.linear(x, weight, bias)
        from worker.kernels import _skinny_gemm_triton as kernels

        out = torch.empty(x.shape[0], weight.shape[0], dtype=weight.dtype, device=x.device)
        kernels.skinny_matmul(x, weight, out, scratch, tiles)
        return out

    return linear
