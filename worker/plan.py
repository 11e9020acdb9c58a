"""Host-side preparation of one forward: flat token tensors, KV indices, LoRA segments.

Sequences are reordered by adapter slot, so the per-token slot indices are sorted and each
adapter's tokens form one contiguous run of the flat batch (what segmented multi-LoRA
kernels want); results are mapped back to the caller's order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from worker.batch import NO_ADAPTER, SequenceInput
from worker.host_upload import upload


@dataclass(frozen=True)
class AttentionPlan:
    """One group of sequences: padded [num_seqs, max_q] queries against [num_seqs, max_kv] keys.

    Decodes and prefill chunks form separate groups, so a long prefill chunk does not pad
    every decode's single query to its length.
    """

    token_index: torch.Tensor  # [tokens of the group] flat indices, in padded-row order
    q_index: torch.Tensor  # [B, max_q] flat token index (0 where padded)
    q_valid: torch.Tensor  # [B, max_q] bool
    q_rows: torch.Tensor  # the valid entries of the flattened [B * max_q] rows, in order (no mask: it syncs)
    q_pos: torch.Tensor  # [B, max_q] absolute position of each query
    kv_index: torch.Tensor  # [B, max_kv] flat KV-cache index (0 where padded)
    kv_len: torch.Tensor  # [B]


@dataclass(frozen=True)
class SortedBatch:
    """The batch in adapter-slot order, validated; what every forward path starts from."""

    sequences: list[SequenceInput]  # sorted by adapter slot
    order: list[int]  # order[i] = caller's index of sequences[i]
    token_slots: list[int]  # adapter slot per flat token, NO_ADAPTER for base; sorted by slot
    seq_starts: list[int]  # flat start of each sorted sequence
    active_slots: frozenset[int]

    @property
    def num_tokens(self) -> int:
        return len(self.token_slots)


@dataclass(frozen=True)
class ForwardPlan(SortedBatch):
    """A sorted batch with the device tensors of the reference (eager) forward."""

    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    kv_write_index: torch.Tensor  # [T]
    attention: list[AttentionPlan]  # decodes, then prefill chunks (groups that are not empty)


@dataclass(frozen=True)
class PreviousTokens:
    """What the last launched forward sampled, still on the device, and each request's row."""

    token_ids: torch.Tensor  # [N] int64
    rows: dict[str, int]


def previous_token_sources(batch: SortedBatch, previous: PreviousTokens | None) -> list[tuple[int, int]]:
    """(flat token index, row of `previous`) of each sequence fed its previous sampled token."""
    wanted = [(start, seq.request_id) for seq, start in zip(batch.sequences, batch.seq_starts) if seq.previous_token]
    missing = [request_id for _, request_id in wanted if previous is None or request_id not in previous.rows]
    if missing:
        raise ValueError(f"requests {missing}: the previous forward sampled no token for them")
    return [(start, previous.rows[request_id]) for start, request_id in wanted]


def feed_previous_tokens(input_ids: torch.Tensor, sources: list[tuple[int, int]], previous: PreviousTokens) -> None:
    """Writes the sampled tokens into the flat input ids on the device (no host sync)."""
    index = index_tensor([flat for flat, _ in sources], input_ids.device)
    input_ids[index] = previous.token_ids[index_tensor([row for _, row in sources], input_ids.device)]


def index_tensor(values: list[int] | list[list[int]], device: torch.device,
                 dtype: torch.dtype = torch.long) -> torch.Tensor:
    """Host values on the device without waiting for the GPU, nor for adapter loads queued on
    the copy engine (`worker.host_upload`)."""
    return upload(values, dtype, device)


def sort_batch(inputs: Sequence[SequenceInput], *, page_size: int, num_pages: int, vocab_size: int) -> SortedBatch:
    if not inputs:
        raise ValueError("a forward needs at least one sequence")
    order = sorted(range(len(inputs)), key=lambda i: inputs[i].adapter_slot)
    sequences = [inputs[i] for i in order]
    token_slots: list[int] = []
    seq_starts: list[int] = []
    for seq in sequences:
        _validate(seq, page_size, num_pages, vocab_size)
        seq_starts.append(len(token_slots))
        token_slots.extend([seq.adapter_slot] * len(seq.token_ids))
    active = frozenset(s.adapter_slot for s in sequences if s.adapter_slot != NO_ADAPTER)
    return SortedBatch(sequences, order, token_slots, seq_starts, active)


