"""One step's inputs, built once on the host and read by both forward paths.

Sequences are reordered by adapter slot, so the per-token slot indices are sorted and each
adapter's tokens form one contiguous run of the flat batch (what segmented multi-LoRA
kernels want); results are mapped back to the caller's order. The flat per-token inputs are
numpy arrays: the CUDA-graph path copies them into its static buffers (`worker.graph_step`),
the eager path uploads them with its padded attention groups (`eager_step_tensors`).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from worker.batch import NO_ADAPTER, SequenceInput
from worker.host_upload import index_tensor


@dataclass(frozen=True)
class StepInputs:
    """The batch in adapter-slot order, validated, and its flat inputs: S sequences, T new tokens."""

    sequences: list[SequenceInput]  # sorted by adapter slot
    order: list[int]  # order[i] = caller's index of sequences[i]
    active_slots: frozenset[int]
    seq_starts: np.ndarray  # [S] flat index of each sequence's first new token
    token_counts: np.ndarray  # [S] new tokens of each sequence
    seq_lens: np.ndarray  # [S] tokens in the cache once the step has run (context + new)
    page_table: np.ndarray  # [S, W] each row's pages covering its seq_len, 0 after; W: the most any needs
    input_ids: np.ndarray  # [T]
    positions: np.ndarray  # [T]
    kv_write_index: np.ndarray  # [T] KV-cache row each token's keys and values go to
    token_slots: np.ndarray  # [T] adapter slot, NO_ADAPTER for the base model; sorted
    token_rows: np.ndarray  # [T] the sequence (row of page_table) each token belongs to

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)


def kv_index(page_table: np.ndarray, rows: np.ndarray, positions: np.ndarray, page_size: int) -> np.ndarray:
    """The KV-cache row of position `positions` of sequence `rows` (broadcast together)."""
    return page_table[rows, positions // page_size] * page_size + positions % page_size


def build_step_inputs(inputs: Sequence[SequenceInput], *, page_size: int, num_pages: int,
                      vocab_size: int) -> StepInputs:
    if not inputs:
        raise ValueError("a forward needs at least one sequence")
    order = sorted(range(len(inputs)), key=lambda i: inputs[i].adapter_slot)
    sequences = [inputs[i] for i in order]
    for seq in sequences:  # on Python ints, before any could overflow an int64 array
        _validate(seq, page_size, num_pages, vocab_size)
    count = len(sequences)
    token_counts = np.array([len(seq.token_ids) for seq in sequences], dtype=np.int64)
    context_lens = np.array([seq.context_len for seq in sequences], dtype=np.int64)
    slots = np.array([seq.adapter_slot for seq in sequences], dtype=np.int64)
    seq_lens = context_lens + token_counts
    num_tokens = int(token_counts.sum())
    if num_tokens == count:  # decodes only (most steps): token i is sequence i's, at its context length
        seq_starts = token_rows = np.arange(count)
        positions, token_slots = context_lens, slots
    else:
        seq_starts = np.cumsum(token_counts) - token_counts
        token_rows = np.repeat(np.arange(count), token_counts)
        positions = np.arange(num_tokens) - seq_starts[token_rows] + context_lens[token_rows]
        token_slots = np.repeat(slots, token_counts)
    page_table = _page_table(sequences, -(-seq_lens // page_size))
    return StepInputs(
        sequences=sequences,
        order=order,
        active_slots=frozenset(seq.adapter_slot for seq in sequences if seq.adapter_slot != NO_ADAPTER),
        seq_starts=seq_starts,
        token_counts=token_counts,
        seq_lens=seq_lens,
        page_table=page_table,
        input_ids=np.fromiter(itertools.chain.from_iterable(seq.token_ids for seq in sequences), dtype=np.int64,
                              count=num_tokens),
        positions=positions,
        kv_write_index=kv_index(page_table, token_rows, positions, page_size),
        token_slots=token_slots,
        token_rows=token_rows,
    )


def _page_table(sequences: Sequence[SequenceInput], pages_needed: np.ndarray) -> np.ndarray:
    table = np.zeros((len(sequences), int(pages_needed.max())), dtype=np.int64)
    for row, (seq, pages) in enumerate(zip(sequences, pages_needed.tolist())):
        table[row, :pages] = seq.page_table[:pages]
    return table


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


# The eager path -------------------------------------------------------------------------


@dataclass(frozen=True)
class PaddedAttentionGroup:
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
class EagerStepTensors:
    """A step's inputs on the device for the eager forward (reference attention over padded groups)."""

    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    kv_write_index: torch.Tensor  # [T]
    attention: list[PaddedAttentionGroup]  # decodes, then prefill chunks (groups that are not empty)


def eager_step_tensors(step: StepInputs, *, page_size: int, device: torch.device) -> EagerStepTensors:
    groups = (np.flatnonzero(step.token_counts == 1), np.flatnonzero(step.token_counts > 1))
    return EagerStepTensors(
        input_ids=index_tensor(step.input_ids, device),
        positions=index_tensor(step.positions, device),
        kv_write_index=index_tensor(step.kv_write_index, device),
        attention=[_padded_group(step, rows, page_size, device) for rows in groups if len(rows)],
    )


def _padded_group(step: StepInputs, rows: np.ndarray, page_size: int, device: torch.device) -> PaddedAttentionGroup:
    counts, lens = step.token_counts[rows], step.seq_lens[rows]
    q_offsets = np.arange(counts.max())
    q_valid = q_offsets < counts[:, None]
    q_index = np.where(q_valid, step.seq_starts[rows][:, None] + q_offsets, 0)
    kv_positions = np.arange(lens.max())
    kv_rows = np.where(kv_positions < lens[:, None], kv_index(step.page_table, rows[:, None], kv_positions, page_size),
                       0)
    return PaddedAttentionGroup(
        token_index=index_tensor(q_index[q_valid], device),
        q_index=index_tensor(q_index, device),
        q_valid=index_tensor(q_valid, device, torch.bool),
        q_rows=index_tensor(np.flatnonzero(q_valid), device),
        q_pos=index_tensor(np.where(q_valid, (lens - counts)[:, None] + q_offsets, 0), device),
        kv_index=index_tensor(kv_rows, device),
        kv_len=index_tensor(lens, device),
    )


# Tokens sampled by the previous step ----------------------------------------------------


@dataclass(frozen=True)
class PreviousTokens:
    """What the last launched forward sampled, still on the device, and each request's row."""

    token_ids: torch.Tensor  # [N] int64
    rows: dict[str, int]


def previous_token_sources(step: StepInputs, previous: PreviousTokens | None) -> list[tuple[int, int]]:
    """(flat token index, row of `previous`) of each sequence fed its previous sampled token."""
    wanted = [(start, seq.request_id) for seq, start in zip(step.sequences, step.seq_starts.tolist())
              if seq.previous_token]
    missing = [request_id for _, request_id in wanted if previous is None or request_id not in previous.rows]
    if missing:
        raise ValueError(f"requests {missing}: the previous forward sampled no token for them")
    return [(start, previous.rows[request_id]) for start, request_id in wanted]


def feed_previous_tokens(input_ids: torch.Tensor, sources: list[tuple[int, int]], previous: PreviousTokens) -> None:
    """Writes the sampled tokens into the flat input ids on the device (no host sync)."""
    index = index_tensor([flat for flat, _ in sources], input_ids.device)
    input_ids[index] = previous.token_ids[index_tensor([row for _, row in sources], input_ids.device)]
