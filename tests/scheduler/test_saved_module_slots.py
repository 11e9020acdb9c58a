"""Slot choice with saved-module slots: adapters with modules_to_save (their own embedding or LM head
tables) load only into slots [0, saved_module_slots); the others prefer the remaining slots."""

from __future__ import annotations

from protos.loraserve.v1 import internal_pb2 as pb
from scheduler.adapter_tier import AdapterTier, LoadStart
from scheduler.adapters import Adapter, AdapterState
from scheduler.metrics import SchedulerMetrics
from tests.scheduler.fake_worker import FakeWorker, hello
from tests.scheduler.test_core import NO_PREEMPTION, finished, make, submit


def make_tier(slots: int, saved: int, host_entries: int = 8) -> AdapterTier:
    return AdapterTier(slots, host_capacity_bytes=1 << 20, max_host_entries=host_entries, blocking_loads=True,
                       metrics=SchedulerMetrics(), saved_module_slots=saved)


def register(tier: AdapterTier, name: str, extra: tuple[str, ...] = ()) -> Adapter:
    tier.register(pb.RegisteredAdapter(name=name, rank=8, size_bytes=1000, target_modules=["q_proj"],
                                       extra_modules=list(extra)), f"/a/{name}")
    return tier[name]


def load(tier: AdapterTier, adapter: Adapter, now: float) -> int:
    assert tier.start_loading(adapter) is LoadStart.STARTED
    adapter.last_used = now
    return adapter.slot


def test_the_registration_carries_the_extra_modules_to_the_api():
    tier = make_tier(slots=2, saved=1)
    adapter = register(tier, "s", ("embed_tokens", "lm_head"))
    assert adapter.extra_modules == ("embed_tokens", "lm_head")
    assert list(adapter.info().extra_modules) == ["embed_tokens", "lm_head"]
    assert list(register(tier, "p").info().extra_modules) == []


def test_plain_adapters_prefer_the_slots_without_tables():
    tier = make_tier(slots=4, saved=2)
    slots = [load(tier, register(tier, f"p{i}"), now=i) for i in range(4)]
    assert slots == [2, 3, 0, 1], "the plain slots first, then the saved-module slots"


def test_an_adapter_with_tables_takes_a_free_saved_module_slot_even_past_free_plain_ones():
    tier = make_tier(slots=4, saved=2)
    assert load(tier, register(tier, "s0", ("lm_head",)), now=0) == 0
    assert load(tier, register(tier, "s1", ("embed_tokens",)), now=1) == 1
    assert tier.slot_owners() == ["s0", "s1", None, None]


def test_an_adapter_with_tables_evicts_the_least_recently_used_idle_saved_module_slot_only():
    tier = make_tier(slots=4, saved=2)
    plain = [register(tier, f"p{i}") for i in range(4)]
    for i, adapter in enumerate(plain):
        load(tier, adapter, now=10 + i)
    assert tier.slot_owners() == ["p2", "p3", "p0", "p1"]
    plain[0].last_used = 0.5  # the least recently used of all, in a plain slot: no use to it
    plain[3].last_used = 2.0  # the least recently used of the saved-module slots
    tier.take_commands()
    saved = register(tier, "s", ("embed_tokens", "lm_head"))
    assert load(tier, saved, now=20) == 1
    assert plain[3].state is AdapterState.HOST and plain[0].slot == 2
    evictions = [c.evict_slot.slot for c in tier.take_commands() if c.WhichOneof("kind") == "evict_slot"]
    assert evictions == [1]


def test_an_adapter_with_tables_waits_while_every_saved_module_slot_is_referenced():
    tier = make_tier(slots=3, saved=1)
    holder = register(tier, "s0", ("lm_head",))
    load(tier, holder, now=0)
    tier.request_queued("s0")
    tier.request_started("s0", now=1.0)
    other = register(tier, "s1", ("lm_head",))
    assert tier.start_loading(other) is LoadStart.NO_SLOT, "two free plain slots do not serve it"
    assert tier.slot_owners() == ["s0", None, None] and other.slot is None
    assert tier.free_slot(other) is None and tier.slot_victim(other) is None
    tier.request_stopped("s0")
    assert tier.start_loading(other) is LoadStart.STARTED and other.slot == 0


def test_plain_adapters_evict_a_saved_module_slot_only_when_no_plain_slot_is_idle():
    tier = make_tier(slots=2, saved=1)
    s, p = register(tier, "s", ("lm_head",)), register(tier, "p")
    load(tier, s, now=0)  # slot 0, the least recently used
    load(tier, p, now=5)  # slot 1
    q = register(tier, "q")
    assert load(tier, q, now=6) == 1, "the plain slot's adapter goes, though the saved-module slot's is older"
    tier.request_queued("q")
    tier.request_started("q", now=7.0)
    r = register(tier, "r")
    assert load(tier, r, now=8) == 0, "with the plain slot referenced, the saved-module slot is taken"


def test_prefetch_leaves_an_adapter_with_tables_on_the_host_when_only_plain_slots_are_free():
    tier = make_tier(slots=3, saved=1)
    holder = register(tier, "s0", ("lm_head",))
    load(tier, holder, now=0)
    waiting = register(tier, "s1", ("lm_head",))
    plain = register(tier, "p")
    tier.prefetch()
    tier.on_staged("s1", now=1.0)
    tier.on_staged("p", now=1.0)
    tier.prefetch()
    assert waiting.state is AdapterState.HOST and waiting.slot is None
    assert plain.slot == 1 and tier.slot_owners() == ["s0", "p", None]


def test_without_saved_module_slots_the_choice_is_as_before():
    tier = make_tier(slots=3, saved=0)
    assert [load(tier, register(tier, f"p{i}"), now=i) for i in range(3)] == [0, 1, 2]
    assert load(tier, register(tier, "q"), now=9) == 0, "the least recently used"


def make_core(**hello_fields) -> FakeWorker:
    return make(adapters=("a", "b"), worker_hello=hello(**hello_fields), drain_after_s=0,
                pause_tokens_ratio=NO_PREEMPTION)


def test_the_core_drains_a_saved_module_slot_for_a_waiting_adapter_with_tables():
    """Both slots referenced and `s` (with tables) waiting: the drain takes slot 0, the only one `s`
    may take, though the plain slot's request finishes sooner; `s` loads only there."""
    worker = make_core(saved_module_slots=1, max_loras_per_batch=2)
    worker.core.register(pb.RegisteredAdapter(name="s", rank=8, size_bytes=1000, target_modules=["q_proj"],
                                              extra_modules=["lm_head"]), "/adapters/s")
    submit(worker, "a0", "a", max_new_tokens=2)  # slot 1: plain adapters take the plain slot first
    submit(worker, "b0", "b", max_new_tokens=6)  # slot 0
    worker.step()
    assert worker.core.hello.saved_module_slots == 1
    assert {info.name: info.slot for info in worker.core.adapter_infos() if info.slot >= 0} == {"a": 1, "b": 0}
    submit(worker, "s0", "s", max_new_tokens=2)
    worker.step()
    assert worker.core.draining_adapters() == ["b"]
    worker.run_until_idle()
    assert "s0" in finished(worker)
    loads = [c.load_slot for c in worker.log if c.WhichOneof("kind") == "load_slot" and c.load_slot.name == "s"]
    assert loads and all(load.slot == 0 for load in loads)
