"""The readers with a folded LoRA expand (`FoldedDeltas`, `worker.kernels._folded_readers_triton`)
against the torch references, which add `FoldedDeltas.dense()`.

Run on a GPU machine: `python -m pytest -m gpu tests/gpu/test_gpu_folded_readers.py`. With
`TRITON_INTERPRET=1` the float32 cases also run in Triton's interpreter on CPU tensors.
"""

from __future__ import annotations

import pytest
import torch

from tests.gpu.test_gpu_elementwise import DEVICES, DTYPES, INTERPRET, assert_matches, randn, round_like_the_gpu
from worker.batch import NO_ADAPTER
from worker.kernels.elementwise import (
    FoldedDeltas,
    act_mul_reference,
    add_rms_norm_reference,
    rope_and_cache_kv_reference,
)
from worker.kernels.lora_blocks import BLOCK_M, PROMPT_BLOCK_M, lora_blocks

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not DEVICES, reason="needs a CUDA GPU (or TRITON_INTERPRET=1)"),
]
# The interpreter's tl.dot of bfloat16 does not round as the GPU's does: there float32 only.
FOLDED_DTYPES = list(DTYPES) if torch.cuda.is_available() and not INTERPRET else ["float32"]
SLOTS, RANK = 4, 16
# Batches as the engine sorts them: base-model tokens first, then each adapter's run, then padding.
BATCHES = {
    "decodes": [NO_ADAPTER, 0, 1, 2, 3, NO_ADAPTER],
    "prompt": [NO_ADAPTER] * 3 + [1] * 70 + [NO_ADAPTER] * 2,
    "mixed": [NO_ADAPTER, 0, 2, 3] + [1] * 37,
}


@pytest.fixture(params=DEVICES)
def device(request, monkeypatch) -> str:
    if request.param == "cpu":
        round_like_the_gpu(monkeypatch)
    return request.param


def kernels():
    from worker.kernels import _folded_readers_triton

    return _folded_readers_triton


def folded(batch: str, module_outputs: list[int], *, dtype: torch.dtype, device: str) -> FoldedDeltas:
    """A group's folded LoRA: the shrunk columns as a view of a wider GEMM output (so with its row
    stride), slot 2's adapter of rank 8 (its columns past 8 zero, as A's rows are), rank 16 elsewhere."""
    token_slots = BATCHES[batch]
    block_m = BLOCK_M if batch == "decodes" else PROMPT_BLOCK_M
    ranks = [RANK, RANK, 8, RANK]
    columns = len(module_outputs) * SLOTS * RANK
    gemm = randn(len(token_slots), 64 + columns, dtype=dtype, device=device, seed=20, scale=0.5)
    shrunk = gemm[:, 64:]
    for module in range(len(module_outputs)):
        shrunk[:, (module * SLOTS + 2) * RANK + 8:][:, :RANK - 8] = 0
    b_t = tuple(randn(SLOTS, RANK, n, dtype=dtype, device=device, seed=21 + i, scale=0.1)
                for i, n in enumerate(module_outputs))
    blocks = torch.from_numpy(lora_blocks(token_slots, ranks, len(token_slots) + 4, block_m)).to(device)
    return FoldedDeltas(shrunk, b_t, blocks, block_m, torch.tensor(token_slots, device=device))


@pytest.mark.parametrize("dtype", FOLDED_DTYPES)
@pytest.mark.parametrize("batch", list(BATCHES))
@pytest.mark.parametrize("size", [72, 4096])
@pytest.mark.parametrize("norm_weight", ["model", "float32"])
def test_folded_add_rms_norm_matches_reference(device, dtype, batch, size, norm_weight):
    torch_dtype = DTYPES[dtype]
    lora = folded(batch, [size], dtype=torch_dtype, device=device)
    tokens = lora.shrunk.shape[0]
    hidden = randn(tokens, size, dtype=torch_dtype, device=device, seed=0)
    out = randn(tokens, size + 8, dtype=torch_dtype, device=device, seed=1)[:, :size]  # a strided module output
    weight = randn(size, dtype=torch.float32 if norm_weight == "float32" else torch_dtype, device=device, seed=2,
                   scale=0.1) + 1
    summed, normed = kernels().add_rms_norm(hidden, out, weight, 1e-6, lora)
    expected_sum, expected_normed = add_rms_norm_reference(hidden, out, weight, 1e-6, lora)
    assert_matches(summed, expected_sum, dtype)
    assert_matches(normed, expected_normed, dtype)
    assert not torch.equal(expected_sum, add_rms_norm_reference(hidden, out, weight, 1e-6)[0]), "a delta was added"


