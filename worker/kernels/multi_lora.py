"""Multi-LoRA deltas for a batch whose tokens use different adapters (segmented, SGMV-style).

For one adapted module m of one layer, with per-slot stacked weights `a_m: [slots, R, in]`
and `b_t_m: [slots, R, out_m]` (B.T already multiplied by the adapter's scaling) and `s(t)`
the slot of token t (-1: base model, no delta):

    out_m[t, :] += (x[t, :] @ a_m[s(t), :rank, :].T) @ b_t_m[s(t), :rank, :]

Modules that read the same input (q/k/v, gate/up; at most MAX_GROUP) go through two Triton
kernels together, over the block table of `worker.kernels.lora_blocks` (rows
`(slot, start, end, rank)`, tokens sorted by slot, at most BLOCK_M tokens per row):

- shrink: one program per (block, rank tile, module):
  `shrunk[start:end, m * R + r0 : m * R + r1] = x[start:end, :] @ a_m[slot, r0:r1, :].T`, the
  whole reduction over `in` in one program (x tile [BLOCK_M, BLOCK_K], A tile
  [BLOCK_R, BLOCK_K]; tiles at or past the block's rank exit). Small rank tiles (16) for
  decode-sized batches spread a few tokens' work over the GPU without a split-K pass;
- expand: one program per (block, output tile of one module):
  `out_m[start:end, n0:n1] += shrunk[start:end, m * R : m * R + rank] @ b_t_m[slot, :rank, n0:n1]`
  (an R loop up to the block's rank; accumulated in float32, added to `out_m` once).

So a group costs two launches whatever its size. Each adapter's A and B are read once per
block of its tokens, never per token, and slots no token uses are never read.
Heterogeneous ranks are exact because slot rows of A past an adapter's rank are zero
(`worker.lora.slots`). Empty rows (end <= start) do nothing, so a padded table replays in a
CUDA graph. Each `out_m` may be a column slice of a wider matrix (the fused qkv output).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from worker.kernels.lora_blocks import BLOCK_M

MAX_GROUP = 3  # q/k/v


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


def shrunk_shape(max_tokens: int, max_rank: int) -> tuple[int, int]:
    """Shape of the scratch the kernels need (in the weights' dtype) for batches up to these sizes."""
    return (max_tokens, MAX_GROUP * max_rank)


def add_lora_deltas(x: torch.Tensor, group: Sequence[ModuleDelta], blocks: torch.Tensor,
                    shrunk: torch.Tensor) -> None:
    """Triton version for up to MAX_GROUP modules sharing `x`; `blocks` [rows, 4] int64 on the
    GPU; `shrunk` scratch of `shrunk_shape` (every entry read is written first: no zeroing).

    Each block's rank comes from its row (a device tensor), so one captured graph serves any
    mix of ranks up to R = a.shape[1] and reads only the rows each adapter has.
    """
    from worker.kernels import _multi_lora_triton as kernels

    if not 1 <= len(group) <= MAX_GROUP:
        raise ValueError(f"a LoRA group has 1 to {MAX_GROUP} modules, got {len(group)}")
    kernels.shrink(x, [m.a for m in group], blocks, shrunk)
    kernels.expand(shrunk, [m.b_t for m in group], blocks, [m.out for m in group])


__all__ = ["BLOCK_M", "MAX_GROUP", "ModuleDelta", "add_lora_deltas", "add_lora_delta_reference", "shrunk_shape"]
