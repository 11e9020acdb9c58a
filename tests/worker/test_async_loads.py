"""Loads that are slow, reordered and overlapping with forwards never change an output."""

from __future__ import annotations

import random
import threading
import time

import pytest
import torch

from tests.driver import Driver, Request, make_engine, make_resident
from tests.model_factory import AdapterSpec, build_adapter
from worker.errors import AdapterStateError
from worker.lora.copier import LoadJob
from worker.service import load_events_message

WAIT_S = 30.0  # for a load that lands at once on an idle machine
LAYER_COPY_S = 0.01  # a slowed copy's time per layer
REPORT_DELAY_S = 0.2  # between a copy landing and the poll that reports it
ALL_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CHURN_SPECS = [
    AdapterSpec(rank=4, alpha=8, target_modules=["q_proj", "v_proj"], seed=11),
    AdapterSpec(rank=16, alpha=16, target_modules=ALL_MODULES, seed=12),
    AdapterSpec(rank=8, alpha=32, target_modules=["o_proj", "down_proj"], use_rslora=True, seed=13),
    AdapterSpec(rank=32, alpha=16, target_modules=["gate_proj", "up_proj", "k_proj"], seed=14),
    AdapterSpec(rank=2, alpha=4, target_modules=ALL_MODULES, seed=15),
    AdapterSpec(rank=12, alpha=24, target_modules=["q_proj", "down_proj"], seed=16),
]


@pytest.fixture(scope="module")
def churn_adapters(artifacts, model_dirs):
    return {f"c{i}": build_adapter(model_dirs["llama3"], artifacts / f"churn-{i}", spec)
            for i, spec in enumerate(CHURN_SPECS)}


