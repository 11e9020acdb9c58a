"""The work list of the segmented multi-LoRA kernels, built on the host.

Tokens arrive sorted by adapter slot (`worker.step_inputs`), so each adapter's tokens form one
contiguous run (base-model tokens, slot -1, come first, and a padded batch's padding rows
form one more run at the end). Each run is cut into blocks of at most `block_m` tokens
(BLOCK_M for decode steps, PROMPT_BLOCK_M for steps that carry a prompt); a
block is one row `(slot, start, end, rank)` of the table and one program of the kernels,
`rank` being the largest rank of the slot's adapter (the kernels read no A or B rows past
it). Base-model runs get rank-0 blocks `(0, start, end, 0)`: they read no weights, and an
expand that stores (rather than adds) its deltas writes their zeros. A table may be padded
to a fixed length with empty rows `(0, 0, 0, 0)` so that a captured CUDA graph can replay it
with other batches.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np

from worker.batch import NO_ADAPTER

BLOCK_M = 32  # decode steps: an adapter has a few of the batch's tokens
PROMPT_BLOCK_M = 64  # steps with a prompt: wider blocks read each adapter's A and B fewer times


def max_blocks(max_tokens: int, num_slots: int, block_m: int = BLOCK_M) -> int:
    """Rows a padded table needs for any batch of up to `max_tokens` tokens (a run per slot, the
    base-model run and the padding run, each possibly ending in a partial block)."""
    return -(-max_tokens // block_m) + num_slots + 2


BLOCK_COLUMNS = 4


def lora_blocks(token_slots: Sequence[int], slot_ranks: Sequence[int], num_rows: int | None = None,
                block_m: int = BLOCK_M) -> np.ndarray:
    """[rows, 4] int64 (slot, start, end, rank), padded with empty rows to `num_rows` if given."""
    rows: list[tuple[int, int, int, int]] = []
    position = 0
    for slot, group in itertools.groupby(token_slots):
        length = sum(1 for _ in group)
        slot_and_rank = (0, 0) if slot == NO_ADAPTER else (slot, slot_ranks[slot])
        rows.extend((slot_and_rank[0], start, min(start + block_m, position + length), slot_and_rank[1])
                    for start in range(position, position + length, block_m))
        position += length
    if num_rows is None:
        num_rows = len(rows)
    if len(rows) > num_rows:
        raise ValueError(f"{len(rows)} LoRA blocks do not fit a table of {num_rows}")
    table = np.zeros((num_rows, BLOCK_COLUMNS), dtype=np.int64)
    if rows:
        table[:len(rows)] = rows
    return table

