"""Loads that stream from disk: each layer is copied once the reader has it, a request runs
before the whole file is read, and a read that fails part way fails only that load.

The engines run the eager path (the one a batch with a landing slot takes), so a streamed
load and a staged one compute exactly the same thing.
"""

from __future__ import annotations

import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from tests.driver import Driver, Request, make_engine, make_resident
from worker.engine import LoadReport
from worker.errors import AdapterStateError, CorruptAdapterError
from worker.lora.adapter import WEIGHTS_FILE

WAIT_S = 10  # bounds every wait on another thread, so a broken ordering fails instead of hanging


def eager_engine(model_dir, **overrides):
    return make_engine(model_dir, static_decode=False, **overrides)


def prompt(length: int) -> list[int]:
    return torch.randint(3, 200, (length,), generator=torch.Generator().manual_seed(length)).tolist()


def generate(engine, slot: int, request_id: str = "r") -> Request:
    request = Request(request_id, prompt(9), adapter_slot=slot, max_new_tokens=3)
    Driver(engine, chunk=4).run([request])
    return request


def staged_reference(model_dir, adapter_dir, **overrides) -> Request:
    engine = eager_engine(model_dir, **overrides)
    engine.register_adapter("a1", adapter_dir)
    make_resident(engine, "a1", 0)
    request = generate(engine, 0)
    engine.close()
    return request


def assert_same_outputs(request: Request, reference: Request, atol: float = 0.0) -> None:
    assert request.generated == reference.generated
    torch.testing.assert_close(request.all_logits(), reference.all_logits(), atol=atol, rtol=0)


def settle(engine) -> LoadReport:
    """Polls until no staging or load is in flight; everything the polls reported."""
    report = LoadReport()
    deadline = time.monotonic() + WAIT_S
    while engine.busy_loading and time.monotonic() < deadline:
        polled = engine.poll()
        report.staged.extend(polled.staged)
        report.loaded.extend(polled.loaded)
        report.failed.extend(polled.failed)
        time.sleep(0.001)
    assert not engine.busy_loading
    return report


def start_load_failing_at_layer_1(engine, name: str, adapter_dir, slot: int) -> None:
    """Registers `name` and starts its streamed load into `slot`; the read fails at layer 1."""
    engine.register_adapter(name, adapter_dir)

    def fail_layer_1(_: str, layer: int) -> None:
        if layer == 1:
            raise OSError("the disk went away")

    engine.host_cache.read_hook = fail_layer_1
    engine.stage_adapter(name)
    engine.load_adapter(name, slot)


def test_a_layers_copy_waits_for_its_read_and_starts_before_the_file_is_read(model_dirs, mixed_adapter_dirs):
    engine = eager_engine(model_dirs["llama"])
    engine.register_adapter("a1", mixed_adapter_dirs["llama"]["a1"])
    last = engine.model_config.num_layers - 1
    first_layer_copied = threading.Event()
    copies: list[tuple[int, int]] = []  # (layer copied, layers read by then)

    def read(name: str, layer: int) -> None:
        if layer == last:  # the last layer is not read until layer 0 has landed in the slot
            assert first_layer_copied.wait(WAIT_S), "layer 0 was not copied while the file was being read"

    def copied(name: str, slot: int, layer: int) -> None:
        copies.append((layer, engine.host_cache.entries[name].progress.layers_read))
        first_layer_copied.set()

    engine.host_cache.read_hook = read
    engine.copier.hook = copied
    engine.stage_adapter("a1")
    engine.load_adapter("a1", 0)  # while the reader runs: the load streams
    assert settle(engine) == LoadReport(staged=["a1"], loaded=[("a1", 0)])
    assert copies == [(0, 1), (1, 2)]
    engine.close()


def test_a_request_starts_before_its_adapter_is_read_and_matches_a_staged_load(model_dirs, mixed_adapter_dirs):
    model_dir, adapter_dir = model_dirs["llama"], mixed_adapter_dirs["llama"]["a1"]
    reference = staged_reference(model_dir, adapter_dir)
    engine = eager_engine(model_dir)
    engine.register_adapter("a1", adapter_dir)
    num_layers = engine.model_config.num_layers
    last_layer_released = threading.Event()
    engine.host_cache.read_hook = lambda name, layer: layer < num_layers - 1 or last_layer_released.wait(WAIT_S)
    layers_read_when_layer_0_ran: list[int] = []
    layer_0_ran = threading.Event()
    wait_layer = engine.copier.wait_layer

    def recording_wait_layer(job, layer: int) -> None:
        wait_layer(job, layer)
        if layer == 0 and not layer_0_ran.is_set():
            layers_read_when_layer_0_ran.append(job.adapter.progress.layers_read)
            layer_0_ran.set()

    engine.copier.wait_layer = recording_wait_layer
    engine.stage_adapter("a1")
    engine.load_adapter("a1", 0)
    with ThreadPoolExecutor(1) as pool:  # the CPU forward runs in its caller's thread
        run = pool.submit(generate, engine, 0)
        assert layer_0_ran.wait(WAIT_S), "the request's forward did not start while the file was being read"
        assert not run.done()
        last_layer_released.set()
        request = run.result(timeout=WAIT_S)
    assert layers_read_when_layer_0_ran == [num_layers - 1]
    assert_same_outputs(request, reference)
    assert settle(engine).loaded == [("a1", 0)]
    engine.close()


