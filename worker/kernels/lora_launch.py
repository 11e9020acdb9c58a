"""Launch shapes and scratch of the multi-LoRA kernels (`worker.kernels.multi_lora`), apart
from both the public functions and the Triton module so that each imports them without a cycle."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from worker.kernels.lora_blocks import BLOCK_M, PROMPT_BLOCK_M, max_blocks


MAX_GROUP = 3  # q/k/v
SPLIT_K_TOKENS = 1024  # up to this many tokens, shrink splits over `in` (`worker.kernels.multi_lora`)


@dataclass(frozen=True)
class ShrinkTiles:
    """The shrink kernel's launch shape."""

    rank: int  # rows of A per program
    k: int  # columns of x and A per loop step
    k_per_split: int  # columns of `in` per program (a multiple of k); 0: no split
    warps: int = 4
    stages: int = 3
    tokens: int = BLOCK_M  # rows of x per program: at least the block table's block_m

    def splits(self, in_features: int) -> int:
        return -(-in_features // self.k_per_split) if self.k_per_split else 1


@dataclass(frozen=True)
class ExpandTiles:
    """The expand kernel's launch shape."""

    n: int  # output columns per program
    rank: int  # rows of B per loop step
    warps: int = 4
    stages: int = 3
    tokens: int = BLOCK_M  # rows of x per program: at least the block table's block_m


# Launch shapes from benchmarks/step_tile_sweep.py on an H200 (8B sizes, 8 rank-256 adapters,
# benchmarks/results/step_tile_sweep_h200.json), chosen by the time of the whole step, since the
# kernels run beside the base GEMMs: inputs up to WIDE_INPUT columns (q/k/v, o, gate/up) and
# wider ones (down) each have their own. A decode step of 9 over 8 adapters: 7.53 -> 7.36 ms
# against shapes chosen by the kernels' time alone (lora_kernel_sweep.py); a mixed step (8
# decodes and a 400-token prompt): 20.45 ms with 32-token blocks -> 18.91 ms.
WIDE_INPUT = 8192
DECODE_SHRINK_NARROW = ShrinkTiles(rank=64, k=128, k_per_split=1024)
DECODE_SHRINK_WIDE = ShrinkTiles(rank=32, k=256, k_per_split=3584)
DECODE_EXPAND_STAGES = 2
# Steps carrying a prompt, from `lora_kernel_sweep --prompt 400` (8 decodes and a 400-token prompt,
# benchmarks/results/lora-kernel-sweep-mixed-r*-cd782df.json, H100). Slots of rank <= LOW_RANK give a
# prompt's 64-token blocks one or two rank tiles: too few programs to fill the GPU, so the
# reduction over `in` splits too (rank 16 shrink, per layer: qkv 20.8 -> 8.6 us, gate_up 21.1 -> 7.1).
# Higher ranks have programs enough and split nothing (rank 256: qkv 30.8 -> 27.0, down 39.0 -> 33.4).
LOW_RANK = 64
PROMPT_SHRINK_LOW_RANK = ShrinkTiles(rank=16, k=128, k_per_split=2048, warps=8, stages=4, tokens=PROMPT_BLOCK_M)
PROMPT_SHRINK_NARROW = ShrinkTiles(rank=32, k=128, k_per_split=0, warps=4, stages=3, tokens=PROMPT_BLOCK_M)
PROMPT_SHRINK_WIDE = ShrinkTiles(rank=32, k=256, k_per_split=0, warps=4, stages=4, tokens=PROMPT_BLOCK_M)
PROMPT_EXPAND = ExpandTiles(n=256, rank=64, stages=2, tokens=PROMPT_BLOCK_M)
PROMPT_EXPAND_LOW_RANK = ExpandTiles(n=128, rank=16, stages=2, tokens=PROMPT_BLOCK_M)  # rank 16 gate_up: 22.3 -> 15.8 us
# The split-K shapes a scratch serves.
SPLIT_SHRINKS = (DECODE_SHRINK_NARROW, DECODE_SHRINK_WIDE, PROMPT_SHRINK_LOW_RANK)


def shrink_tiles(num_tokens: int, max_rank: int, in_features: int, block_m: int = BLOCK_M) -> ShrinkTiles:
    """The shrink's launch shape for a batch whose block table has blocks of up to `block_m` tokens."""
    wide = in_features > WIDE_INPUT
    if block_m > BLOCK_M:  # a step carrying a prompt
        if max_rank <= LOW_RANK and num_tokens <= SPLIT_K_TOKENS:
            return replace(PROMPT_SHRINK_LOW_RANK, tokens=block_m)
        return replace(PROMPT_SHRINK_WIDE if wide else PROMPT_SHRINK_NARROW, tokens=block_m)
    if num_tokens > SPLIT_K_TOKENS:
        return ShrinkTiles(rank=_rank_tile(max_rank), k=128, k_per_split=0, tokens=block_m)
    return DECODE_SHRINK_WIDE if wide else DECODE_SHRINK_NARROW


# Under Hopper's 227 KiB of shared memory a block, with room for the compiler's own.
SHARED_MEMORY_BYTES = 200 << 10


def fit_shared_memory(tiles: ShrinkTiles, element_size: int) -> ShrinkTiles:
    """The shapes above are for 2-byte weights: float32 ones take fewer columns per K step, so
    that the pipeline's stages hold as many bytes (a prompt's wide shrink needs 288 KiB else)."""
    k = tiles.k
    while k > 16 and (tiles.stages - 1) * (tiles.tokens + tiles.rank) * k * element_size > SHARED_MEMORY_BYTES:
        k //= 2
    return replace(tiles, k=k)


def expand_tiles(num_tokens: int, max_rank: int, block_m: int = BLOCK_M) -> ExpandTiles:
    if block_m > BLOCK_M:
        tiles = PROMPT_EXPAND_LOW_RANK if max_rank <= LOW_RANK else PROMPT_EXPAND
        return replace(tiles, rank=min(tiles.rank, _rank_tile(max_rank)), tokens=block_m)
    return ExpandTiles(n=128, rank=_rank_tile(max_rank), stages=DECODE_EXPAND_STAGES, tokens=block_m)


def _rank_tile(rank: int) -> int:
    return max(16, min(64, 1 << (rank - 1).bit_length()))


@dataclass(frozen=True)
class LoraScratch:
    """The kernels' scratch for batches up to a size; every entry read is written first (no
    zeroing), and the split counters return to zero after each launch."""

    shrunk: torch.Tensor  # [tokens, MAX_GROUP * R], the weights' dtype
    partials: torch.Tensor  # [splits, SPLIT_K_TOKENS, MAX_GROUP * R] float32
    counters: torch.Tensor  # [blocks * rank tiles * MAX_GROUP] int32 of split launches, zero between launches
    deltas: torch.Tensor  # [SPLIT_K_TOKENS, widest group's outputs], a group's deltas apart from its outputs

    @classmethod
    def allocate(cls, max_tokens: int, max_in_features: int, max_rank: int, num_slots: int, dtype: torch.dtype,
                 device: torch.device, split_tiles: Sequence[ShrinkTiles] = SPLIT_SHRINKS,
                 delta_columns: int = 0) -> LoraScratch:
        split_tokens = min(max_tokens, SPLIT_K_TOKENS)
        tiles = max(max_blocks(split_tokens, num_slots, t.tokens) * -(-max_rank // t.rank) * MAX_GROUP
                    for t in split_tiles)
        splits = max(t.splits(max_in_features) for t in split_tiles)
        return cls(
            shrunk=torch.zeros(max_tokens, MAX_GROUP * max_rank, dtype=dtype, device=device),
            partials=torch.zeros(splits, split_tokens, MAX_GROUP * max_rank, device=device),
            counters=torch.zeros(tiles, dtype=torch.int32, device=device),
            deltas=torch.zeros(split_tokens, delta_columns, dtype=dtype, device=device),
        )

    def first(self, num_tokens: int) -> LoraScratch:
        """The scratch of a batch of `num_tokens` (views)."""
        split_tokens = min(num_tokens, SPLIT_K_TOKENS)
        return LoraScratch(self.shrunk[:num_tokens], self.partials[:, :split_tokens], self.counters,
                           self.deltas[:split_tokens])
