"""Multi-LoRA deltas for a batch whose tokens use different adapters (segmented, SGMV-style).

For one adapted module m of one layer, with per-slot stacked weights `a_m: [slots, R, in]`
and `b_t_m: [slots, R, out_m]` (B.T already multiplied by the adapter's scaling) and `s(t)`
the slot of token t (-1: base model, no delta):

    out_m[t, :] += (x[t, :] @ a_m[s(t), :rank, :].T) @ b_t_m[s(t), :rank, :]

Modules that read the same input (q/k/v, gate/up; at most MAX_GROUP) go through two Triton
kernels together, over the block table of `worker.kernels.lora_blocks` (rows
`(slot, start, end, rank)`, tokens sorted by slot, at most `block_m` tokens per row: BLOCK_M
in decode steps, PROMPT_BLOCK_M in steps carrying a prompt; a launch shape's `tokens`, the
rows of x one program takes, is at least that):

- shrink: one program per (block, rank tile, module, K split):
  `shrunk[start:end, m * R + r0 : m * R + r1] = x[start:end, :] @ a_m[slot, r0:r1, :].T`
  (x tile [tokens, BLOCK_K], A tile [BLOCK_R, BLOCK_K]; tiles at or past the block's rank
  exit). Decode steps use narrow rank tiles and split the reduction over `in` into
  `k_per_split`-column chunks, so one adapter's few tokens still spread over the GPU: each
  split stores a float32 partial and the tile's last split to finish sums them in split
  order (deterministic) in the same launch. Steps carrying a prompt use wider blocks, so a
  prompt's blocks read its adapter's A and B fewer times, and split only the wide input
  (`down`); batches over SPLIT_K_TOKENS tokens have blocks enough and never split;
- expand: one program per (block, output tile of one module):
  `out_m[start:end, n0:n1] += shrunk[start:end, m * R : m * R + rank] @ b_t_m[slot, :rank, n0:n1]`
  (an R loop up to the block's rank; accumulated in float32, added to `out_m` once), or with
  `accumulate=False` stored (`=`): then base-model tokens' rank-0 blocks store zeros, so a
  staging buffer needs no clearing.

So a group costs two launches whatever its size and however many adapters it mixes. Each adapter's A and B are read once per
block of its tokens, never per token, and slots no token uses are never read.
Heterogeneous ranks are exact because slot rows of A past an adapter's rank are zero
(`worker.lora.slots`). Empty rows (end <= start) do nothing, so a padded table replays in a
CUDA graph. Each `out_m` may be a column slice of a wider matrix (the fused qkv output).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from worker.kernels.lora_blocks import BLOCK_M, PROMPT_BLOCK_M, max_blocks

MAX_GROUP = 3  # q/k/v
SPLIT_K_TOKENS = 1024  # up to this many tokens, shrink splits over `in` (see above)


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
# against session 6's shapes (chosen alone by lora_kernel_sweep.py); a mixed step (8 decodes
# and a 400-token prompt): 20.45 ms with 32-token blocks -> 18.91 ms.
WIDE_INPUT = 8192
DECODE_SHRINK_NARROW = ShrinkTiles(rank=64, k=128, k_per_split=1024)
DECODE_SHRINK_WIDE = ShrinkTiles(rank=32, k=256, k_per_split=3584)
DECODE_EXPAND_STAGES = 2
PROMPT_SHRINK_NARROW = ShrinkTiles(rank=128, k=64, k_per_split=0, warps=8, stages=4, tokens=PROMPT_BLOCK_M)
PROMPT_SHRINK_WIDE = ShrinkTiles(rank=64, k=128, k_per_split=3584, warps=8, stages=3, tokens=PROMPT_BLOCK_M)
PROMPT_EXPAND = ExpandTiles(n=256, rank=64, stages=2, tokens=PROMPT_BLOCK_M)
# The split-K shapes a scratch serves.
SPLIT_SHRINKS = (DECODE_SHRINK_NARROW, DECODE_SHRINK_WIDE, PROMPT_SHRINK_WIDE)


def shrink_tiles(num_tokens: int, max_rank: int, in_features: int, block_m: int = BLOCK_M) -> ShrinkTiles:
    """The shrink's launch shape for a batch whose block table has blocks of up to `block_m` tokens."""
    wide = in_features > WIDE_INPUT
    if block_m > BLOCK_M:  # a step carrying a prompt
        tiles = PROMPT_SHRINK_WIDE if wide else PROMPT_SHRINK_NARROW
        return replace(tiles, tokens=block_m, k_per_split=tiles.k_per_split if num_tokens <= SPLIT_K_TOKENS else 0)
    if num_tokens > SPLIT_K_TOKENS:
        return ShrinkTiles(rank=_rank_tile(max_rank), k=128, k_per_split=0, tokens=block_m)
    return DECODE_SHRINK_WIDE if wide else DECODE_SHRINK_NARROW