def test_a_read_failing_mid_stream_fails_only_that_load(model_dirs, mixed_adapter_dirs):
    """Layer 0 is read, layer 1's read fails. The forward already running over the slot, with
    other requests in its batch, completes; those requests are exact; the failure is reported
    once; the slot and host memory are free; a forward sent before the failure was known still
    runs; the copier takes the next load into the same slot."""
    model_dir, adapters = model_dirs["llama"], mixed_adapter_dirs["llama"]
    reference = eager_engine(model_dir, max_loras_per_batch=2)
    reference.register_adapter("good", adapters["a0"])
    make_resident(reference, "good", 1)
    expected = {r.request_id: r for r in (generate(reference, -1, "base"), generate(reference, 1, "good"))}
    reference.close()

    engine = eager_engine(model_dir, max_loras_per_batch=2)
    engine.register_adapter("good", adapters["a0"])
    make_resident(engine, "good", 1)
    host_bytes = engine.host_cache.used_bytes
    start_load_failing_at_layer_1(engine, "bad", adapters["a1"], 0)
    requests = [Request("base", prompt(9), max_new_tokens=3), Request("good", prompt(9), 1, max_new_tokens=3),
                Request("bad", prompt(9), 0, max_new_tokens=3)]
    Driver(engine, chunk=4).run(requests)
    for request in requests[:2]:  # batched here, alone in the reference: equal up to summation order
        assert_same_outputs(request, expected[request.request_id], atol=1e-5)

    report = settle(engine)
    assert report.loaded == [] and report.staged == []
    assert [name for name, _ in report.failed] == ["bad"]
    assert isinstance(report.failed[0][1], CorruptAdapterError) and "the disk went away" in str(report.failed[0][1])
    assert engine.slot_of("bad") is None and not engine.pending
    assert "bad" not in engine.host_cache.entries and engine.host_cache.used_bytes == host_bytes
    assert engine.poll().failed == []
    generate(engine, 0, "sent-before-the-failure-was-known")

    engine.host_cache.read_hook = None
    engine.unregister_adapter("bad")
    engine.register_adapter("a1", adapters["a1"])
    engine.stage_adapter("a1")
    engine.load_adapter("a1", 0)
    assert_same_outputs(generate(engine, 0), staged_reference(model_dir, adapters["a1"]))
    engine.close()


def test_a_file_gone_before_its_read_fails_the_streamed_load(model_dirs, mixed_adapter_dirs, tmp_path):
    adapter_dir = shutil.copytree(mixed_adapter_dirs["llama"]["a1"], tmp_path / "a1")
    engine = eager_engine(model_dirs["llama"])
    engine.register_adapter("a1", adapter_dir)
    release = threading.Event()
    engine.host_cache.read_hook = lambda name, layer: release.wait(WAIT_S)
    engine.register_adapter("first", mixed_adapter_dirs["llama"]["a0"])
    engine.stage_adapter("first")  # the reader is busy with it while a1's file goes
    engine.stage_adapter("a1")
    engine.load_adapter("a1", 0)
    (adapter_dir / WEIGHTS_FILE).unlink()
    release.set()
    report = settle(engine)
    assert report.staged == ["first"] and report.loaded == []
    assert [(name, type(error)) for name, error in report.failed] == [("a1", CorruptAdapterError)]
    assert engine.slot_of("a1") is None and "a1" not in engine.host_cache.entries
    engine.close()


def test_a_streaming_adapter_cannot_be_evicted_or_unregistered_until_its_load_lands(model_dirs, mixed_adapter_dirs):
    engine = eager_engine(model_dirs["llama"])
    engine.register_adapter("a1", mixed_adapter_dirs["llama"]["a1"])
    release = threading.Event()
    engine.host_cache.read_hook = lambda name, layer: layer == 0 or release.wait(WAIT_S)
    engine.stage_adapter("a1")
    engine.load_adapter("a1", 0)
    for refused in (lambda: engine.evict_host("a1"), lambda: engine.evict_slot(0),
                    lambda: engine.unregister_adapter("a1")):
        with pytest.raises(AdapterStateError):
            refused()
    release.set()
    assert settle(engine) == LoadReport(staged=["a1"], loaded=[("a1", 0)])
    engine.evict_slot(0)
    engine.unregister_adapter("a1")
    assert engine.host_cache.used_bytes == 0
    engine.close()
