"""Scheduling policy against an in-memory worker: admission, loads, eviction, budgets, errors."""

from __future__ import annotations

import math
import time

import pytest

import scheduler.adapter_tier
import scheduler.core
from protos.loraserve.v1 import internal_pb2 as pb
from protos.loraserve.v1 import serving_pb2
from scheduler.core import SchedulerCore
from scheduler.pages import PageAllocator
from settings.config import SchedulerConfig
from tests.scheduler.fake_worker import FakeWorker, hello, token_for

CLIENT = b"frontend-1"
NO_PREEMPTION = math.inf  # a pause would free a slot before the drain or order under test decides


HOST_CACHE_STATES = (serving_pb2.ADAPTER_STATE_STAGING, serving_pb2.ADAPTER_STATE_HOST,
                     serving_pb2.ADAPTER_STATE_LOADING, serving_pb2.ADAPTER_STATE_RESIDENT)
SETTLED_STATES = (serving_pb2.ADAPTER_STATE_ON_DISK, serving_pb2.ADAPTER_STATE_HOST, serving_pb2.ADAPTER_STATE_RESIDENT)


def make(overlap: bool = True, adapters: tuple[str, ...] = ("a", "b", "c"), worker_hello: pb.WorkerHello | None = None,
         **config) -> FakeWorker:
    core = SchedulerCore(SchedulerConfig(overlap_loading=overlap, prefetch=False, **config), worker_hello or hello())
    worker = FakeWorker(core)
    for name in adapters:
        worker.register(name)
    return worker


def submit(worker: FakeWorker, request_id: str, adapter: str = "", prompt_len: int = 5,
           max_new_tokens: int = 3, **sampling) -> None:
    params = serving_pb2.SamplingParams(max_new_tokens=max_new_tokens, temperature=0, top_p=1, top_k=-1,
                                        ignore_eos=sampling.pop("ignore_eos", True), **sampling)
    worker.core.submit(CLIENT, pb.SubmitRequest(request_id=request_id, input_ids=list(range(10, 10 + prompt_len)),
                                                adapter=adapter, sampling=params))


def finished(worker: FakeWorker) -> dict[str, pb.RequestOutput]:
    return {m.output.request_id: m.output for _, m in worker.core.outputs if m.output.finished}


def tokens_of(worker: FakeWorker, request_id: str) -> list[int]:
    return [t for _, m in worker.core.outputs if m.output.request_id == request_id for t in m.output.token_ids]


def adapter_info(worker: FakeWorker, name: str) -> serving_pb2.AdapterInfo:
    return next(info for info in worker.core.adapter_infos() if info.name == name)


def assert_idle(worker: FakeWorker) -> None:
    stats = worker.core.stats()
    assert (stats.kv_pages_used, stats.slot_references, stats.running_requests, stats.waiting_requests) == (0, 0, 0, 0)


def test_page_allocator_round_trip():
    pages = PageAllocator(num_pages=8, page_size=4)
    first = pages.allocate(9)
    assert len(first) == 3 and pages.used == 3
    assert not pages.can_allocate(21)
    with pytest.raises(MemoryError):
        pages.allocate(21)
    pages.release(first)
    assert pages.used == 0 and len(set(pages.allocate(32))) == 8


def test_outputs_follow_the_worker_and_resources_return():
    worker = make()
    submit(worker, "r1", "a", prompt_len=9, max_new_tokens=4)
    submit(worker, "r2", "", prompt_len=3, max_new_tokens=2)
    worker.run_until_idle()
    done = finished(worker)
    assert done["r1"].finish_reason == "length" and done["r1"].prompt_tokens == 9
    assert tokens_of(worker, "r1") == [token_for("r1", p) for p in range(9, 13)]
    assert tokens_of(worker, "r2") == [token_for("r2", p) for p in range(3, 5)]
    assert_idle(worker)