def build_plan(
    inputs: Sequence[SequenceInput],
    *,
    page_size: int,
    num_pages: int,
    vocab_size: int,
    device: torch.device,
) -> ForwardPlan:
    batch = sort_batch(inputs, page_size=page_size, num_pages=num_pages, vocab_size=vocab_size)
    return plan_tensors(batch, page_size=page_size, device=device)


def plan_tensors(batch: SortedBatch, *, page_size: int, device: torch.device) -> ForwardPlan:
    input_ids: list[int] = []
    positions: list[int] = []
    kv_write: list[int] = []
    for seq in batch.sequences:
        new_positions = range(seq.context_len, seq.total_len)
        input_ids.extend(seq.token_ids)
        positions.extend(new_positions)
        kv_write.extend(_flat_index(seq.page_table, p, page_size) for p in new_positions)

    def to_device(values: list[int] | list[list[int]], dtype: torch.dtype = torch.long) -> torch.Tensor:
        return index_tensor(values, device, dtype)

    return ForwardPlan(
        sequences=batch.sequences,
        order=batch.order,
        token_slots=batch.token_slots,
        seq_starts=batch.seq_starts,
        active_slots=batch.active_slots,
        input_ids=to_device(input_ids),
        positions=to_device(positions),
        kv_write_index=to_device(kv_write),
        attention=_attention_groups(batch.sequences, batch.seq_starts, page_size, to_device),
    )


def _validate(seq: SequenceInput, page_size: int, num_pages: int, vocab_size: int) -> None:
    if not seq.token_ids:
        raise ValueError(f"request {seq.request_id}: no new tokens")
    if seq.previous_token and len(seq.token_ids) != 1:
        raise ValueError(f"request {seq.request_id}: a previous-token input is one token")
    if seq.context_len < 0:
        raise ValueError(f"request {seq.request_id}: negative context length")
    needed_pages = -(-seq.total_len // page_size)
    if len(seq.page_table) < needed_pages:
        raise ValueError(
            f"request {seq.request_id}: {seq.total_len} tokens need {needed_pages} pages, "
            f"page table has {len(seq.page_table)}"
        )
    if any(not 0 <= page < num_pages for page in seq.page_table[:needed_pages]):
        raise ValueError(f"request {seq.request_id}: page id outside [0, {num_pages})")
    if any(not 0 <= t < vocab_size for t in seq.token_ids):
        raise ValueError(f"request {seq.request_id}: token id outside the vocabulary [0, {vocab_size})")


def _flat_index(page_table: Sequence[int], position: int, page_size: int) -> int:
    return page_table[position // page_size] * page_size + position % page_size


def _attention_groups(sequences, seq_starts, page_size, to_device) -> list[AttentionPlan]:
    decodes = [(s, start) for s, start in zip(sequences, seq_starts) if len(s.token_ids) == 1]
    prefills = [(s, start) for s, start in zip(sequences, seq_starts) if len(s.token_ids) > 1]
    return [_attention_plan([s for s, _ in group], [start for _, start in group], page_size, to_device)
            for group in (decodes, prefills) if group]


def _attention_plan(sequences, seq_starts, page_size, to_device) -> AttentionPlan:
    max_q = max(len(s.token_ids) for s in sequences)
    max_kv = max(s.total_len for s in sequences)
    q_index, q_valid, q_pos, kv_index, kv_len = [], [], [], [], []
    for seq, start in zip(sequences, seq_starts):
        n = len(seq.token_ids)
        pad_q = max_q - n
        q_index.append(list(range(start, start + n)) + [0] * pad_q)
        q_valid.append([True] * n + [False] * pad_q)
        q_pos.append(list(range(seq.context_len, seq.total_len)) + [0] * pad_q)
        kv_index.append(
            [_flat_index(seq.page_table, p, page_size) for p in range(seq.total_len)]
            + [0] * (max_kv - seq.total_len)
        )
        kv_len.append(seq.total_len)
    token_index = [i for seq, start in zip(sequences, seq_starts) for i in range(start, start + len(seq.token_ids))]
    q_rows = [row * max_q + i for row, seq in enumerate(sequences) for i in range(len(seq.token_ids))]
    return AttentionPlan(
        token_index=to_device(token_index),
        q_index=to_device(q_index),
        q_valid=to_device(q_valid, torch.bool),
        q_rows=to_device(q_rows),
        q_pos=to_device(q_pos),
        kv_index=to_device(kv_index),
        kv_len=to_device(kv_len),
    )
