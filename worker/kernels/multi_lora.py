"""Multi-LoRA delta for a batch whose tokens use different adapters (segmented, SGMV-style).

For one adapted module of one layer, with per-slot stacked weights
`a: [slots, R, in]` and `b_t: [slots, R, out]` (B.T already multiplied by the adapter's
scaling) and `s(t)` the slot of token t (-1: base model, no delta):

    out[t, :] += (x[t, :] @ a[s(t), :rank, :].T) @ b_t[s(t), :rank, :]

Two Triton kernels over the block table of `worker.kernels.lora_blocks` (rows
`(slot, start, end, rank)`, tokens sorted by slot, at most BLOCK_M tokens per row):

- shrink: one program per (block, rank tile, K split):
  `partial[split, start:end, r0:r1] = x[start:end, k0:k1] @ a[slot, r0:r1, k0:k1].T` (K splits of
  K_PER_SPLIT columns, so a decode batch of a few tokens still spreads over the GPU; x tile
  [BLOCK_M, BLOCK_K], A tile [BLOCK_R, BLOCK_K]; tiles at or past the block's rank exit);
- sum: one program per (block, rank tile): `shrunk[start:end, r0:r1] = sum_split(partial)`,
  rounded to the weights' dtype as in the unfused product (fixed order: deterministic);
- expand: one program per (block, output tile):
  `out[start:end, n0:n1] += shrunk[start:end, :rank] @ b_t[slot, :rank, n0:n1]`
  (an R loop up to the block's rank; accumulated in float32, added to `out` once).

Each adapter's A and B are read once per block of its tokens, never per token, and slots
no token uses are never read. Heterogeneous ranks are exact because slot rows of A past an
adapter's rank are zero (`worker.lora.slots`). Empty rows (end <= start) do nothing, so a
padded table replays in a CUDA graph. `out` may be a column slice of a wider matrix.
"""

from __future__ import annotations

import torch

from worker.kernels.lora_blocks import BLOCK_M


def add_lora_delta_reference(out: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b_t: torch.Tensor,
                             token_slots: torch.Tensor, rank: int) -> None:
    """The same product in plain torch from per-token slots [T] (CPU, and the tests' reference)."""
    adapted = token_slots >= 0
    index = token_slots.clamp(min=0)
    shrunk = torch.einsum("ti,tri->tr", x, a[index, :rank])
    delta = torch.einsum("tr,tro->to", shrunk, b_t[index, :rank])
    out += torch.where(adapted[:, None], delta, torch.zeros((), dtype=delta.dtype, device=delta.device))


K_PER_SPLIT = 512  # shrink's reduction over `in` is split in chunks of this many columns


def shrink_partials_shape(max_tokens: int, max_in_features: int, max_rank: int) -> tuple[int, int, int]:
    """Shape of the float32 scratch the kernels need for batches up to these sizes."""
    return (-(-max_in_features // K_PER_SPLIT), max_tokens, max_rank)


def add_lora_delta(out: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b_t: torch.Tensor,
                   blocks: torch.Tensor, partials: torch.Tensor, shrunk: torch.Tensor) -> None:
    """Triton version; `blocks` [rows, 4] int64 on the GPU; scratch: `partials` float32 of
    `shrink_partials_shape` (one partial sum per K split: no atomics, no zeroing) and
    `shrunk` [>= T, R] in the weights' dtype.

    Each block's rank comes from its row (a device tensor), so one captured graph serves any
    mix of ranks up to R = a.shape[1] and reads only the rows each adapter has.
    """
    from worker.kernels import _multi_lora_triton as kernels

    kernels.shrink(x, a, blocks, partials)
    kernels.sum_splits(partials, kernels.num_splits(x.shape[1]), blocks, shrunk)
    kernels.expand(shrunk, b_t, blocks, out)


__all__ = ["BLOCK_M", "add_lora_delta", "add_lora_delta_reference"]