@pytest.mark.parametrize("dtype", FOLDED_DTYPES)
@pytest.mark.parametrize("batch", list(BATCHES))
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(4, 2, 64), (8, 2, 16)])
@pytest.mark.parametrize("qk_norm", [False, True])
def test_folded_rope_and_cache_kv_matches_reference(device, dtype, batch, heads, kv_heads, head_dim, qk_norm):
    torch_dtype = DTYPES[dtype]
    q_size, kv_size = heads * head_dim, kv_heads * head_dim
    lora = folded(batch, [q_size, kv_size, kv_size], dtype=torch_dtype, device=device)
    tokens = lora.shrunk.shape[0]
    qkv = randn(tokens, q_size + 2 * kv_size + 16, dtype=torch_dtype, device=device, seed=3)[:, :q_size + 2 * kv_size]
    positions = torch.arange(tokens) * 7
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    emb = torch.cat([positions.float()[:, None] * inv_freq[None, :]] * 2, dim=-1)
    cos, sin = (f(emb).to(torch_dtype).to(device)[:, None, :] for f in (torch.cos, torch.sin))
    norms = [randn(head_dim, dtype=torch_dtype, device=device, seed=5 + i, scale=0.1) + 1 for i in range(2)]
    q_norm, k_norm = norms if qk_norm else (None, None)
    write_index = torch.randperm(2 * tokens, generator=torch.Generator().manual_seed(9))[:tokens].to(device)
    caches = [{name: torch.zeros(2 * tokens, kv_heads, head_dim, dtype=torch_dtype, device=device)
               for name in ("keys", "values")} for _ in range(2)]
    q = kernels().rope_and_cache_kv(qkv, lora, heads, kv_heads, head_dim, cos, sin, q_norm, k_norm, 1e-6,
                                    write_index=write_index, **caches[0])
    expected_q = rope_and_cache_kv_reference(qkv, lora, heads, kv_heads, head_dim, cos, sin, q_norm, k_norm, 1e-6,
                                             write_index=write_index, **caches[1])
    assert_matches(q, expected_q, dtype)
    assert_matches(caches[0]["keys"], caches[1]["keys"], dtype)
    assert_matches(caches[0]["values"], caches[1]["values"], dtype)


@pytest.mark.parametrize("dtype", FOLDED_DTYPES)
@pytest.mark.parametrize("batch", list(BATCHES))
@pytest.mark.parametrize("size", [72, 1100])
@pytest.mark.parametrize("activation", ["silu", "gelu_pytorch_tanh"])
def test_folded_act_mul_matches_reference(device, dtype, batch, size, activation):
    torch_dtype = DTYPES[dtype]
    lora = folded(batch, [size, size], dtype=torch_dtype, device=device)
    tokens = lora.shrunk.shape[0]
    gate_up = randn(tokens, 2 * size + 32, dtype=torch_dtype, device=device, seed=6, scale=3.0)[:, :2 * size]
    assert_matches(kernels().act_mul(gate_up, lora, activation), act_mul_reference(gate_up, lora, activation), dtype)


# Launch shapes `benchmarks.folded_reader_sweep` may choose: wider parts than a decode block's rows,
# narrow and wide column tiles.
OTHER_TILES = [(32, 64, 2), (64, 512, 8)]


