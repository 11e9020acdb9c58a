"""The Triton kernels and the CUDA-graph decode path against their references, on CUDA.

Run on a GPU machine: `python -m pytest -m gpu tests/gpu`.
"""

from __future__ import annotations

import random

import pytest
import torch

from tests.driver import Driver, Request, forward_paths, make_engine, make_resident
from tests.worker.test_multi_lora import mixes, per_token_reference
from worker import graph_step
from worker.batch import NO_ADAPTER, SequenceInput
from worker.kernels.lora_blocks import BLOCK_M, PROMPT_BLOCK_M, lora_blocks
from worker.kernels.paged_attention import (
    attention_blocks,
    decode_attention,
    decode_attention_reference,
    ragged_attention,
    ragged_attention_reference,
)
from worker.kernels.multi_lora import (SPLIT_K_TOKENS, LoraScratch, ModuleDelta, add_lora_delta_reference,
                                      add_lora_deltas, lora_expand, lora_shrink)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@pytest.fixture(scope="module")
def lora_engine(model_dirs, mixed_adapter_dirs):
    engine = make_engine(model_dirs["llama"], device="cuda", max_loras_per_batch=4)
    for slot, (name, path) in zip((1, 3), mixed_adapter_dirs["llama"].items()):  # ranks 8 and 16
        engine.register_adapter(name, path)
        make_resident(engine, name, slot)
    yield engine
    engine.close()


def triton_group_delta(x, weights, token_slots, slot_ranks, block_m=BLOCK_M):
    """The grouped kernels over (a, b_t) per module, each adding into a column range of one fused
    output, over blocks of up to `block_m` tokens; run twice (a graph replays the same launch) to
    check the split-K sums are bitwise repeatable and leave their counters at zero; then once
    storing into NaN-filled outputs, which must give the same in adapted tokens' rows and leave
    base-model tokens' rows unwritten."""
    blocks = torch.from_numpy(lora_blocks(token_slots, slot_ranks, block_m=block_m)).cuda()
    scratch = LoraScratch.allocate(x.shape[0], x.shape[1], weights[0][0].shape[1], weights[0][0].shape[0],
                                   x.dtype, x.device)
    # The kernels read only what they wrote: NaN elsewhere in the scratch would show.
    scratch.shrunk.fill_(float("nan"))
    scratch.partials.fill_(float("nan"))
    widths = [b_t.shape[-1] for _, b_t in weights]
    runs = []
    for _ in range(2):
        outs = torch.zeros(x.shape[0], sum(widths), dtype=x.dtype, device=x.device).split(widths, dim=1)
        add_lora_deltas(x, [ModuleDelta(a, b_t, out) for (a, b_t), out in zip(weights, outs)], blocks, scratch,
                        block_m)
        assert not scratch.counters.any(), "split counters return to zero"
        runs.append(outs)
    assert all(torch.equal(first, second) for first, second in zip(*runs))
    stored = torch.full((x.shape[0], sum(widths)), float("nan"), dtype=x.dtype, device=x.device).split(widths, dim=1)
    lora_shrink(x, [a for a, _ in weights], blocks, scratch, block_m=block_m)
    lora_expand([b_t for _, b_t in weights], stored, blocks, scratch, accumulate=False, block_m=block_m)
    adapted = torch.tensor(token_slots, device=x.device) >= 0
    assert all(torch.equal(s[adapted], r[adapted]) for s, r in zip(stored, runs[0])), "adapted rows are stored"
    assert all(s[~adapted].isnan().all() for s in stored), "base-model rows are not written"
    return runs[0]


@pytest.mark.parametrize("mix", list(mixes(1)))
@pytest.mark.parametrize("group", [("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"),
                                   ("down_proj",)], ids="/".join)
def test_triton_multi_lora_matches_per_token_loop(lora_engine, mix, group):
    """Heterogeneous ranks (8 and 16 in slots of 32), identical/distinct/uniform/skewed mixes,
    modules grouped as the model groups them (output widths not multiples of a tile)."""
    engine = lora_engine
    token_slots = mixes(37)[mix]
    in_features = engine.model_config.module_shapes()[group[0]][0]
    x = torch.randn(len(token_slots), in_features, generator=torch.Generator().manual_seed(1)).cuda()
    slot_ranks = [engine.slots.adapter_rank(s) for s in range(engine.slots.num_slots)]
    for layer in range(engine.model_config.num_layers):
        weights = [(engine.slots.a[m][layer], engine.slots.b_t[m][layer]) for m in group]
        for module, out in zip(group, triton_group_delta(x, weights, token_slots, slot_ranks)):
            expected = per_token_reference(engine, x.cpu(), token_slots, layer, module)
            torch.testing.assert_close(out.cpu().double(), expected, atol=1e-4, rtol=1e-4)


