"""The engine on CUDA: equivalence with PEFT, real asynchronous loads, and overlap.

Run on a GPU machine: `python -m pytest -m gpu tests/gpu -s` (figures are printed).
"""

from __future__ import annotations

import json
import time

import pytest
import torch

from tests.driver import Driver, Request, make_engine, make_resident
from tests.model_factory import ARCHITECTURES
from tests.oracle import PeftOracle
from loraserve.synthetic import write_random_adapter
from worker.batch import SequenceInput
from worker.lora.copier import LoadJob

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
ALL_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TOLERANCE = {"float32": 1e-3, "bfloat16": 0.06}


def prompt(seed: int, length: int) -> list[int]:
    return torch.randint(3, 200, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def cuda_engine(model_dir, **overrides):
    return make_engine(model_dir, device="cuda", **overrides)


def sleep_on_current_stream(milliseconds: float) -> None:
    """Keeps the current stream busy (spin kernel), so later work on it is queued behind."""
    torch.cuda._sleep(int(milliseconds * 1e-3 * torch.cuda.clock_rate() * 1e6))


@pytest.mark.parametrize("fold", [False, True], ids=["kernels", "folded"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_mixed_batch_with_async_loads_matches_peft(arch, dtype, fold, model_dirs, mixed_adapter_dirs):
    """Loads still landing (the load stream is held back) when the mixed batch starts; with the LoRA
    kernels, or folded into the base GEMMs and their readers (`--lora-fold`)."""
    engine = cuda_engine(model_dirs[arch], dtype=dtype, lora_fold=fold, max_lora_rank=16 if fold else 32)
    adapters = mixed_adapter_dirs[arch]
    engine.copier.hook = lambda name, slot, layer: sleep_on_current_stream(20) if layer == 0 else None
    for slot, (name, path) in zip((2, 0), adapters.items()):
        engine.register_adapter(name, path)
        engine.stage_adapter(name)
        engine.wait_staged(name)
        engine.load_adapter(name, slot)
    assert engine.pending, "loads should still be in flight"
    requests = [
        Request("base", prompt(3, 17), adapter_slot=-1, max_new_tokens=6),
        Request("a0-long", prompt(4, 26), adapter_slot=2, max_new_tokens=4),
        Request("a1", prompt(5, 4), adapter_slot=0, max_new_tokens=9),
        Request("a0-short", prompt(6, 9), adapter_slot=2, max_new_tokens=7),
    ]
    Driver(engine, chunk=5).run(requests)
    oracle = PeftOracle(model_dirs[arch], adapters)
    names = {2: "a0", 0: "a1", -1: None}
    atol = TOLERANCE[dtype]
    for request in requests:
        adapter = names[request.adapter_slot]
        expected = oracle.logits(request.tokens[:-1], adapter)
        torch.testing.assert_close(request.all_logits(), expected, atol=atol, rtol=0 if dtype == "float32" else 0.05)
        oracle.assert_teacher_forced(request.prompt, request.generated, adapter, atol=atol)
    engine.close()


def test_copy_waits_for_the_forward_reading_the_slot(model_dirs, mixed_adapter_dirs):
    """Hazard 2: a copy queued behind a busy compute stream must not overwrite what it reads."""
    engine = cuda_engine(model_dirs["llama"], max_loras_per_batch=1)
    for name, path in mixed_adapter_dirs["llama"].items():
        engine.register_adapter(name, path)
    make_resident(engine, "a0", 0)
    a0_weights = engine.slots.a["q_proj"][0, 0, :8].clone()
    engine.stage_adapter("a1")
    a1 = engine.host_cache.wait("a1")
    with engine.copier.reading([0]):
        sleep_on_current_stream(50)
        seen_by_reader = engine.slots.a["q_proj"][0, 0, :8].clone()
    job = LoadJob("a1", 0, a1, a1.nbytes)
    engine.copier.start(job)
    engine.copier.wait(job)
    torch.testing.assert_close(seen_by_reader, a0_weights, atol=0, rtol=0)
    assert not torch.equal(engine.slots.a["q_proj"][0, 0, :8], a0_weights)
    engine.close()


def test_a_slot_reloaded_while_a_forward_reading_it_runs_leaves_that_forward_intact(model_dirs, mixed_adapter_dirs):
    """The worker evicts and loads a slot while the forward it launched last still runs (it does
    not wait for that forward's tokens): the forward must still see the old adapter."""
    engine = cuda_engine(model_dirs["llama"], max_loras_per_batch=1)
    for name, path in mixed_adapter_dirs["llama"].items():
        engine.register_adapter(name, path)
        engine.stage_adapter(name)
        engine.wait_staged(name)
    make_resident(engine, "a0", 0)
    tokens = prompt(7, 12)
    pages = list(range(-(-len(tokens) // engine.config.page_size)))
    expected = engine.forward([SequenceInput("ref", tokens, 0, pages, adapter_slot=0)], return_logits=True).logits["ref"]
    sleep_on_current_stream(50)  # the forward queues behind this, so the copy would overtake it if let
    pending = engine.launch([SequenceInput("r", tokens, 0, pages, adapter_slot=0)], return_logits=True)
    engine.evict_slot(0)
    engine.load_adapter("a1", 0)
    seen = engine.finish(pending).logits["r"]
    torch.testing.assert_close(seen, expected, atol=0, rtol=0)
    while engine.pending:
        engine.poll()
    reloaded = engine.forward([SequenceInput("a1", tokens, 0, pages, adapter_slot=0)], return_logits=True).logits["a1"]
    assert not torch.allclose(reloaded, expected)
    engine.close()


def test_load_on_the_side_stream_overlaps_forwards(tmp_path):
    """Timestamps from CUDA events: a large adapter copy runs while forwards run."""
    model_dir = tmp_path / "mid"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048,
        "intermediate_size": 8192, "num_hidden_layers": 8, "num_attention_heads": 16,
        "num_key_value_heads": 4, "vocab_size": 32000, "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "torch_dtype": "bfloat16",
    }))
    engine = make_engine(model_dir, device="cuda", dtype="bfloat16", load_format="dummy", page_size=16,
                         num_kv_pages=512, max_loras_per_batch=2, max_lora_rank=256, host_cache_bytes=2 << 30)
    adapter_dir = write_random_adapter(tmp_path / "big", engine.model_config, rank=256, alpha=512,
                                       modules=ALL_MODULES)
    info = engine.register_adapter("big", adapter_dir)
    engine.stage_adapter("big")
    engine.wait_staged("big")
    batch = [SequenceInput(f"r{i}", prompt(i, 512), 0, list(range(i * 32, i * 32 + 32))) for i in range(4)]
    engine.forward(batch)  # warm-up
    torch.cuda.synchronize()

    forward_events = []
    engine.load_adapter("big", 0)
    job = engine.pending[0]
    for _ in range(6):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        engine.forward(batch)
        end.record()
        forward_events.append((start, end))
    engine.copier.wait(job)
    torch.cuda.synchronize()

    origin = forward_events[0][0]
    load_start = origin.elapsed_time(job.copy_started)
    load_end = origin.elapsed_time(job.layer_ready[-1])
    intervals = [(origin.elapsed_time(s), origin.elapsed_time(e)) for s, e in forward_events]
    overlapping = [iv for iv in intervals if iv[0] < load_end and load_start < iv[1]]
    copy_ms = load_end - load_start
    print(f"\nadapter {info.nbytes / 1e6:.0f} MB copied in {copy_ms:.2f} ms "
          f"({info.nbytes / copy_ms / 1e6:.1f} GB/s) from {load_start:.2f} to {load_end:.2f} ms; "
          f"forwards (ms): {[(round(a, 2), round(b, 2)) for a, b in intervals]}")
    assert overlapping, "no forward ran while the adapter was being copied"
    report = engine.poll()
    assert report.loaded == [("big", 0)]
    assert report.copy_seconds["big"] == pytest.approx(copy_ms / 1e3), "the scheduler learns copies' bandwidth from this"
    engine.close()


def test_blocking_load_then_forward_matches_async(model_dirs, mixed_adapter_dirs):
    """The blocking baseline and the asynchronous path give the same outputs on CUDA."""
    outputs = []
    for blocking in (True, False):
        engine = cuda_engine(model_dirs["qwen3"])
        engine.register_adapter("a1", mixed_adapter_dirs["qwen3"]["a1"])
        engine.stage_adapter("a1")
        engine.wait_staged("a1")
        started = time.perf_counter()
        engine.load_adapter("a1", 1, blocking=blocking)
        if blocking:
            assert engine.copier.is_done(engine.pending[1])
        request = Request("r", prompt(1, 12), adapter_slot=1, max_new_tokens=5)
        Driver(engine).run([request])
        outputs.append((request.generated, request.all_logits()))
        print(f"\nblocking={blocking}: load + generation {time.perf_counter() - started:.3f} s")
        engine.close()
    assert outputs[0][0] == outputs[1][0]
    torch.testing.assert_close(outputs[0][1], outputs[1][1], atol=1e-4, rtol=0)
