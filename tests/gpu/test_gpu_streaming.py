"""Loads that stream from disk on CUDA: each layer's copy waits on the GPU for its read
(cuStreamWaitValue32 on the reader's pinned counter), so a forward launched before the file
is read runs as far as the file goes, and nothing else waits for the disk.

Run on a GPU machine: `python -m pytest -m gpu tests/gpu`.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from tests.driver import Driver, Request, forward_paths, make_engine, make_resident
from tests.worker.test_streamed_loads import (
    WAIT_S,
    assert_same_outputs,
    eager_engine,
    generate,
    prompt,
    settle,
    staged_reference,
    start_load_failing_at_layer_1,
)
from worker.batch import SequenceInput
from worker.graph_step import MIXED_TOKEN_BUCKETS
from worker.errors import CorruptAdapterError

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
FLOAT32_ATOL = 1e-5  # the same kernels on the same data; only launch order differs
BATCHED_ATOL = 1e-4  # a request batched with another against itself alone: other GEMM shapes


class HeldLastLayer:
    """A read hook that holds the last layer's read back until `release` (or WAIT_S)."""

    def __init__(self, num_layers: int) -> None:
        self.last = num_layers - 1
        self.released = threading.Event()

    def __call__(self, name: str, layer: int) -> None:
        if layer == self.last:
            self.released.wait(WAIT_S)

    def release(self) -> None:
        self.released.set()


def wait_until(condition, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.001)


def start_streamed_load(engine, name: str, adapter_dir, slot: int) -> HeldLastLayer:
    engine.register_adapter(name, adapter_dir)
    held = HeldLastLayer(engine.model_config.num_layers)
    engine.host_cache.read_hook = held
    engine.stage_adapter(name)
    engine.load_adapter(name, slot)
    return held


def graphed_engine(model_dir, **overrides):
    """The static path with every graph captured up front, as the worker starts it."""
    engine = make_engine(model_dir, **overrides)
    engine.graph_runner.capture_all()
    return engine


@pytest.mark.parametrize("make", [eager_engine, graphed_engine], ids=["eager", "per-layer-graphs"])
def test_layer_0_lands_and_a_forward_launches_before_the_last_layer_is_read(model_dirs, mixed_adapter_dirs, make):
    model_dir, adapter_dir = model_dirs["llama"], mixed_adapter_dirs["llama"]["a1"]
    reference = staged_reference(model_dir, adapter_dir, device="cuda")
    engine = make(model_dir, device="cuda")
    held = start_streamed_load(engine, "a1", adapter_dir, 0)
    try:
        job, progress = engine.pending[0], engine.host_cache.entries["a1"].progress
        forward = engine.launch([SequenceInput("r", prompt(9), 0, list(range(4)), adapter_slot=0)])
        assert not progress.complete, "launching the forward waited for the disk"
        wait_until(lambda: engine.copier.layer_copied(job, 0), "layer 0's copy")
        assert progress.layers_read == held.last, "layer 0 landed only after the last layer was read"
        job.finished.result(timeout=WAIT_S)  # every layer queued: the last one's event is recorded
        time.sleep(0.05)  # the GPU polls the counter: give a wrongly passed wait time to show
        assert not engine.copier.layer_copied(job, -1), "the last layer was copied before it was read"
        assert not forward.is_done(), "the forward ran past a layer that was not read"
    finally:
        held.release()
    assert [t.token_id for t in engine.finish(forward).tokens] == reference.generated[:1]
    assert settle(engine).loaded == [("a1", 0)]
    if make is graphed_engine:
        assert forward_paths(engine) == ["static-waiting"]
        assert engine.graph_runner.layered_graphs_captured == len(MIXED_TOKEN_BUCKETS), "captured while serving"
    engine.close()


def test_a_streamed_load_gives_the_logits_of_a_staged_one(model_dirs, mixed_adapter_dirs):
    model_dir, adapter_dir = model_dirs["llama"], mixed_adapter_dirs["llama"]["a1"]
    reference = staged_reference(model_dir, adapter_dir, device="cuda")
    engine = eager_engine(model_dir, device="cuda")
    held = start_streamed_load(engine, "a1", adapter_dir, 0)
    job = engine.pending[0]
    with ThreadPoolExecutor(1) as pool:  # its first forward reads logits back, so it waits for the read
        try:
            run = pool.submit(generate, engine, 0)
            wait_until(lambda: engine.copier.layer_copied(job, 0), "layer 0's copy")
            assert not run.done()
        finally:
            held.release()
        request = run.result(timeout=WAIT_S)
    assert_same_outputs(request, reference, atol=FLOAT32_ATOL)
    engine.close()


def test_other_forwards_and_loads_do_not_wait_for_a_streaming_read(model_dirs, mixed_adapter_dirs):
    """The streamed load's GPU-side wait holds its own stream only: forwards over other slots
    (through CUDA graphs) and a load from the host cache into another slot finish while the
    last layer's read is still held back."""
    model_dir, adapters = model_dirs["llama"], mixed_adapter_dirs["llama"]
    engine = make_engine(model_dir, device="cuda")
    engine.register_adapter("a0", adapters["a0"])
    make_resident(engine, "a0", 1)
    engine.register_adapter("staged", adapters["a0"])
    engine.stage_adapter("staged")
    engine.wait_staged("staged")
    before = generate(engine, 1, "before")
    held = start_streamed_load(engine, "a1", adapters["a1"], 0)
    try:
        during = generate(engine, 1, "during")
        engine.load_adapter("staged", 2)
        engine.copier.wait(engine.pending[2])
        engine.pending[0].finished.result(timeout=WAIT_S)
        assert not engine.copier.layer_copied(engine.pending[0], -1), "the other work finished only after the read"
    finally:
        held.release()
    assert during.generated == before.generated
    assert sorted(settle(engine).loaded) == [("a1", 0), ("staged", 2)]
    engine.close()


def test_a_read_failing_mid_stream_on_cuda_fails_only_that_load(model_dirs, mixed_adapter_dirs):
    """The failure releases the GPU-side waits: the batch over the failing slot completes
    with its other request right, the load is reported failed, and the slot's stream takes
    the next streamed load."""
    model_dir, adapters = model_dirs["llama"], mixed_adapter_dirs["llama"]
    engine = eager_engine(model_dir, device="cuda")
    alone = generate(engine, -1, "alone")
    start_load_failing_at_layer_1(engine, "bad", adapters["a1"], 0)
    batch = [Request("base", prompt(9), max_new_tokens=3), Request("bad", prompt(9), 0, max_new_tokens=3)]
    Driver(engine, chunk=4).run(batch)
    assert_same_outputs(batch[0], alone, atol=BATCHED_ATOL)
    report = settle(engine)
    assert [(name, type(error)) for name, error in report.failed] == [("bad", CorruptAdapterError)]
    assert engine.slot_of("bad") is None and "bad" not in engine.host_cache.entries
    held = start_streamed_load(engine, "a1", adapters["a1"], 0)  # slot 0's stream again
    held.release()
    assert_same_outputs(generate(engine, 0), staged_reference(model_dir, adapters["a1"], device="cuda"),
                        atol=FLOAT32_ATOL)
    engine.close()