# In -> out features of each module of a group at the Llama-3.1-8B shape.
GROUPS_8B = {"q/k/v": (4096, [4096, 1024, 1024]), "gate/up": (4096, [14336, 14336]), "down": (14336, [4096])}


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("mix", ["identical", "distinct", "uniform", "skewed"])
@pytest.mark.parametrize("tokens", [5, 100, 600, 1500], ids=["decode-5", "decode-100", "prefill-600", "prefill-1500"])
@pytest.mark.parametrize("block_m", [BLOCK_M, PROMPT_BLOCK_M], ids=["decode-blocks", "prompt-blocks"])
@pytest.mark.parametrize("group", list(GROUPS_8B))
def test_triton_multi_lora_groups_at_8b_sizes(dtype, mix, tokens, block_m, group):
    """8 slots, ranks 8..256 (rows past each rank zero, as slots keep them); the launch shapes of
    decode steps and of steps carrying a prompt (wider blocks), split-K up to SPLIT_K_TOKENS
    tokens and unsplit past it; each module of the group adds into its column range of one
    fused output."""
    rng = random.Random(3)
    choices = {"identical": lambda: 5, "distinct": lambda: rng.randrange(8), "uniform": lambda: rng.randrange(-1, 8),
               "skewed": lambda: rng.choices(range(8), weights=[8, 1, 1, 1, 1, 1, 1, 1])[0]}
    token_slots = sorted(choices[mix]() for _ in range(tokens))
    assert_group_matches_reference(DTYPES[dtype], group, token_slots, [16, 256, 64, 32, 256, 128, 8, 256], block_m)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("group", list(GROUPS_8B))
def test_low_rank_slots_in_a_step_carrying_a_prompt(dtype, group):
    """Slots of rank <= LOW_RANK with prompt-sized blocks (the split-K shape of
    `PROMPT_SHRINK_LOW_RANK`, which the 8B test's rank-256 buffers never choose): one-token
    decode blocks beside a prompt's full blocks and its last one of 17 tokens."""
    token_slots = sorted([NO_ADAPTER] * 3 + list(range(8)) + [5] * 400)
    assert_group_matches_reference(DTYPES[dtype], group, token_slots, [16, 8, 16, 4, 16, 16, 8, 16], PROMPT_BLOCK_M)


def assert_group_matches_reference(dtype: torch.dtype, group: str, token_slots: list[int], ranks: list[int],
                                   block_m: int) -> None:
    """The grouped kernels (`triton_group_delta`) against the per-token product in float64; slot
    buffers as wide as the largest rank, rows past each slot's rank zero (as slots keep them)."""
    max_rank = max(ranks)
    in_features, out_features = GROUPS_8B[group]
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(len(token_slots), in_features, device="cuda", generator=gen, dtype=dtype)
    weights = []
    for width in out_features:
        a = torch.randn(8, max_rank, in_features, device="cuda", generator=gen, dtype=dtype) * 0.02
        for slot, rank in enumerate(ranks):
            a[slot, rank:] = 0
        weights.append((a, torch.randn(8, max_rank, width, device="cuda", generator=gen, dtype=dtype) * 0.02))
    outs = triton_group_delta(x, weights, token_slots, ranks, block_m)
    tolerance = 1e-3 if dtype == torch.float32 else 3e-2
    for (a, b_t), out in zip(weights, outs):
        expected = torch.zeros_like(out, dtype=torch.float64)
        add_lora_delta_reference(expected, x.double(), a.double(), b_t.double(),
                                 torch.tensor(token_slots, device="cuda"), max_rank)
        torch.testing.assert_close(out.double(), expected, atol=tolerance, rtol=tolerance)


SOFTCAP = 2.0  # Gemma 2's attention logit soft-capping, low enough to bend unit-variance scores

