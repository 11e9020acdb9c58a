"""Steps on fixed-size buffers (worker.graph_step) against the eager path.

On CPU the static path runs the torch reference kernels without CUDA graphs; these tests
hold its buffer logic (padding, buckets, page tables, block tables, scratch writes) to the
eager forward. tests/gpu holds the Triton kernels and the captured graphs to the same.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from tests.driver import Driver, Request, make_engine, make_resident
from tests.model_factory import ARCHITECTURES
from worker import graph_step
from worker.batch import NO_ADAPTER, SequenceInput
from worker.graph_step import BATCH_BUCKETS, MIN_PAGE_BUCKET, decode_shape, mixed_shape


def prompt(seed: int, length: int) -> list[int]:
    return torch.randint(3, 200, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def engine_with_adapters(model_dir, adapters, **overrides):
    engine = make_engine(model_dir, **overrides)
    for slot, (name, path) in zip((2, 0), adapters.items()):
        engine.register_adapter(name, path)
        make_resident(engine, name, slot)
    return engine


def mixed_requests() -> list[Request]:
    # Lengths cross the sliding window (mistral) and page boundaries; prompts of different
    # lengths so the batch decodes at different positions; 5 sequences pad to a bucket of 8.
    return [
        Request("base", prompt(1, 13), adapter_slot=NO_ADAPTER, max_new_tokens=12),
        Request("a0-long", prompt(2, 23), adapter_slot=2, max_new_tokens=12),
        Request("a1", prompt(3, 3), adapter_slot=0, max_new_tokens=12),
        Request("a0-short", prompt(4, 6), adapter_slot=2, max_new_tokens=12),
        Request("a1-b", prompt(5, 9), adapter_slot=0, max_new_tokens=12),
    ]


def paths_used(engine, *, decode_only: bool) -> set[str]:
    """The forward paths the timeline recorded for decode-only steps (or for steps with a prefill chunk)."""
    return {event["args"]["path"] for event in engine.timeline.chrome_trace()
            if event.get("ph") == "X" and event.get("name") == "forward"
            and (event["args"]["tokens"] == event["args"]["sequences"]) == decode_only}


@pytest.mark.parametrize("mixed", [False, True], ids=["decodes", "mixed"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_static_decode_matches_eager_forward(arch, mixed, model_dirs, mixed_adapter_dirs):
    """Same requests through both paths: identical tokens, logits equal to float32 rounding.
    `mixed`: prompts fed 5 tokens at a time, so steps mix prefill chunks with decodes."""
    runs = {}
    for static in (False, True):
        engine = engine_with_adapters(model_dirs[arch], mixed_adapter_dirs[arch], static_decode=static,
                                      static_mixed=mixed)
        requests = mixed_requests()
        Driver(engine, chunk=5 if mixed else 64).run(requests)
        runs[static] = requests
        if static:
            assert engine.graph_runner is not None
            assert paths_used(engine, decode_only=True) == {"static"}
            assert paths_used(engine, decode_only=False) == ({"static"} if mixed else {"eager"})
        engine.close()
    for eager, static in zip(runs[False], runs[True]):
        assert static.generated == eager.generated, static.request_id
        torch.testing.assert_close(static.all_logits(), eager.all_logits(), atol=2e-4, rtol=1e-4)


def test_a_step_in_which_no_token_has_an_adapter_launches_no_lora_kernel(model_dirs, mixed_adapter_dirs,
                                                                        monkeypatch):
    """Base-model requests beside resident adapters: the static path skips every LoRA kernel
    (an empty block table would still launch them), and its logits stay the eager path's."""
    launched = []
    reference = graph_step.add_lora_delta_reference
    monkeypatch.setattr(graph_step, "add_lora_delta_reference",
                        lambda *args, **kwargs: launched.append(1) or reference(*args, **kwargs))
    runs = {}
    for static in (False, True):
        engine = engine_with_adapters(model_dirs["llama"], mixed_adapter_dirs["llama"], static_decode=static,
                                      static_mixed=static)
        requests = [Request(f"base{i}", prompt(10 + i, 7 + 4 * i), adapter_slot=NO_ADAPTER, max_new_tokens=6)
                    for i in range(3)]
        Driver(engine, chunk=5).run(requests)
        runs[static] = requests
        engine.close()
    assert launched == []
    for eager, static in zip(runs[False], runs[True]):
        assert static.generated == eager.generated, static.request_id
        torch.testing.assert_close(static.all_logits(), eager.all_logits(), atol=2e-4, rtol=1e-4)
    engine = engine_with_adapters(model_dirs["llama"], mixed_adapter_dirs["llama"], static_mixed=True)
    engine.forward([SequenceInput("a", [5, 6], context_len=0, page_table=[0], adapter_slot=2)])
    assert launched, "a step with an adapted token launched no LoRA kernel"
    engine.close()


