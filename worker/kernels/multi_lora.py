"""Multi-LoRA deltas for a batch whose tokens use different adapters (segmented, SGMV-style).

For one adapted module m of one layer, with per-slot stacked weights `a_m: [slots, R, in]`
and `b_t_m: [slots, R, out_m]` (B.T already multiplied by the adapter's scaling) and `s(t)`
the slot of token t (-1: base model, no delta):

    out_m[t, :] += (x[t, :] @ a_m[s(t), :rank, :].T) @ b_t_m[s(t), :rank, :]

Modules that read the same input (q/k/v, gate/up; at most MAX_GROUP) go through two Triton
kernels together (launch shapes and scratch: `worker.kernels.lora_launch`), over the block
table of `worker.kernels.lora_blocks` (rows `(slot, start, end, rank)`, tokens sorted by
slot, at most `block_m` tokens per row: BLOCK_M in decode steps, PROMPT_BLOCK_M in steps
carrying a prompt; a launch shape's `tokens`, the rows of x one program takes, is at least
that):

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
  `accumulate=False` stored (`=`) into a staging buffer, whose rows of base-model tokens
  (rank-0 blocks) are left unwritten: their reader skips them by token slot.

So a group costs two launches whatever its size and however many adapters it mixes. Each
adapter's A and B are read once per block of its tokens, never per token, and slots no token
uses are never read. Heterogeneous ranks are exact because slot rows of A past an adapter's
rank are zero (`worker.lora.slots`). Empty rows (end <= start) do nothing, so a padded table
replays in a CUDA graph. Each `out_m` may be a column slice of a wider matrix (the fused qkv output).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from worker.kernels.lora_blocks import BLOCK_M, PROMPT_BLOCK_M
from worker.kernels.lora_launch import (
    DECODE_SHRINK_NARROW,
    DECODE_SHRINK_WIDE,
    MAX_GROUP,
    PROMPT_EXPAND,
    PROMPT_SHRINK_NARROW,
    PROMPT_SHRINK_WIDE,
    SPLIT_K_TOKENS,
    WIDE_INPUT,
    ExpandTiles,
    LoraScratch,
    ShrinkTiles,
    expand_tiles,
    shrink_tiles,
)


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
    (accumulate=False: outs = in the rows of adapted tokens; base-model rows are not written)."""
    from worker.kernels import _multi_lora_triton as kernels

    tiles = tiles or expand_tiles(outs[0].shape[0], b_t[0].shape[1], block_m)
    _check_block_m(tiles.tokens, block_m)
    kernels.expand(scratch.shrunk, list(b_t), blocks, list(outs), tiles, accumulate)


def _check_block_m(tile_tokens: int, block_m: int) -> None:
    if tile_tokens < block_m:
        raise ValueError(f"a launch shape of {tile_tokens} tokens cannot take blocks of {block_m}")


__all__ = ["BLOCK_M", "DECODE_SHRINK_NARROW", "DECODE_SHRINK_WIDE", "MAX_GROUP", "PROMPT_BLOCK_M", "PROMPT_EXPAND",
           "PROMPT_SHRINK_NARROW", "PROMPT_SHRINK_WIDE", "SPLIT_K_TOKENS", "WIDE_INPUT", "ExpandTiles", "LoraScratch",
           "ModuleDelta", "ShrinkTiles", "add_lora_deltas", "add_lora_delta_reference", "expand_tiles", "lora_expand",
           "lora_shrink", "shrink_tiles"]