DECODE_LENGTHS = {  # page-table width in pages, sequence lengths (0: a padding row)
    "short": (32, [0, 1, 15, 16, 17, 64, 65, 200, 333]),
    "long": (256, [0, 1, 17, 1000, 2049, 4095, 4096]),  # 4096 keys: 64 blocks, one per split at splits=64
}


def decode_case(dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int, lengths: str):
    page_size = 16
    width, seq_lens = DECODE_LENGTHS[lengths]
    num_pages = width * 3
    gen = torch.Generator(device="cuda").manual_seed(0)
    keys = torch.randn(num_pages * page_size, kv_heads, head_dim, device="cuda", generator=gen, dtype=dtype)
    values = torch.randn_like(keys)
    q = torch.randn(len(seq_lens), heads, head_dim, device="cuda", generator=gen, dtype=dtype)
    pages = torch.randperm(num_pages, generator=torch.Generator().manual_seed(1))
    page_table = torch.stack([pages[(i * 8) % (num_pages - width):][:width] for i in range(len(seq_lens))]).cuda()
    return q, keys, values, page_table, torch.tensor(seq_lens, device="cuda"), page_size


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(32, 8, 128), (4, 4, 64), (8, 2, 16)])
@pytest.mark.parametrize("window", [0, 37, 300])
@pytest.mark.parametrize("lengths", list(DECODE_LENGTHS))
@pytest.mark.parametrize("splits", [None, 1, 5, 8, 64])
@pytest.mark.parametrize("softcap", [0.0, SOFTCAP])
def test_triton_decode_attention_matches_reference(dtype, heads, kv_heads, head_dim, window, lengths, splits,
                                                   softcap):
    """splits None: the shape heuristic (what `decode_attention` runs); 1: the one-pass kernel; 8: two warps
    (`decode_warps`); 64: many empty."""
    from worker.kernels import _paged_attention_triton as kernels

    q, keys, values, page_table, lens, page_size = decode_case(DTYPES[dtype], heads, kv_heads, head_dim, lengths)
    scale = head_dim**-0.5
    if splits is None:
        out = decode_attention(q, keys, values, page_table, lens, page_size, scale, window, softcap)
    else:
        out = kernels.decode_attention(q, keys, values, page_table, lens, page_size, scale, window, softcap,
                                       splits=splits)
    expected = decode_attention_reference(q.double(), keys.double(), values.double(), page_table, lens,
                                          page_size, scale, window, softcap)
    tolerance = 1e-4 if dtype == "float32" else 2e-2
    torch.testing.assert_close(out.double(), expected, atol=tolerance, rtol=tolerance)
    assert not out[0].any(), "a padding row (length 0) gives zeros"


def test_triton_decode_attention_replays_in_a_cuda_graph():
    """Captured at one set of lengths (splits from the shapes), replayed at others, shorter and longer."""
    q, keys, values, page_table, lens, page_size = decode_case(torch.bfloat16, 32, 8, 128, "long")
    static_lens = lens.clone()
    decode_attention(q, keys, values, page_table, static_lens, page_size, 0.1, 0)  # compiles outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = decode_attention(q, keys, values, page_table, static_lens, page_size, 0.1, 0)
    for new_lens in ([0, 4096, 1, 63, 64, 2000, 0], [3000, 0, 0, 16, 4095, 1, 129], lens.tolist()):
        static_lens.copy_(torch.tensor(new_lens))
        graph.replay()
        expected = decode_attention_reference(q.double(), keys.double(), values.double(), page_table, static_lens,
                                              page_size, 0.1, 0)
        torch.testing.assert_close(out.double(), expected, atol=2e-2, rtol=2e-2)


def sleep_on_current_stream(milliseconds: float) -> None:
    torch.cuda._sleep(int(milliseconds * 1e-3 * torch.cuda.clock_rate() * 1e6))


def decode_requests() -> list[Request]:
    gen = torch.Generator().manual_seed(5)
    lengths = [13, 23, 3, 6, 9, 40, 17]
    slots = [-1, 2, 0, 2, 0, 2, -1]
    return [Request(f"r{i}", torch.randint(3, 200, (n,), generator=gen).tolist(), adapter_slot=s, max_new_tokens=10)
            for i, (n, s) in enumerate(zip(lengths, slots))]


