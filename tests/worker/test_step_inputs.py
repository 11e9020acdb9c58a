"""The step-input builder (worker.step_inputs) against a straightforward per-token reference,
on random ragged batches."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from worker.batch import NO_ADAPTER, SequenceInput
from worker.step_inputs import build_step_inputs, eager_step_tensors

NUM_PAGES = 64
VOCAB = 100


def random_batch(rng: random.Random, page_size: int) -> list[SequenceInput]:
    sequences = []
    for index in range(rng.randint(1, 9)):
        new = 1 if rng.random() < 0.5 else rng.randint(2, 20)
        context = rng.randint(0, 40)
        pages = -(-(context + new) // page_size) + rng.randint(0, 2)  # tables may name spare pages
        sequences.append(SequenceInput(
            request_id=f"r{index}", token_ids=[rng.randrange(VOCAB) for _ in range(new)], context_len=context,
            page_table=rng.sample(range(NUM_PAGES), pages), adapter_slot=rng.choice([NO_ADAPTER, 0, 1, 2, 3]),
        ))
    return sequences


def reference(inputs: list[SequenceInput], page_size: int) -> dict[str, list[int]]:
    """Per token, written out: the sequences sorted by slot (stably), each one's new tokens in order."""
    order = sorted(range(len(inputs)), key=lambda i: inputs[i].adapter_slot)
    flat = {name: [] for name in ("input_ids", "positions", "kv_write_index", "token_slots", "token_rows",
                                  "seq_starts", "seq_lens")}
    for row, seq in enumerate(inputs[i] for i in order):
        flat["seq_starts"].append(len(flat["input_ids"]))
        flat["seq_lens"].append(seq.context_len + len(seq.token_ids))
        for offset, token in enumerate(seq.token_ids):
            position = seq.context_len + offset
            flat["input_ids"].append(token)
            flat["positions"].append(position)
            flat["kv_write_index"].append(seq.page_table[position // page_size] * page_size + position % page_size)
            flat["token_slots"].append(seq.adapter_slot)
            flat["token_rows"].append(row)
    flat["order"] = order
    return flat


@pytest.mark.parametrize("page_size", [1, 4, 16])
def test_flat_inputs_match_the_reference(page_size):
    rng = random.Random(page_size)
    for _ in range(50):
        inputs = random_batch(rng, page_size)
        step = build_step_inputs(inputs, page_size=page_size, num_pages=NUM_PAGES, vocab_size=VOCAB)
        expected = reference(inputs, page_size)
        assert step.order == expected.pop("order")
        for name, values in expected.items():
            assert getattr(step, name).tolist() == values, name
        assert step.num_tokens == len(expected["input_ids"])
        assert step.active_slots == {seq.adapter_slot for seq in inputs} - {NO_ADAPTER}
        assert (np.diff(step.token_slots) >= 0).all(), "slots sorted"


@pytest.mark.parametrize("page_size", [1, 16])
def test_page_table_holds_each_sequences_pages_then_zeros(page_size):
    rng = random.Random(7)
    for _ in range(20):
        inputs = random_batch(rng, page_size)
        step = build_step_inputs(inputs, page_size=page_size, num_pages=NUM_PAGES, vocab_size=VOCAB)
        needed = [-(-seq.total_len // page_size) for seq in step.sequences]
        assert step.page_table.shape == (len(inputs), max(needed))
        for row, (seq, pages) in enumerate(zip(step.sequences, needed)):
            assert step.page_table[row].tolist() == list(seq.page_table[:pages]) + [0] * (max(needed) - pages)


def test_padded_attention_groups_match_the_reference():
    """Decodes, then prefill chunks; each group's queries and keys padded to its longest."""
    page_size = 4
    rng = random.Random(3)
    for _ in range(30):
        inputs = random_batch(rng, page_size)
        step = build_step_inputs(inputs, page_size=page_size, num_pages=NUM_PAGES, vocab_size=VOCAB)
        tensors = eager_step_tensors(step, page_size=page_size, device=torch.device("cpu"))
        starts = step.seq_starts.tolist()
        groups = [[i for i, seq in enumerate(step.sequences) if (len(seq.token_ids) == 1) == decode]
                  for decode in (True, False)]
        groups = [group for group in groups if group]
        assert len(tensors.attention) == len(groups)
        for group, padded in zip(groups, tensors.attention):
            seqs = [step.sequences[i] for i in group]
            max_q, max_kv = max(len(s.token_ids) for s in seqs), max(s.total_len for s in seqs)
            q_index = [list(range(starts[i], starts[i] + len(s.token_ids))) + [0] * (max_q - len(s.token_ids))
                       for i, s in zip(group, seqs)]
            kv_index = [[s.page_table[p // page_size] * page_size + p % page_size for p in range(s.total_len)]
                        + [0] * (max_kv - s.total_len) for s in seqs]
            q_pos = [list(range(s.context_len, s.total_len)) + [0] * (max_q - len(s.token_ids)) for s in seqs]
            assert padded.q_index.tolist() == q_index
            assert padded.kv_index.tolist() == kv_index
            assert padded.q_pos.tolist() == q_pos
            assert padded.q_valid.tolist() == [[i < len(s.token_ids) for i in range(max_q)] for s in seqs]
            assert padded.kv_len.tolist() == [s.total_len for s in seqs]
            assert padded.token_index.tolist() == [t for i, s in zip(group, seqs)
                                                   for t in range(starts[i], starts[i] + len(s.token_ids))]
            assert padded.q_rows.tolist() == [row * max_q + i for row, s in enumerate(seqs)
                                              for i in range(len(s.token_ids))]


def test_an_empty_batch_is_refused():
    with pytest.raises(ValueError, match="at least one sequence"):
        build_step_inputs([], page_size=4, num_pages=NUM_PAGES, vocab_size=VOCAB)


def test_a_context_past_int64_is_refused_by_validation_not_wrapped():
    huge = SequenceInput("r", [1], context_len=2**63 - 1, page_table=[0])
    with pytest.raises(ValueError, match="pages"):
        build_step_inputs([huge], page_size=4, num_pages=NUM_PAGES, vocab_size=VOCAB)