@pytest.mark.parametrize("dtype", FOLDED_DTYPES)
@pytest.mark.parametrize("rows,columns,warps", OTHER_TILES)
def test_folded_readers_match_reference_in_other_launch_shapes(device, dtype, rows, columns, warps):
    tiles = kernels().FoldedTiles(rows=rows, columns=columns, warps=warps)
    torch_dtype = DTYPES[dtype]
    lora = folded("mixed", [1100, 1100], dtype=torch_dtype, device=device)
    tokens = lora.shrunk.shape[0]
    gate_up = randn(tokens, 2200, dtype=torch_dtype, device=device, seed=6, scale=3.0)
    assert_matches(kernels().act_mul(gate_up, lora, "silu", tiles), act_mul_reference(gate_up, lora, "silu"), dtype)
    lora = folded("prompt", [600], dtype=torch_dtype, device=device)
    hidden, out = (randn(lora.shrunk.shape[0], 600, dtype=torch_dtype, device=device, seed=s) for s in (0, 1))
    weight = randn(600, dtype=torch_dtype, device=device, seed=2, scale=0.1) + 1
    for got, expected in zip(kernels().add_rms_norm(hidden, out, weight, 1e-6, lora, tiles),
                             add_rms_norm_reference(hidden, out, weight, 1e-6, lora)):
        assert_matches(got, expected, dtype)


@pytest.mark.parametrize("dtype", FOLDED_DTYPES)
@pytest.mark.parametrize("rows,columns,warps", [(16, 256, 4), *OTHER_TILES])
def test_the_one_kernel_sum_and_norm_candidate_matches_reference_call_after_call(device, dtype, rows, columns, warps):
    from benchmarks._fused_norm_triton import SumAndNorm

    torch_dtype = DTYPES[dtype]
    lora = folded("mixed", [1100], dtype=torch_dtype, device=device)
    tokens = lora.shrunk.shape[0]
    candidate = SumAndNorm(tokens, 1100, lora.blocks.shape[0], lora.block_m,
                           kernels().FoldedTiles(rows=rows, columns=columns, warps=warps), device=device)
    weight = randn(1100, dtype=torch_dtype, device=device, seed=2, scale=0.1) + 1
    for seed in (0, 10):  # the second call finds the parts' counts reset by the first
        hidden, out = (randn(tokens, 1100, dtype=torch_dtype, device=device, seed=seed + s) for s in (0, 1))
        for got, expected in zip(candidate(hidden, out, weight, 1e-6, lora),
                                 add_rms_norm_reference(hidden, out, weight, 1e-6, lora)):
            assert_matches(got, expected, dtype)
    assert not candidate.counts.any()


@pytest.mark.parametrize("dtype", FOLDED_DTYPES)
@pytest.mark.parametrize("batch", list(BATCHES))
@pytest.mark.parametrize("rows,columns,warps", [(1, 512, 4), (4, 256, 4), (16, 1024, 8)])
def test_the_row_walking_sum_and_norm_candidate_matches_reference(device, dtype, batch, rows, columns, warps):
    from benchmarks._fused_norm_triton import RowTiles, sum_and_norm_rows

    torch_dtype = DTYPES[dtype]
    lora = folded(batch, [1100], dtype=torch_dtype, device=device)
    tokens = lora.shrunk.shape[0]
    hidden, out = (randn(tokens, 1100, dtype=torch_dtype, device=device, seed=s) for s in (0, 1))
    weight = randn(1100, dtype=torch_dtype, device=device, seed=2, scale=0.1) + 1
    got = sum_and_norm_rows(hidden, out, weight, 1e-6, lora, RowTiles(rows, columns, warps))
    for got_part, expected in zip(got, add_rms_norm_reference(hidden, out, weight, 1e-6, lora)):
        assert_matches(got_part, expected, dtype)


def test_folded_readers_refuse_parts_smaller_than_a_dot(device):
    lora = folded("mixed", [72, 72], dtype=torch.float32, device=device)
    gate_up = randn(lora.shrunk.shape[0], 144, dtype=torch.float32, device=device, seed=6)
    with pytest.raises(ValueError, match="at least 16 rows, got 8"):
        kernels().act_mul(gate_up, lora, "silu", kernels().FoldedTiles(rows=8))


def test_folded_readers_refuse_operands_that_do_not_fit(device):
    lora = folded("mixed", [72], dtype=torch.float32, device=device)
    hidden = randn(lora.shrunk.shape[0], 64, dtype=torch.float32, device=device, seed=0)
    with pytest.raises(ValueError, match=r"B\^T of shapes \[\(4, 16, 64\)\]"):
        kernels().add_rms_norm(hidden, hidden.clone(), torch.ones(64, device=device), 1e-6, lora)
