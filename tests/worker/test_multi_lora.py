"""The batched multi-LoRA product against a per-token loop, over several adapter mixes."""

from __future__ import annotations

import random

import pytest
import torch

from tests.driver import make_engine, make_resident
from worker.batch import NO_ADAPTER
from worker.kernels.lora_blocks import BLOCK_M, PROMPT_BLOCK_M, lora_blocks, max_blocks
from worker.kernels.multi_lora import (MAX_GROUP, SPLIT_K_TOKENS, LoraScratch, add_lora_delta_reference,
                                       shrink_tiles)
from worker.lora.slots import SegmentBatch


@pytest.fixture(scope="module")
def engine(model_dirs, mixed_adapter_dirs):
    engine = make_engine(model_dirs["llama"], max_loras_per_batch=4)
    for slot, (name, path) in zip((1, 3), mixed_adapter_dirs["llama"].items()):
        engine.register_adapter(name, path)
        make_resident(engine, name, slot)
    yield engine
    engine.close()


def per_token_reference(engine, x: torch.Tensor, token_slots: list[int], layer: int, module: str) -> torch.Tensor:
    """delta[t] = (x[t] @ A.T) @ B.T of the adapter in token t's slot, in float64 from the host copies."""
    delta = torch.zeros(x.shape[0], engine.model_config.module_shapes()[module][1], dtype=torch.float64)
    for t, slot in enumerate(token_slots):
        name = engine.slots.occupants[slot] if slot != NO_ADAPTER else None
        tensors = engine.host_cache.entries[name].tensors.get((layer, module)) if name else None
        if tensors is not None:
            a, b_t = (w.double() for w in tensors)
            delta[t] = (x[t].double() @ a.t()) @ b_t
    return delta


def mixes(num_tokens: int) -> dict[str, list[int]]:
    rng = random.Random(0)
    return {
        "identical": [3] * num_tokens,
        "distinct": [NO_ADAPTER] * (num_tokens - 2) + [1, 3],
        "uniform": sorted(rng.choice([NO_ADAPTER, 1, 3]) for _ in range(num_tokens)),
        "skewed": sorted(rng.choices([NO_ADAPTER, 1, 3], weights=[1, 6, 1], k=num_tokens)),
        "base only": [NO_ADAPTER] * num_tokens,
    }


@pytest.mark.parametrize("mix", list(mixes(1)))
@pytest.mark.parametrize("module", ["q_proj", "v_proj", "down_proj"])
def test_batched_product_matches_per_token_loop(engine, mix, module):
    token_slots = mixes(37)[mix]
    in_features = engine.model_config.module_shapes()[module][0]
    x = torch.randn(len(token_slots), in_features, generator=torch.Generator().manual_seed(1))
    for layer in range(engine.model_config.num_layers):
        out = torch.zeros(len(token_slots), engine.model_config.module_shapes()[module][1])
        batch = engine.slots.segment_batch(token_slots, engine.device)
        if batch is not None:
            engine.slots.add_delta(out, batch.pad(x), layer, module, batch)
        expected = per_token_reference(engine, x, token_slots, layer, module)
        torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


def test_unsorted_slots_are_refused():
    with pytest.raises(ValueError, match="sorted by slot"):
        SegmentBatch.build([1, 3, 1], [{}] * 4, torch.device("cpu"), [False] * 4)
    with pytest.raises(ValueError, match="base-model tokens first"):
        SegmentBatch.build([1, NO_ADAPTER], [{}] * 4, torch.device("cpu"), [False] * 4)


@pytest.mark.parametrize("mix", list(mixes(1)))
@pytest.mark.parametrize("module", ["q_proj", "v_proj", "down_proj"])
def test_per_token_reference_product_matches_loop(engine, mix, module):
    """The reference the static decode path uses on CPU (and the Triton kernels are held to)."""
    token_slots = mixes(37)[mix]
    in_features, out_features = engine.model_config.module_shapes()[module]
    x = torch.randn(len(token_slots), in_features, generator=torch.Generator().manual_seed(2))
    for layer in range(engine.model_config.num_layers):
        out = torch.zeros(len(token_slots), out_features)
        add_lora_delta_reference(out, x, engine.slots.a[module][layer], engine.slots.b_t[module][layer],
                                 torch.tensor(token_slots), engine.slots.max_rank)
        expected = per_token_reference(engine, x, token_slots, layer, module)
        torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


def test_block_table_cuts_each_run_and_gives_base_tokens_rank_zero_blocks():
    token_slots = [NO_ADAPTER] * 3 + [0] * 20 + [2] * 5
    table = lora_blocks(token_slots, slot_ranks=[8, 0, 16], num_rows=max_blocks(32, 3, block_m=16), block_m=16)
    rows = [tuple(row) for row in table.tolist() if row[1] < row[2]]
    assert rows == [(0, 0, 3, 0), (0, 3, 19, 8), (0, 19, 23, 8), (2, 23, 28, 16)]
    assert table.shape == (max_blocks(32, 3, block_m=16), 4)
    assert not table[len(rows):].any(), "padding rows are empty"
    with pytest.raises(ValueError, match="do not fit"):
        lora_blocks([0] * 40, slot_ranks=[8], num_rows=2, block_m=16)


@pytest.mark.parametrize("seed", range(20))
def test_a_padded_batch_always_fits_its_block_table(seed):
    """Base-model tokens first, one run per slot, padding last: `max_blocks` rows always suffice."""
    rng = random.Random(seed)
    slots, capacity = rng.randint(1, 8), rng.choice([1, 16, 33, 256])
    used = rng.randint(0, capacity)
    token_slots = sorted(rng.randrange(-1, slots) for _ in range(used)) + [NO_ADAPTER] * (capacity - used)
    table = lora_blocks(token_slots, [16] * slots, max_blocks(capacity, slots))
    covered = sorted(t for _, start, end, _ in table.tolist() for t in range(start, end))
    assert covered == list(range(capacity)), "every token is in exactly one block"


@pytest.mark.parametrize("max_rank", [16, 256])
@pytest.mark.parametrize("block_m", [BLOCK_M, PROMPT_BLOCK_M])
@pytest.mark.parametrize("num_tokens", [1, 16, SPLIT_K_TOKENS, SPLIT_K_TOKENS + 1, 2048])
def test_the_scratch_holds_the_split_k_work_of_every_chosen_shrink_shape(num_tokens, block_m, max_rank):
    """8B sizes: every input width a LoRA group has gets a launch shape, for decode and for
    prompt-sized blocks, whose split-K partials and per-tile counters fit the scratch the
    decode runner allocates (and splits are whole K steps)."""
    slots, widths = 8, (4096, 14336)
    scratch = LoraScratch.allocate(num_tokens, max(widths), max_rank, slots, torch.bfloat16, torch.device("cpu"))
    for in_features in widths:
        tiles = shrink_tiles(num_tokens, max_rank, in_features, block_m)
        splits = tiles.splits(in_features)
        assert tiles.tokens >= block_m
        assert tiles.k_per_split % tiles.k == 0
        if splits > 1:
            assert num_tokens <= SPLIT_K_TOKENS
            assert scratch.partials.shape[0] >= splits
            rank_tiles = -(-max_rank // tiles.rank)
            assert scratch.counters.numel() >= max_blocks(num_tokens, slots, block_m) * rank_tiles * MAX_GROUP