def test_steps_sent_one_ahead_give_what_waiting_for_each_step_gives():
    """The next batch goes out before the current one's tokens: requests decode blind, a
    request stopped by a token still in flight has its extra token dropped, nothing leaks."""
    runs = {}
    for one_ahead in (False, True):
        worker = make()
        worker.one_ahead = one_ahead
        submit(worker, "r1", "a", prompt_len=9, max_new_tokens=6)
        submit(worker, "r2", "", prompt_len=3, max_new_tokens=2)
        submit(worker, "r3", "b", prompt_len=4, max_new_tokens=8, stop_token_ids=[token_for("r3", 6)])
        worker.run_until_idle()
        runs[one_ahead] = {rid: (tokens_of(worker, rid), finished(worker)[rid].finish_reason)
                           for rid in ("r1", "r2", "r3")}
        assert_idle(worker)
        assert not worker.core.has_forward_in_flight() and not worker.in_flight
        blind = [seq.request_id for batch in worker.batches for seq in batch.sequences if seq.previous_token]
        assert bool(blind) == one_ahead
    assert runs[True] == runs[False]
    assert runs[True]["r3"] == ([token_for("r3", p) for p in (4, 5, 6)], "stop")


def test_overlap_on_runs_ready_requests_while_a_load_lands():
    worker = make(overlap=True)
    worker.load_steps["a"] = 4
    submit(worker, "slow", "a", max_new_tokens=2)
    submit(worker, "base", "", max_new_tokens=3)
    worker.step()
    worker.step()
    assert "base" not in finished(worker) and tokens_of(worker, "base")
    assert not tokens_of(worker, "slow")
    worker.run_until_idle()
    done = finished(worker)
    assert done["base"].timing.e2e_ms <= done["slow"].timing.e2e_ms
    assert done["slow"].timing.adapter_wait_ms > 0
    loads = [c.load_slot for c in worker.log if c.WhichOneof("kind") == "load_slot"]
    assert [(load.name, load.blocking) for load in loads] == [("a", False)]


@pytest.mark.parametrize("overlap", [True, False])
def test_a_request_arriving_while_no_forward_can_be_sent_starts_its_load_at_once(overlap):
    """With overlap on, its copy runs beside the forwards in flight instead of waiting a step to
    be issued; with overlap off, the blocking load goes with the request's own forward."""
    worker = make(overlap=overlap, max_forwards_in_flight=2)
    submit(worker, "base", "", max_new_tokens=8)
    assert worker.core.schedule() is not None and worker.core.schedule() is not None  # two in flight
    worker.core.take_commands()
    submit(worker, "late", "a", max_new_tokens=2)
    assert worker.core.schedule() is None
    loads = [c.load_slot.name for c in worker.core.take_commands() if c.WhichOneof("kind") == "load_slot"]
    assert loads == (["a"] if overlap else [])
    assert not tokens_of(worker, "late")  # started loading, not running: it is admitted as usual


def test_an_arrival_starts_its_load_while_an_earlier_request_waits_for_a_load_already_started():
    """The earlier request needs no slot (its adapter is loading), so the arrival jumps no one."""
    worker = make(adapters=("a", "b"), worker_hello=hello(max_loras_per_batch=3), max_forwards_in_flight=2)
    worker.load_steps["a"] = 10
    submit(worker, "base", "", max_new_tokens=8)
    assert worker.core.schedule() is not None and worker.core.schedule() is not None  # two in flight
    worker.core.take_commands()
    submit(worker, "first", "a", max_new_tokens=2)
    submit(worker, "second", "b", max_new_tokens=2)
    loads = [c.load_slot.name for c in worker.core.take_commands() if c.WhichOneof("kind") == "load_slot"]
    assert loads == ["a", "b"]


def test_an_arrival_does_not_load_ahead_of_an_earlier_request_waiting_for_a_load():
    worker = make(adapters=("a", "b", "c"), worker_hello=hello(max_loras_per_batch=1), drain_after_s=NO_PREEMPTION,
                  pause_tokens_ratio=NO_PREEMPTION)
    submit(worker, "first", "a", max_new_tokens=50)
    worker.step()  # a takes the only slot
    submit(worker, "waiting", "b", max_new_tokens=2)
    worker.step()  # b finds no slot
    worker.core.take_commands()
    submit(worker, "late", "c", max_new_tokens=5)  # longer than b's: b is first in admission order too
    assert not [c for c in worker.core.take_commands() if c.WhichOneof("kind") == "load_slot"]
    worker.run_until_idle()
    loads = [c.load_slot.name for c in worker.log if c.WhichOneof("kind") == "load_slot"]
    assert loads.index("b") < loads.index("c")