def prompt(seed: int, length: int) -> list[int]:
    return torch.randint(3, 200, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def reference_outputs(model_dir, adapters, requests_spec):
    """Every adapter resident from the start; each request alone."""
    engine = make_engine(model_dir, max_loras_per_batch=len(adapters))
    slot_of = {}
    for slot, (name, path) in enumerate(adapters.items()):
        engine.register_adapter(name, path)
        make_resident(engine, name, slot)
        slot_of[name] = slot
    outputs = {}
    for request_id, adapter, prompt_ids, new_tokens in requests_spec:
        request = Request(request_id, prompt_ids, slot_of[adapter], max_new_tokens=new_tokens)
        Driver(engine, chunk=4).run([request])
        outputs[request_id] = request
    engine.close()
    return outputs


class RandomDelays:
    """A load hook that sleeps a random time after each layer; `late`'s first load lands only
    once `early`'s has (a wait on that, not a longer sleep: the order holds on a loaded machine)."""

    def __init__(self, seed: int, max_delay_s: float, num_layers: int, late: str, early: str) -> None:
        self.random = random.Random(seed)
        self.max_delay_s = max_delay_s
        self.last_layer = num_layers - 1
        self.late, self.early = late, early
        self.early_landed = threading.Event()
        self.lock = threading.Lock()
        self.completed: list[str] = []

    def __call__(self, name: str, slot: int, layer: int) -> None:
        with self.lock:
            delay = self.random.uniform(0, self.max_delay_s)
        time.sleep(delay)
        if layer != self.last_layer:
            return
        if name == self.late:
            assert self.early_landed.wait(WAIT_S), f"the load of {self.early} never landed"
        with self.lock:
            self.completed.append(name)
        if name == self.early:
            self.early_landed.set()


def test_churn_with_slow_out_of_order_loads_matches_all_resident(model_dirs, churn_adapters):
    """Six adapters, three slots, a host cache of four, loads that land in random order.

    A toy scheduler admits a request as soon as its adapter has a slot, even while the
    load is still landing, so forwards regularly run over slots being written.
    """
    rng = random.Random(7)
    names = list(churn_adapters)
    # The first three requests start three loads at once; the first lands after the second: out of order.
    adapters = names[:3] + [rng.choice(names) for _ in range(15)]
    requests_spec = [(f"r{i}", adapter, prompt(100 + i, rng.randint(3, 14)), rng.randint(1, 5))
                     for i, adapter in enumerate(adapters)]
    expected = reference_outputs(model_dirs["llama3"], churn_adapters, requests_spec)

    engine = make_engine(model_dirs["llama3"], max_loras_per_batch=3, max_loaded_loras=4)
    delays = RandomDelays(seed=3, max_delay_s=0.01, num_layers=engine.model_config.num_layers,
                          late=names[0], early=names[1])
    engine.copier.hook = delays
    for name, path in churn_adapters.items():
        engine.register_adapter(name, path)
    driver = Driver(engine, chunk=4)
    waiting = [Request(rid, p, max_new_tokens=n) for rid, _, p, n in requests_spec]
    adapter_of = {rid: a for rid, a, _, _ in requests_spec}
    running: list[Request] = []
    finished: list[Request] = []
    started_order: list[str] = []
    while waiting or running:
        engine.poll()
        for request in list(waiting):
            slot = _slot_for(engine, adapter_of[request.request_id], running, adapter_of, started_order)
            if slot is not None:
                request.adapter_slot = slot
                waiting.remove(request)
                running.append(request)
        driver.step(running)
        finished += [r for r in running if r.finished]
        running = [r for r in running if not r.finished]

    assert len(finished) == len(requests_spec)
    for request in finished:
        reference = expected[request.request_id]
        assert request.generated == reference.generated, request.request_id
        torch.testing.assert_close(request.all_logits(), reference.all_logits(), atol=1e-5, rtol=0)
    assert len(started_order) >= 6 and sorted(delays.completed) == sorted(started_order)
    assert delays.completed.index(names[0]) > delays.completed.index(names[1]), "loads should land out of order"
    engine.close()


def _slot_for(engine, adapter, running, adapter_of, started_order) -> int | None:
    """The slot holding `adapter`, or a load of it into a free slot; None if none is free."""
    slot = engine.slot_of(adapter)
    if slot is not None:
        return slot
    busy = {r.adapter_slot for r in running} | set(engine.pending)
    free = [s for s in range(engine.slots.num_slots) if s not in busy]
    if not free:
        return None
    if adapter not in engine.host_cache.entries:
        _make_host_room(engine)
        engine.stage_adapter(adapter)
    engine.wait_staged(adapter)
    engine.load_adapter(adapter, free[0])
    started_order.append(adapter)
    return free[0]


def _make_host_room(engine) -> None:
    cache = engine.host_cache
    if len(cache.entries) < cache.max_entries:
        return
    idle = [name for name, entry in cache.entries.items() if entry.copies_in_flight == 0]
    cache.evict(idle[0])


def test_forward_waits_for_a_slot_that_is_half_written(model_dirs, churn_adapters):
    """Slot 0 holds c1; c4 replaces it slowly. A forward issued at once must see only c4."""
    model_dir = model_dirs["llama3"]
    expected = reference_outputs(model_dir, {"c4": churn_adapters["c4"]}, [("r", "c4", prompt(1, 9), 3)])["r"]

    engine = make_engine(model_dir, max_loras_per_batch=1)
    for name in ("c1", "c4"):
        engine.register_adapter(name, churn_adapters[name])
    make_resident(engine, "c1", 0)
    layers_written: list[int] = []

    def slow_after_first_layer(name: str, slot: int, layer: int) -> None:
        layers_written.append(layer)
        if layer == 0:
            time.sleep(0.3)  # layer 1 of the slot still holds c1 meanwhile

    engine.copier.hook = slow_after_first_layer
    engine.stage_adapter("c4")
    engine.wait_staged("c4")
    engine.load_adapter("c4", 0)
    request = Request("r", prompt(1, 9), adapter_slot=0, max_new_tokens=3)
    Driver(engine, chunk=4).run([request])
    assert layers_written == [0, 1]
    assert request.generated == expected.generated
    torch.testing.assert_close(request.all_logits(), expected.all_logits(), atol=1e-5, rtol=0)
    engine.close()


def test_copy_into_a_slot_waits_for_the_forward_reading_it(model_dirs, churn_adapters):
    """Hazard 2 on the thread back-end: a copy must not start while a reader is in flight."""
    engine = make_engine(model_dirs["llama3"], max_loras_per_batch=1)
    engine.register_adapter("c0", churn_adapters["c0"])
    engine.stage_adapter("c0")
    adapter = engine.host_cache.wait("c0")
    job = LoadJob("c0", 0, adapter, adapter.nbytes)
    with engine.copier.reading([0]):
        engine.copier.start(job)
        time.sleep(0.2)
        assert not any(event.is_set() for event in job.layer_ready)
    engine.copier.wait(job)
    assert all(event.is_set() for event in job.layer_ready)
    engine.close()


def test_host_copy_is_kept_until_its_load_completes(model_dirs, churn_adapters):
    """Hazard 3: the pinned source of a copy in flight cannot be evicted."""
    engine = make_engine(model_dirs["llama3"], max_loras_per_batch=1)
    release = threading.Event()
    engine.copier.hook = lambda name, slot, layer: release.wait(WAIT_S)
    engine.register_adapter("c2", churn_adapters["c2"])
    engine.stage_adapter("c2")
    engine.wait_staged("c2")
    engine.load_adapter("c2", 0)
    with pytest.raises(AdapterStateError):
        engine.evict_host("c2")
    assert engine.poll().loaded == []
    release.set()
    deadline = time.monotonic() + WAIT_S
    loaded = []
    while not loaded and time.monotonic() < deadline:
        loaded = engine.poll().loaded
    assert loaded == [("c2", 0)]
    engine.evict_host("c2")
    assert "c2" not in engine.host_cache.entries
    engine.close()


def test_a_loaded_adapter_is_reported_with_its_copys_own_time(model_dirs, churn_adapters):
    """The time the copy took, not the time until the poll: the scheduler predicts copies by it."""
    engine = make_engine(model_dirs["llama3"], max_loras_per_batch=1)
    engine.copier.hook = lambda name, slot, layer: time.sleep(LAYER_COPY_S)
    engine.register_adapter("c5", churn_adapters["c5"])
    engine.stage_adapter("c5")
    engine.wait_staged("c5")
    issued = time.monotonic()
    engine.load_adapter("c5", 0)
    engine.copier.wait(engine.pending[0])
    time.sleep(REPORT_DELAY_S)
    report = engine.poll()
    polled_after_s = time.monotonic() - issued
    assert report.loaded == [("c5", 0)]
    assert engine.model_config.num_layers * LAYER_COPY_S <= report.copy_seconds["c5"] <= polled_after_s - REPORT_DELAY_S
    assert load_events_message(report).loaded[0].copy_s == report.copy_seconds["c5"]  # as sent to the scheduler
    engine.close()


def test_a_copy_still_running_is_reported_with_the_share_of_its_layers_landed(model_dirs, churn_adapters):
    """The scheduler admits a request before its load is reported only at the pace this shows."""
    engine = make_engine(model_dirs["llama3"], max_loras_per_batch=1)
    release = threading.Event()
    engine.copier.hook = lambda name, slot, layer: layer == 0 or release.wait(WAIT_S)  # holds layer 1 on
    engine.register_adapter("c4", churn_adapters["c4"])
    engine.stage_adapter("c4")
    engine.wait_staged("c4")
    engine.load_adapter("c4", 0)
    layers = engine.model_config.num_layers
    deadline = time.monotonic() + WAIT_S
    while (report := engine.poll()).copying.get("c4") != 1 / layers and time.monotonic() < deadline:
        time.sleep(0.01)
    assert report.copying == {"c4": 1 / layers} and report.loaded == []
    assert load_events_message(report).copying[0].landed == 1 / layers  # as sent to the scheduler
    release.set()
    engine.copier.wait(engine.pending[0])
    report = engine.poll()
    assert report.loaded == [("c4", 0)] and report.copying == {}
    engine.close()


def test_blocking_load_is_complete_on_return(model_dirs, churn_adapters):
    engine = make_engine(model_dirs["llama3"], max_loras_per_batch=1)
    engine.copier.hook = lambda name, slot, layer: time.sleep(0.05)
    engine.register_adapter("c3", churn_adapters["c3"])
    engine.stage_adapter("c3")
    engine.wait_staged("c3")
    engine.load_adapter("c3", 0, blocking=True)
    assert engine.copier.is_done(engine.pending[0])
    assert engine.poll().loaded == [("c3", 0)]
    engine.close()


@pytest.mark.parametrize("blocking", [False, True], ids=["streamed", "blocking"])
def test_a_load_stages_an_adapter_the_host_cache_lacks(model_dirs, churn_adapters, blocking):
    """Blocking reads the whole adapter before copying it; otherwise the copy streams behind the read."""
    engine = make_engine(model_dirs["llama3"], max_loras_per_batch=1)
    engine.register_adapter("c4", churn_adapters["c4"])
    engine.load_adapter("c4", 0, blocking=blocking)
    assert "c4" in engine.host_cache.entries
    if blocking:
        assert not engine.pending[0].streamed and engine.copier.is_done(engine.pending[0])
    deadline = time.monotonic() + WAIT_S
    loaded = []
    while not loaded and time.monotonic() < deadline:
        loaded = engine.poll().loaded
    assert loaded == [("c4", 0)]
    engine.close()
