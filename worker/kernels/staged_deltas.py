"""LoRA deltas staged beside a base GEMM, or folded into it, for the kernel that next reads its
output (`worker.kernels.elementwise`), and the folded readers' launch shapes: apart from both the
public functions and the Triton modules so that each imports them without a cycle (and without
Triton)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class StagedDeltas:
    """A module output's LoRA deltas, staged for the kernel that next reads the output to add.
    Only rows of tokens with an adapter hold deltas: the others (token slot < 0: base-model
    and padding tokens) were not written (storing their zeros cost a step with a long base-model
    prompt milliseconds) and read as zero."""

    values: torch.Tensor  # [T, N]
    token_slots: torch.Tensor  # [T] integer; negative: no adapter, the row is not read

    def dense(self) -> torch.Tensor:
        """The deltas with unwritten rows as zeros (the torch paths)."""
        zero = torch.zeros((), dtype=self.values.dtype, device=self.values.device)
        return torch.where(self.token_slots[:, None] >= 0, self.values, zero)


@dataclass(frozen=True)
class FoldedDeltas:
    """A module group's LoRA folded into its base GEMM (`worker.lora.folded`): the GEMM's extra
    output columns are every slot's shrunk input, and the kernel that next reads the output adds
    `shrunk @ B^T` of each row's own slot, a block of rows at a time (`worker.kernels.lora_blocks`:
    a block's rows share a slot; rank 0 marks rows without an adapter, which get no delta).

    Per module i of the group, slot s's rank columns are `shrunk[:, (i * slots + s) * rank:][:, :rank]`;
    `b_t[i]` is the module's [slots, rank, outputs] (already scaled, as the slots hold it), and the
    modules' outputs lie side by side in the output's columns in the same order."""

    shrunk: torch.Tensor  # [T, modules * slots * rank]
    b_t: tuple[torch.Tensor, ...]
    blocks: torch.Tensor  # [rows, 4] int64 (slot, start, end, rank): every row of the batch in a block
    block_m: int  # the table's most rows per block
    token_slots: torch.Tensor  # [T] integer, negative: no adapter

    @property
    def slots(self) -> int:
        return self.b_t[0].shape[0]

    @property
    def rank(self) -> int:
        return self.b_t[0].shape[1]

    def dense(self) -> torch.Tensor:
        """The deltas [T, the modules' outputs] (the torch paths): each row's own slot's columns
        kept, the others zeroed (selected, not multiplied: a slot being copied during the GEMM
        may have left anything in its columns), times every slot's B^T stacked."""
        columns = self.slots * self.rank
        own = (self.token_slots[:, None] == torch.arange(self.slots, device=self.shrunk.device)[None, :])
        mask = own.repeat_interleave(self.rank, dim=1)
        zero = torch.zeros((), dtype=self.shrunk.dtype, device=self.shrunk.device)
        return torch.cat([torch.where(mask, self.shrunk[:, i * columns:(i + 1) * columns], zero) @ b_t.flatten(0, 1)
                          for i, b_t in enumerate(self.b_t)], dim=1)


@dataclass(frozen=True)
class FoldedTiles:
    """A folded reader's launch shape (`worker.kernels._folded_readers_triton`;
    `benchmarks.folded_reader_sweep` times them). A program takes `rows` of one block (a power of
    two from 16, tl.dot's least, to the block table's block_m) and, in the column-parallel
    kernels, `columns` of them; rope takes a head's columns."""

    rows: int = 16
    columns: int = 128
    warps: int = 4

    def __post_init__(self) -> None:
        if self.rows < 16 or self.rows & (self.rows - 1):
            raise ValueError(f"a folded reader's programs take a power of two of at least 16 rows, got {self.rows}")


# Whole blocks (up to 64 rows) made tiles of 64 x 256 that spilled registers (act_mul 54 us a call in
# a mixed step) and, for a decode block's one row, 31 rows of waste.
NORM_TILES = FoldedTiles(rows=16, columns=256)
ROPE_TILES = FoldedTiles(rows=16)
ACT_TILES = FoldedTiles(rows=16, columns=128)