@pytest.mark.parametrize("arch", ["llama3", "mistral", "qwen3", "phi3"])
def test_cuda_graph_decode_matches_eager_while_another_slot_loads(arch, model_dirs, mixed_adapter_dirs):
    """fp32: the same tokens and logits as the eager path, with a load landing in slot 1 meanwhile."""
    runs = {}
    for static in (False, True):
        engine = make_engine(model_dirs[arch], device="cuda", static_decode=static)
        adapters = list(mixed_adapter_dirs[arch].items())
        for slot, (name, path) in zip((2, 0), adapters):
            engine.register_adapter(name, path)
            make_resident(engine, name, slot)
        engine.register_adapter("late", adapters[1][1])
        engine.stage_adapter("late")
        engine.wait_staged("late")
        engine.copier.hook = lambda name, slot, layer: sleep_on_current_stream(100) if layer == 0 else None
        engine.load_adapter("late", 1)
        requests = decode_requests()
        Driver(engine, chunk=64).run(requests)
        if static:
            assert engine.graph_runner.graphs_captured > 0
        runs[static] = requests
        engine.poll()
        engine.close()
    for eager, graphed in zip(runs[False], runs[True]):
        assert graphed.generated == eager.generated, graphed.request_id
        torch.testing.assert_close(graphed.all_logits(), eager.all_logits(), atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("arch", ["llama3", "mistral", "qwen3", "phi3"])
def test_steps_reading_a_landing_adapter_replay_per_layer_graphs_and_match_eager(arch, model_dirs,
                                                                                 mixed_adapter_dirs):
    """fp32: requests on an adapter whose copy is held back 100 ms start at once; their first
    step replays a graph per layer with the waits between, and gives the eager path's tokens
    and logits."""
    runs = {}
    for static in (False, True):
        engine = make_engine(model_dirs[arch], device="cuda", static_decode=static)
        (resident, resident_path), (late, late_path) = mixed_adapter_dirs[arch].items()
        engine.register_adapter(resident, resident_path)
        make_resident(engine, resident, 2)
        engine.register_adapter(late, late_path)
        engine.stage_adapter(late)
        engine.wait_staged(late)
        engine.copier.hook = lambda name, slot, layer: sleep_on_current_stream(100) if layer == 0 else None
        engine.load_adapter(late, 0)
        requests = decode_requests()
        Driver(engine, chunk=64).run(requests)
        if static:
            assert engine.graph_runner.layered_graphs_captured == 1
            paths = forward_paths(engine)
            assert paths[0] == "static-waiting" and set(paths[1:]) == {"static"}, paths
        runs[static] = requests
        engine.close()
    for eager, graphed in zip(runs[False], runs[True]):
        assert graphed.generated == eager.generated, graphed.request_id
        torch.testing.assert_close(graphed.all_logits(), eager.all_logits(), atol=1e-3, rtol=1e-3)


def test_static_steps_run_lora_on_the_side_stream(model_dirs, mixed_adapter_dirs, monkeypatch):
    """Every adapted group's LoRA kernels are launched on the side stream (beside the base GEMM),
    in every layer: shrink and expand for a decode step, the shrink alone for a prefill too large
    to stage its deltas (its expand adds into the GEMM's output on the step's stream). The
    tokens are checked by the tests above."""
    engine = make_engine(model_dirs["llama3"], device="cuda", cuda_graphs=False, num_kv_pages=512)
    for slot, (name, path) in zip((2, 0), mixed_adapter_dirs["llama3"].items()):
        engine.register_adapter(name, path)
        make_resident(engine, name, slot)
    launches = []

    def recorded(kernel: str, original):
        def launch(*args, **kwargs):
            launches.append((kernel, torch.cuda.current_stream()))
            return original(*args, **kwargs)
        return launch

    for kernel in ("lora_shrink", "lora_expand"):
        monkeypatch.setattr(graph_step, kernel, recorded(kernel, getattr(graph_step, kernel)))
    side, main = engine.graph_runner._lora_stream, torch.cuda.current_stream()
    groups = 4 * engine.model_config.num_layers  # qkv, o, gate/up, down
    engine.forward([SequenceInput("r", [5], 3, [0], adapter_slot=2)])
    assert launches == [("lora_shrink", side), ("lora_expand", side)] * groups
    launches.clear()
    prompt = SPLIT_K_TOKENS + 44
    engine.forward([SequenceInput("p", [7] * prompt, 0, list(range(1, 2 + prompt // 4)), adapter_slot=0)])
    assert launches == [("lora_shrink", side), ("lora_expand", main)] * groups
    engine.close()


def test_cuda_graph_decode_bfloat16_first_steps_match_eager(model_dirs, mixed_adapter_dirs):
    """bf16: logits of every step agree with the eager path within bf16 tolerance until a token differs."""
    runs = {}
    for static in (False, True):
        engine = make_engine(model_dirs["llama3"], device="cuda", dtype="bfloat16", static_decode=static)
        for slot, (name, path) in zip((2, 0), mixed_adapter_dirs["llama3"].items()):
            engine.register_adapter(name, path)
            make_resident(engine, name, slot)
        requests = decode_requests()
        Driver(engine, chunk=64).run(requests)
        runs[static] = requests
        engine.close()
    for eager, graphed in zip(runs[False], runs[True]):
        agree = next((i for i, (a, b) in enumerate(zip(eager.generated, graphed.generated)) if a != b),
                     len(eager.generated))
        assert agree >= 1, eager.request_id
        rows = len(eager.prompt) + agree  # rows whose inputs (prompt + generated[:agree]) are identical
        torch.testing.assert_close(graphed.all_logits()[:rows].float(), eager.all_logits()[:rows].float(),
                                   atol=0.1, rtol=0.05)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(32, 8, 128), (8, 2, 16)])
@pytest.mark.parametrize("window", [0, 37])
@pytest.mark.parametrize("softcap", [0.0, SOFTCAP])
def test_triton_ragged_attention_matches_reference(dtype, heads, kv_heads, head_dim, window, softcap):
    """Prefill chunks (fresh and continued) and decodes in one flat batch, padding tokens after."""
    page_size, num_pages = 16, 128
    sequences = [(0, 100), (20, 1), (5, 3), (200, 1), (64, 70), (0, 1)]  # (context, new tokens)
    gen = torch.Generator(device="cuda").manual_seed(0)
    keys = torch.randn(num_pages * page_size, kv_heads, head_dim, device="cuda", generator=gen, dtype=DTYPES[dtype])
    values = torch.randn_like(keys)
    page_table = torch.stack([torch.randperm(num_pages, generator=torch.Generator().manual_seed(i))[:20]
                              for i in range(len(sequences))]).cuda()
    token_rows = [row for row, (_, n) in enumerate(sequences) for _ in range(n)] + [-1] * 9
    positions = [p for context, n in sequences for p in range(context, context + n)] + [0] * 9
    token_rows, positions = torch.tensor(token_rows, device="cuda"), torch.tensor(positions, device="cuda")
    q = torch.randn(len(token_rows), heads, head_dim, device="cuda", generator=gen, dtype=DTYPES[dtype])
    blocks = torch.from_numpy(attention_blocks([n for _, n in sequences], 32)).cuda()
    scale = head_dim**-0.5
    out = ragged_attention(q, keys, values, page_table, blocks, positions, 16, scale, window, softcap)
    expected = ragged_attention_reference(q.double(), keys.double(), values.double(), page_table, token_rows,
                                          positions, page_size, scale, window, softcap)
    tolerance = 1e-4 if dtype == "float32" else 2e-2
    torch.testing.assert_close(out.double(), expected, atol=tolerance, rtol=tolerance)
    assert not out[-9:].any(), "padding tokens give zeros"


@pytest.mark.parametrize("arch", ["llama3", "mistral", "qwen3", "phi3"])
def test_cuda_graph_mixed_steps_match_eager(arch, model_dirs, mixed_adapter_dirs):
    """static_mixed: prompts fed 5 tokens a step (prefill chunks beside decodes) replayed from graphs, fp32."""
    runs = {}
    for static in (False, True):
        engine = make_engine(model_dirs[arch], device="cuda", static_decode=static, static_mixed=static)
        for slot, (name, path) in zip((2, 0), mixed_adapter_dirs[arch].items()):
            engine.register_adapter(name, path)
            make_resident(engine, name, slot)
        requests = decode_requests()
        Driver(engine, chunk=5).run(requests)
        if static:
            assert any(shape.mixed for shape, _dora in engine.graph_runner._graphs)
        runs[static] = requests
        engine.close()
    for eager, graphed in zip(runs[False], runs[True]):
        assert graphed.generated == eager.generated, graphed.request_id
        torch.testing.assert_close(graphed.all_logits(), eager.all_logits(), atol=1e-3, rtol=1e-3)