def test_overlap_on_idle_server_starts_a_request_while_its_adapter_streams_from_disk():
    """Pipelined loading: the worker starts the load of an adapter only on disk at once,
    streaming each layer as it is read, so an idle server starts the request in the same
    step; the worker's forward waits per layer on the copy."""
    worker = make(overlap=True, pipelined_loads=True)
    worker.load_steps["a"] = 4
    submit(worker, "cold", "a", max_new_tokens=3)
    worker.step()
    kinds = [c.WhichOneof("kind") for c in worker.log]
    assert kinds[:2] == ["stage_adapter", "load_slot"], "the load is issued while staging is in progress"
    assert tokens_of(worker, "cold") and "a" in worker.loading
    submit(worker, "second", "a", max_new_tokens=1)
    worker.step()
    assert "second" not in {s.request_id for s in worker.batches[-1].sequences}, "others wait for the copy"
    worker.run_until_idle()
    assert finished(worker)["second"].finish_reason == "length"
    assert_idle(worker)


def test_a_load_failing_mid_stream_fails_its_requests_and_nothing_else():
    """A pipelined start ran on a slot whose load then failed (the file vanished mid-read):
    that request and the queued one for the adapter fail with the error; the request for
    another adapter that shared its batches finishes; the slot is free again."""
    worker = make(overlap=True, pipelined_loads=True)
    worker.load_steps["a"] = 100
    submit(worker, "cold", "a", max_new_tokens=4)
    submit(worker, "base", "", max_new_tokens=4)
    worker.step()
    assert {s.request_id for s in worker.batches[-1].sequences} == {"cold", "base"}
    submit(worker, "queued", "a", max_new_tokens=1)
    worker.loading.pop("a")
    error = pb.Error(code=pb.INVALID_ARGUMENT, message="reading adapter_model.safetensors failed")
    worker.core.on_load_events(pb.LoadEvents(failed=[pb.FailedLoad(name="a", error=error)]))
    done = finished(worker)
    assert {rid: done[rid].error.code for rid in ("cold", "queued")} == {"cold": pb.INVALID_ARGUMENT,
                                                                       "queued": pb.INVALID_ARGUMENT}
    assert "reading adapter_model.safetensors failed" in done["cold"].error.message
    worker.run_until_idle()
    assert finished(worker)["base"].finish_reason == "length"
    assert tokens_of(worker, "base") == [token_for("base", p) for p in range(5, 9)]
    assert adapter_info(worker, "a").state == serving_pb2.ADAPTER_STATE_ON_DISK
    assert worker.core.slot_owners() == [None, None]
    assert_idle(worker)


def test_overlap_off_issues_blocking_loads_before_the_forward():
    worker = make(overlap=False)
    worker.load_steps["a"] = 4  # ignored: blocking loads finish before the forward
    submit(worker, "r", "a", max_new_tokens=2)
    worker.step()
    assert tokens_of(worker, "r")
    kinds = [c.WhichOneof("kind") for c in worker.log]
    assert kinds[:2] == ["stage_adapter", "load_slot"] and worker.log[1].load_slot.blocking
    worker.run_until_idle()
    assert_idle(worker)


def test_lru_eviction_never_takes_a_referenced_slot():
    worker = make(adapters=("a", "b", "c", "d"))
    for i, adapter in enumerate(["a", "b", "c", "a", "d", "b", "c", "d"]):
        submit(worker, f"r{i}", adapter, max_new_tokens=2 + i % 3)
    worker.run_until_idle()  # FakeWorker._check_batch asserts every slot a batch reads holds its adapter
    assert len(finished(worker)) == 8
    evicted = [c.evict_slot.slot for c in worker.log if c.WhichOneof("kind") == "evict_slot"]
    assert evicted, "four adapters through two slots must evict"
    assert_idle(worker)