def test_padding_rows_write_only_the_scratch_row(model_dirs, mixed_adapter_dirs):
    engine = engine_with_adapters(model_dirs["llama"], mixed_adapter_dirs["llama"])
    requests = mixed_requests()[:3]  # 3 sequences pad to a bucket of 4
    driver = Driver(engine, chunk=64)
    driver.step(requests)  # prefills (eager)
    positions = {r.request_id: r.fed for r in requests}  # where the decode step writes
    before = engine.kv_cache.memory.clone()
    driver.step(requests)  # one static decode step
    changed = (engine.kv_cache.memory != before).any(dim=(0, 1, 3, 4)).nonzero().flatten().tolist()
    page_size = engine.config.page_size
    written = {r.pages[positions[r.request_id] // page_size] * page_size + positions[r.request_id] % page_size
               for r in requests}
    assert written <= set(changed) <= written | {engine.kv_cache.scratch_index}
    engine.close()


@pytest.mark.parametrize("mixed", [False, True], ids=["decode-graphs", "mixed-graphs"])
def test_a_step_reading_a_landing_adapter_waits_per_layer_and_the_steps_after_it_do_not(
        model_dirs, mixed_adapter_dirs, mixed, monkeypatch):
    """A step that reads a slot still being copied waits before each layer (on CUDA between
    its per-layer graphs); a step queued after it on the stream is ordered behind those waits
    and takes the one-graph path. Prefill chunks take the static path only with static_mixed."""
    engine = engine_with_adapters(model_dirs["llama"], mixed_adapter_dirs["llama"], static_mixed=mixed)
    decode = SequenceInput("d", [5], context_len=3, page_table=[0], adapter_slot=2)
    prefill = SequenceInput("p", [5, 6], context_len=0, page_table=[1], adapter_slot=0)
    runner = engine.graph_runner
    assert runner.supports([decode]) and runner.supports([decode, prefill]) == mixed
    landing, waits = SimpleNamespace(slot=2), []
    monkeypatch.setattr(engine.copier, "wait_layer", lambda job, layer: waits.append((job, layer)))
    engine.pending[2] = landing  # a load in flight into the decode's slot
    engine.forward([decode])
    assert waits == [(landing, layer) for layer in range(engine.model_config.num_layers)]
    assert paths_used(engine, decode_only=True) == {"static-waiting"}
    engine.forward([decode])
    assert len(waits) == engine.model_config.num_layers, "the second step waited again"
    assert paths_used(engine, decode_only=True) == {"static-waiting", "static"}
    del engine.pending[2]
    engine.close()


def test_a_new_load_into_a_slot_is_waited_on_again(model_dirs, mixed_adapter_dirs, monkeypatch):
    engine = engine_with_adapters(model_dirs["llama"], mixed_adapter_dirs["llama"])
    decode = SequenceInput("d", [5], context_len=3, page_table=[0], adapter_slot=2)
    waits = []
    monkeypatch.setattr(engine.copier, "wait_layer", lambda job, layer: waits.append(job))
    engine.pending[2] = SimpleNamespace(slot=2)
    engine.forward([decode])
    del engine.pending[2]
    name = engine.slots.occupants[2]
    engine.evict_slot(2)
    engine.load_adapter(name, 2)
    job = engine.pending[2]
    engine.forward([decode])
    layers = engine.model_config.num_layers
    assert waits[layers:] == [job] * layers
    engine.close()


def test_shapes_round_up_to_buckets():
    assert decode_shape(1, 1) == decode_shape(1, MIN_PAGE_BUCKET)
    assert decode_shape(5, 9) == decode_shape(5, MIN_PAGE_BUCKET)
    assert decode_shape(5, MIN_PAGE_BUCKET + 1).pages == 4 * MIN_PAGE_BUCKET
    assert decode_shape(5, 9).tokens == decode_shape(5, 9).seqs == 8
    assert decode_shape(BATCH_BUCKETS[-1], 64).tokens == BATCH_BUCKETS[-1]
    assert all(decode_shape(n, 1).tokens >= n for n in range(1, BATCH_BUCKETS[-1] + 1))
    assert mixed_shape(65, 256, 1).tokens == 128 and mixed_shape(65, 256, 1).seqs == 128
    assert mixed_shape(3000, 256, 1).seqs == 256 and mixed_shape(3000, 256, 1).mixed