def expand_tiles(num_tokens: int, max_rank: int, block_m: int = BLOCK_M) -> ExpandTiles:
    if block_m > BLOCK_M:
        return replace(PROMPT_EXPAND, tokens=block_m)
    return ExpandTiles(n=128, rank=_rank_tile(max_rank), stages=DECODE_EXPAND_STAGES, tokens=block_m)


def _rank_tile(rank: int) -> int:
    return max(16, min(64, 1 << (rank - 1).bit_length()))


@dataclass(frozen=True)
class ModuleDelta:
    """One module's weights for a layer and the output its delta is added to."""

    a: torch.Tensor  # [slots, R, in]
    b_t: torch.Tensor  # [slots, R, out]
    out: torch.Tensor  # [T, out], possibly a column slice


def add_lora_delta_reference(out: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b_t: torch.Tensor,
                             token_slots: torch.Tensor, rank: int) -> None:
    """One module's product in plain torch from per-token slots [T] (CPU, and the tests' reference)."""
    adapted = token_slots >= 0
    index = token_slots.clamp(min=0)
    shrunk = torch.einsum("ti,tri->tr", x, a[index, :rank])
    delta = torch.einsum("tr,tro->to", shrunk, b_t[index, :rank])
    out += torch.where(adapted[:, None], delta, torch.zeros((), dtype=delta.dtype, device=delta.device))


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


def add_lora_deltas(x: torch.Tensor, group: Sequence[ModuleDelta], blocks: torch.Tensor,
                    scratch: LoraScratch, block_m: int = BLOCK_M) -> None:
    """Triton version for up to MAX_GROUP modules sharing `x`; `blocks` [rows, 4] int64 on the GPU,
    built with `block_m` tokens per block at most.

    Each block's rank comes from its row (a device tensor), so one captured graph serves any
    mix of ranks up to R = a.shape[1] and reads only the rows each adapter has.
    """
    lora_shrink(x, [m.a for m in group], blocks, scratch, block_m=block_m)
    lora_expand([m.b_t for m in group], [m.out for m in group], blocks, scratch, block_m=block_m)


def lora_shrink(x: torch.Tensor, a: Sequence[torch.Tensor], blocks: torch.Tensor, scratch: LoraScratch,
                tiles: ShrinkTiles | None = None, block_m: int = BLOCK_M) -> None:
    """The first kernel alone: scratch.shrunk = x @ A.T per block (needs x only, not the base output).
    `tiles` overrides the launch shape chosen for the batch (the sweeps in benchmarks/)."""
    from worker.kernels import _multi_lora_triton as kernels

    if not 1 <= len(a) <= MAX_GROUP:
        raise ValueError(f"a LoRA group has 1 to {MAX_GROUP} modules, got {len(a)}")
    tiles = tiles or shrink_tiles(x.shape[0], a[0].shape[1], x.shape[1], block_m)
    _check_block_m(tiles.tokens, block_m)
    kernels.shrink(x, list(a), blocks, scratch, tiles)


def lora_expand(b_t: Sequence[torch.Tensor], outs: Sequence[torch.Tensor], blocks: torch.Tensor,
                scratch: LoraScratch, tiles: ExpandTiles | None = None, accumulate: bool = True,
                block_m: int = BLOCK_M) -> None:
    """The second kernel alone, after `lora_shrink`: outs += scratch.shrunk @ B.T per block
    (accumulate=False: outs =, every row of outs being in a block)."""
    from worker.kernels import _multi_lora_triton as kernels

    tiles = tiles or expand_tiles(outs[0].shape[0], b_t[0].shape[1], block_m)
    _check_block_m(tiles.tokens, block_m)
    kernels.expand(scratch.shrunk, list(b_t), blocks, list(outs), tiles, accumulate)


def _check_block_m(tile_tokens: int, block_m: int) -> None:
    if tile_tokens < block_m:
        raise ValueError(f"a launch shape of {tile_tokens} tokens cannot take blocks of {block_m}")


__all__ = ["BLOCK_M", "MAX_GROUP", "PROMPT_BLOCK_M", "ExpandTiles", "LoraScratch", "ModuleDelta", "ShrinkTiles",
           "add_lora_deltas", "add_lora_delta_reference", "lora_expand", "lora_shrink"]