def fill_both_slots_then_wait_for_c(worker: FakeWorker, running_tokens: int) -> None:
    submit(worker, "a0", "a", max_new_tokens=running_tokens)
    submit(worker, "b0", "b", max_new_tokens=running_tokens)
    worker.step()
    submit(worker, "c0", "c", max_new_tokens=2)  # both slots referenced: c must wait


def test_waiting_request_is_not_starved_by_a_stream_of_ready_ones():
    worker = make(adapters=("a", "b", "c"), drain_after_s=0)
    fill_both_slots_then_wait_for_c(worker, running_tokens=3)
    for i in range(1, 30):  # requests for a and b keep arriving
        submit(worker, f"a{i}", "a", max_new_tokens=3)
        submit(worker, f"b{i}", "b", max_new_tokens=3)
        worker.step()
        if "c0" in finished(worker):
            break
    assert "c0" in finished(worker), "c0 starved behind requests for resident adapters"
    worker.run_until_idle()
    assert_idle(worker)


class ManualClock:
    """The scheduler's time.monotonic, moved only by `advance`: waits compared with drain_after_s
    then do not depend on how long the machine takes to run the steps."""

    def __init__(self) -> None:
        self.now = time.monotonic()

    def monotonic(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock(monkeypatch) -> ManualClock:
    clock = ManualClock()
    for module in (scheduler.core, scheduler.adapter_tier):
        monkeypatch.setattr(module, "time", clock)
    return clock


def test_a_slot_drains_only_once_the_waiting_request_has_waited_drain_after_s(clock):
    """Before that, slots usually free on their own; a drain would hold back resident requests."""
    worker = make(adapters=("a", "b", "c"), drain_after_s=0.2, pause_tokens_ratio=NO_PREEMPTION)
    fill_both_slots_then_wait_for_c(worker, running_tokens=50)
    for i in range(1, 4):
        submit(worker, f"a{i}", "a", max_new_tokens=3)
        worker.step()
        clock.advance(0.05)
    assert not worker.core.draining_adapters() and "a3" in {r.request_id for r in worker.core.running}
    clock.advance(0.1)
    worker.step()
    assert worker.core.draining_adapters() in (["a"], ["b"])
    worker.run_until_idle()
    assert "c0" in finished(worker)
    assert_idle(worker)


def loads_of(worker: FakeWorker) -> list[str]:
    return [c.load_slot.name for c in worker.log if c.WhichOneof("kind") == "load_slot"]


def slot_freed_for_c0_and_d0(drain_after_s: float, a0_tokens: int, c0_waits_s: float = 0.0) -> FakeWorker:
    """a0 and b0 hold both slots; c0 (40 tokens) arrives, `c0_waits_s` later d0 (2 tokens);
    runs until a0 finished and the step after (its slot went to c0 or d0)."""
    worker = make(adapters=("a", "b", "c", "d"), drain_after_s=drain_after_s, pause_tokens_ratio=NO_PREEMPTION)
    submit(worker, "a0", "a", max_new_tokens=a0_tokens)
    submit(worker, "b0", "b", max_new_tokens=50)
    worker.step()
    submit(worker, "c0", "c", max_new_tokens=40)
    time.sleep(c0_waits_s)
    submit(worker, "d0", "d", max_new_tokens=2)
    while "a0" not in finished(worker):
        worker.step()
    worker.step()
    return worker


def test_a_freed_slot_goes_to_the_shortest_waiting_request():
    """c0 (40 tokens) waits before d0 (2 tokens): d0 gives the slot back sooner, so it goes first."""
    worker = slot_freed_for_c0_and_d0(drain_after_s=60, a0_tokens=3)
    assert loads_of(worker) == ["a", "b", "d"], "the slot a freed went to the longer request"
    worker.run_until_idle()
    assert loads_of(worker)[3] == "c"
    assert_idle(worker)


def test_a_shorter_request_does_not_take_a_slot_loaded_for_a_waiting_one():
    """a0 and b0 wait for their loads; c0 is shorter but must not evict a slot they are about to use."""
    worker = make(adapters=("a", "b", "c"), drain_after_s=60)
    submit(worker, "a0", "a", max_new_tokens=50)
    submit(worker, "b0", "b", max_new_tokens=50)
    worker.step()
    submit(worker, "c0", "c", max_new_tokens=2)
    worker.step()
    assert {r.request_id for r in worker.core.running} == {"a0", "b0"}
    assert not [c for c in worker.log if c.WhichOneof("kind") == "evict_slot"]
    worker.run_until_idle()
    assert_idle(worker)


def test_a_request_that_waited_drain_after_s_takes_a_freed_slot_before_shorter_ones():
    """Shortest first holds until drain_after_s: after it the old request goes first (no starvation)."""
    worker = slot_freed_for_c0_and_d0(drain_after_s=0.2, a0_tokens=8, c0_waits_s=0.25)
    assert loads_of(worker) == ["a", "b", "c"], "a shorter, newer request took the old request's slot"
    worker.run_until_idle()
    assert_idle(worker)


def test_token_budget_and_chunked_prefill():
    worker = make(max_batch_tokens=8)
    submit(worker, "long", "", prompt_len=20, max_new_tokens=2)
    submit(worker, "short", "", prompt_len=3, max_new_tokens=6)
    worker.run_until_idle()
    fed: dict[str, int] = {}
    for batch in worker.batches:
        assert sum(len(s.token_ids) for s in batch.sequences) <= 8
        for seq in batch.sequences:
            assert seq.context_len == fed.get(seq.request_id, 0), "chunks must continue where the last ended"
            fed[seq.request_id] = seq.context_len + len(seq.token_ids)
    assert tokens_of(worker, "long") == [token_for("long", 20), token_for("long", 21)]


def test_abort_releases_pages_and_slot_references():
    worker = make()
    submit(worker, "r1", "a", max_new_tokens=50)
    submit(worker, "r2", "b", max_new_tokens=50)
    submit(worker, "r3", "c", max_new_tokens=50)  # waits for a slot
    for _ in range(3):
        worker.step()
    assert worker.core.stats().kv_pages_used > 0
    for request_id in ("r1", "r2", "r3"):
        worker.core.abort(request_id)
    assert_idle(worker)
    assert {r.finish_reason for r in finished(worker).values()} == {"abort"}


def test_stop_tokens_and_end_of_sequence():
    worker = make(worker_hello=hello(eos_token_ids=[token_for("e", 5)]))
    stop = token_for("s", 5)
    submit(worker, "s", "", max_new_tokens=10, stop_token_ids=[stop])
    submit(worker, "e", "", max_new_tokens=10, ignore_eos=False)
    worker.run_until_idle()
    done = finished(worker)
    assert done["s"].finish_reason == "stop" and tokens_of(worker, "s") == [stop]
    assert done["e"].finish_reason == "stop" and len(tokens_of(worker, "e")) == 1


@pytest.mark.parametrize("kwargs, code", [
    (dict(adapter="nope"), pb.NOT_FOUND),
    (dict(prompt_len=500, max_new_tokens=100), pb.INVALID_ARGUMENT),
    (dict(prompt_len=0), pb.INVALID_ARGUMENT),
])
def test_bad_requests_are_refused_with_their_code(kwargs, code):
    worker = make()
    submit(worker, "bad", **kwargs)
    assert finished(worker)["bad"].error.code == code
    assert_idle(worker)


def test_full_queue_is_refused_at_once():
    worker = make(max_queued_requests=2)
    for i in range(3):
        submit(worker, f"r{i}")
    assert finished(worker)["r2"].error.code == pb.RESOURCE_EXHAUSTED
    assert len(worker.core.waiting) == 2


def test_unload_waits_for_running_requests_and_refuses_new_ones():
    worker = make()
    submit(worker, "r", "a", max_new_tokens=4)
    worker.step()
    unloaded = []
    worker.core.begin_unload("a", lambda: unloaded.append(True))
    assert not unloaded
    submit(worker, "late", "a")
    assert finished(worker)["late"].error.code == pb.NOT_FOUND
    worker.run_until_idle()
    assert unloaded and "a" not in [info.name for info in worker.core.adapter_infos()]
    assert finished(worker)["r"].finish_reason == "length"
    assert worker.core.slot_owners().count(None) == 2


def test_host_cache_stays_within_its_entry_bound():
    worker = make(adapters=tuple("abcdefg"))
    for i, adapter in enumerate("abcdefgabc"):
        submit(worker, f"r{i}", adapter, max_new_tokens=2)
        worker.step()
        cached = {info.name for info in worker.core.adapter_infos() if info.state in HOST_CACHE_STATES}
        state = worker.core.replica_state()
        assert len(cached) <= 4 and set(state.gpu_adapters) | set(state.host_adapters) == cached
    worker.run_until_idle()
    assert any(c.WhichOneof("kind") == "evict_host" for c in worker.log)
    assert len(finished(worker)) == 10
    assert all(info.state in SETTLED_STATES for info in worker.core.adapter_infos())


def test_a_drain_is_sticky_and_waiting_adapters_get_a_slot_each():
    """4 slots busy, 2 adapters waiting: 2 slots drain (those with the fewest tokens left) and
    keep draining while new requests for their adapters arrive, then go to the waiting ones."""
    worker = FakeWorker(SchedulerCore(SchedulerConfig(prefetch=False, max_draining_slots=2, drain_after_s=0,
                                                      pause_tokens_ratio=NO_PREEMPTION),
                                      hello(max_loras_per_batch=4, max_loaded_loras=8, num_kv_pages=512)))
    for name in "abcdef":
        worker.register(name)
    for name, tokens in (("a", 6), ("b", 30), ("c", 30), ("d", 8)):
        submit(worker, f"{name}0", name, max_new_tokens=tokens)
    worker.step()
    worker.step()
    submit(worker, "e0", "e", max_new_tokens=2)
    submit(worker, "f0", "f", max_new_tokens=2)
    worker.step()
    drained = set(worker.core.draining_adapters())
    assert drained == {"a", "d"}, "the slots that free soonest drain, one per waiting adapter"
    for i in range(1, 40):
        for name in "abcd":
            submit(worker, f"{name}{i}", name, max_new_tokens=30)
        worker.step()
        if {"e0", "f0"} <= finished(worker).keys():
            break
    done = finished(worker)
    assert {"e0", "f0"} <= done.keys(), "waiting adapters starved"
    assert "a1" not in done and "b1" in {r.request_id for r in worker.core.running} | done.keys(), \
        "requests for a draining adapter wait; others are admitted"


def test_cache_tier_metrics_follow_lookups_and_loads():
    worker = make(adapters=("a", "b", "c"))  # two slots, no prefetch
    submit(worker, "r1", "a")  # on disk: a miss in both tiers, a stage and a slot load
    worker.run_until_idle()
    submit(worker, "r2", "a")  # resident: a gpu hit
    worker.run_until_idle()
    for request_id, adapter in (("r3", "b"), ("r4", "c"), ("r5", "a")):  # c takes a's slot; a is then in host memory
        submit(worker, request_id, adapter)
        worker.run_until_idle()
    snapshot = worker.core.metrics_snapshot()
    gpu, host = snapshot.gpu, snapshot.host
    assert (gpu.hits, gpu.misses) == (1, 4)
    assert (host.hits, host.misses) == (1, 3)  # r5 found a in host memory; r1, r3, r4 found theirs on disk
    assert host.loads_started == host.loads_finished == 3 and host.bytes_loaded == 3 * 1000
    assert gpu.loads_started == gpu.loads_finished == 4 and gpu.bytes_loaded == 4 * 1000
    assert sum(gpu.load_seconds.counts) == 4 and sum(host.load_seconds.counts) == 3
    assert len(gpu.load_seconds.counts) == len(gpu.load_seconds.bounds) + 1
    assert sum(snapshot.worker_forward_seconds.counts) == snapshot.stats.forward_steps
    assert (snapshot.gpu_slots_total, snapshot.adapters_registered) == (2, 3)
