"""The adapter tier: the one owner of adapter records, GPU slots, host-cache room, staging, loads,
evictions, unloads and the reference counts that guard them.

Every state change goes through `_move`, which refuses an edge the state machine lacks
(`LEGAL_TRANSITIONS`), and every adapter command for the worker (stage, load, evict, unregister)
is queued here, in the order the decisions are taken; the core hands them on with its forward.
Each load into a tier, eviction, unload and failed load is logged at info (warning for a
failure) with the adapter's name, path, bytes and tier.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from protos.loraserve.v1 import internal_pb2 as pb
from protos.loraserve.v1 import serving_pb2
from scheduler.adapters import IN_HOST_CACHE, LEGAL_TRANSITIONS, ON_GPU, Adapter, AdapterState, IllegalTransition
from scheduler.landing import LoadClock
from scheduler.metrics import SchedulerMetrics

FIRST_BANDWIDTH_GUESS = 1e9  # bytes/s: below pinned host-to-GPU copies, so the first predictions err late

log = logging.getLogger("loraserve.scheduler")
UnloadDone = Callable[[], None]


class LoadStart(enum.Enum):
    """What `AdapterTier.start_loading` achieved."""

    STARTED = "started"  # the adapter holds a slot; its copy may still run
    NO_HOST_ROOM = "no host room"  # on disk, and no idle host-cache entry can make room for it
    NO_SLOT = "no slot"  # every slot is referenced or loading


@dataclass
class PendingUnload:
    name: str
    on_done: list[UnloadDone] = field(default_factory=list)
    started_at: float = field(default_factory=time.monotonic)


def log_adapter(level: int, message: str, adapter: Adapter, tier: str, seconds: float | None = None,
                **fields: object) -> None:
    """One record about an adapter operation: name, path, bytes, tier, and how long it took if known."""
    extra = {"adapter": adapter.name, "path": adapter.path, "bytes": adapter.size_bytes, "tier": tier, **fields}
    if seconds is not None:
        extra["duration_ms"] = round(seconds * 1e3, 2)
    log.log(level, message, extra=extra)


def tier_of(adapter: Adapter) -> str:
    """Where the adapter is: `gpu` (a slot, loading or resident), `host` (pinned memory) or `disk`."""
    if adapter.slot is not None:
        return "gpu"
    return "host" if adapter.state in IN_HOST_CACHE else "disk"


class AdapterTier:
    """Others may read the `Adapter` records it hands out; only its methods change them."""

    def __init__(self, num_slots: int, host_capacity_bytes: int, max_host_entries: int, blocking_loads: bool,
                 metrics: SchedulerMetrics, saved_module_slots: int = 0) -> None:
        """`saved_module_slots`: slots [0, N) own the embedding and LM head tables that adapters with
        modules_to_save replace; such adapters load only there."""
        self._adapters: dict[str, Adapter] = {}
        self.saved_module_slots = saved_module_slots
        # Those in IN_HOST_CACHE, kept by `_move`: the host cache is asked about per waiting request
        # each step, and a scan of 1,000 registered adapters each time cost ~10 ms a step.
        self._host: dict[str, Adapter] = {}
        self._slot_owner: list[str | None] = [None] * num_slots
        self.host_capacity_bytes = host_capacity_bytes
        self._max_host_entries = max_host_entries
        self._blocking_loads = blocking_loads  # overlap off: the worker copies before the next forward
        self._metrics = metrics
        self._unloads: dict[str, PendingUnload] = {}
        self._commands: list[pb.WorkerCommand] = []
        self.loads_started = 0
        self.loads_finished = 0
        # Until a load has finished, a slow guess: requests wait for the load's report, as without predictions.
        self.load_clock = LoadClock(bytes_per_s=FIRST_BANDWIDTH_GUESS)

    # Registry ------------------------------------------------------------------------------

    def register(self, registered: pb.RegisteredAdapter, path: str) -> Adapter:
        adapter = Adapter(registered.name, path, registered.rank, registered.size_bytes,
                          tuple(registered.target_modules), ranks=tuple(registered.ranks),
                          alphas=tuple(registered.alphas), dora=registered.dora,
                          extra_modules=tuple(registered.extra_modules))
        self._adapters[adapter.name] = adapter
        self._host.pop(adapter.name, None)
        return adapter

    def __contains__(self, name: str) -> bool:
        return name in self._adapters

    def __getitem__(self, name: str) -> Adapter:
        return self._adapters[name]

    def get(self, name: str) -> Adapter | None:
        return self._adapters.get(name)

    def accepts_requests(self, name: str) -> bool:
        """Registered and not being unloaded."""
        adapter = self._adapters.get(name)
        return adapter is not None and not adapter.unloading

    def infos(self) -> list[serving_pb2.AdapterInfo]:
        return [adapter.info() for _, adapter in sorted(self._adapters.items())]

    def residency(self) -> tuple[list[str], list[str]]:
        """(adapters on the GPU or being copied there, adapters in host memory or being read into it);
        adapters being unloaded take no new requests and are in neither."""
        serving = [a for a in self._adapters.values() if not a.unloading]
        on_gpu = sorted(a.name for a in serving if a.state in ON_GPU)
        in_host = sorted(a.name for a in serving if a.state in IN_HOST_CACHE and a.state not in ON_GPU)
        return on_gpu, in_host

    @property
    def registered_count(self) -> int:
        return len(self._adapters)

    # Requests' references -----------------------------------------------------------------

    def request_queued(self, name: str) -> None:
        adapter = self._adapters[name]
        adapter.waiting += 1
        self._metrics.look_up(adapter)

    def request_started(self, name: str, now: float) -> Adapter:
        """A queued request runs (admitted or resumed): it references the adapter's slot."""
        adapter = self._adapters[name]
        adapter.waiting -= 1
        adapter.references += 1
        adapter.last_used = now
        return adapter

    def request_paused(self, name: str, now: float) -> None:
        adapter = self._adapters[name]
        adapter.references -= 1
        adapter.waiting += 1
        adapter.last_used = now

    def request_left_queue(self, name: str) -> None:
        if name in self._adapters:
            self._adapters[name].waiting -= 1

    def request_stopped(self, name: str) -> None:
        if name in self._adapters:
            adapter = self._adapters[name]
            adapter.references -= 1
            adapter.last_used = time.monotonic()

    @property
    def references(self) -> int:
        return sum(adapter.references for adapter in self._adapters.values())

    # Slots ---------------------------------------------------------------------------------

    @property
    def num_slots(self) -> int:
        return len(self._slot_owner)

    @property
    def slots_used(self) -> int:
        return sum(owner is not None for owner in self._slot_owner)

    def slot_owners(self) -> list[str | None]:
        return list(self._slot_owner)

    def owner_of(self, slot: int) -> str | None:
        return self._slot_owner[slot]

    def resident_slots(self) -> list[int]:
        return [slot for slot, owner in enumerate(self._slot_owner)
                if owner is not None and self._adapters[owner].state is AdapterState.RESIDENT]

    def slots_for(self, adapter: Adapter | None) -> list[int]:
        """The slots `adapter` may take, preferred first: one with modules_to_save only the
        saved-module slots; any other every slot, the plain ones first, so that the saved-module
        slots stay free for the adapters that need them (None: any adapter, as a plain one)."""
        saved = list(range(self.saved_module_slots))
        if adapter is not None and adapter.extra_modules:
            return saved
        return [*range(self.saved_module_slots, self.num_slots), *saved]

    def free_slot(self, adapter: Adapter | None = None) -> int | None:
        return next((slot for slot in self.slots_for(adapter) if self._slot_owner[slot] is None), None)

    def slot_unclaimed_by_waiters(self, adapter: Adapter) -> bool:
        """Whether `adapter` would load into a free slot, or evict one no queued request asks for."""
        if self.free_slot(adapter) is not None:
            return True
        victim = self.slot_victim(adapter)
        return victim is not None and self._adapters[self._slot_owner[victim]].waiting == 0

    def slot_victim(self, adapter: Adapter | None = None) -> int | None:
        """The least recently used resident slot with no references (LRU eviction) among those
        `adapter` may take; for a plain adapter, a saved-module slot only if no other is idle."""
        saved_first = adapter is None or not adapter.extra_modules
        candidates = [self._adapters[self._slot_owner[slot]] for slot in self.slots_for(adapter)
                      if self._slot_owner[slot] is not None]
        idle = [a for a in candidates if a.state is AdapterState.RESIDENT and a.references == 0]
        victim = min(idle, key=lambda a: (saved_first and a.slot < self.saved_module_slots, a.waiting > 0,
                                          a.last_used), default=None)
        return None if victim is None else victim.slot

    # Host cache ------------------------------------------------------------------------------

    @property
    def host_bytes(self) -> int:
        return sum(a.host_bytes for a in self._host_entries())

    def host_has_room(self, adapter: Adapter) -> bool:
        entries = self._host_entries()
        return self._host_fits(adapter, len(entries), sum(a.host_bytes for a in entries))

    def _host_fits(self, adapter: Adapter, entries: int, used_bytes: int) -> bool:
        return entries < self._max_host_entries and used_bytes + adapter.host_bytes <= self.host_capacity_bytes

    def _host_entries(self) -> list[Adapter]:
        return list(self._host.values())

    def _host_victim(self, keep: str) -> Adapter | None:
        """The least recently used adapter in host memory that no slot, load or request needs."""
        idle = [a for a in self._host.values() if a.state is AdapterState.HOST and a.waiting == 0 and a.name != keep]
        return min(idle, key=lambda a: a.last_used, default=None)

    def _make_host_room(self, adapter: Adapter) -> bool:
        while not self.host_has_room(adapter):
            victim = self._host_victim(keep=adapter.name)
            if victim is None:
                return False
            self._move(victim, AdapterState.ON_DISK)
            self._commands.append(pb.WorkerCommand(evict_host=pb.EvictHost(name=victim.name)))
            log_adapter(logging.INFO, "adapter evicted", victim, "host", for_adapter=adapter.name)
        return True

    # Staging and loads -----------------------------------------------------------------------

    def start_loading(self, adapter: Adapter) -> LoadStart:
        """Stages `adapter` if it is on disk and loads it into a free or evicted slot."""
        if adapter.state is AdapterState.LOADING:
            return LoadStart.STARTED
        # Host room before a slot: evicting a slot for an adapter that cannot be staged would
        # free it for a moment only, and the next step would evict the adapter reloaded into it.
        if adapter.state is AdapterState.ON_DISK and not self._make_host_room(adapter):
            return LoadStart.NO_HOST_ROOM
        slot = self._claim_slot(adapter)
        if slot is None:
            return LoadStart.NO_SLOT
        from_host = adapter.state is AdapterState.HOST
        if adapter.state is AdapterState.ON_DISK:
            self._stage(adapter)
        self._load(adapter, slot, from_host)
        return LoadStart.STARTED

    def prefetch(self) -> None:
        """Fills never-used capacity ahead of demand: host memory first, then free slots.

        It runs every step, so it counts the host cache once and as it fills (asking
        `host_has_room` per adapter cost 139 ms a step with 1,000 adapters registered)."""
        entries = self._host_entries()
        count, used = len(entries), sum(a.host_bytes for a in entries)
        for adapter in self._adapters.values():
            if count >= self._max_host_entries:
                break
            if (adapter.state is AdapterState.ON_DISK and not adapter.unloading
                    and self._host_fits(adapter, count, used)):
                self._stage(adapter)
                count, used = count + 1, used + adapter.host_bytes
        for adapter in entries:
            # Into a free slot only; an adapter with modules_to_save may find none where another would.
            if adapter.state is AdapterState.HOST and not adapter.unloading and self.free_slot(adapter) is not None:
                self.start_loading(adapter)

    def _claim_slot(self, adapter: Adapter) -> int | None:
        """A free slot `adapter` may take, else the least recently used idle one, evicted."""
        slot = self.free_slot(adapter)
        if slot is not None:
            return slot
        slot = self.slot_victim(adapter)
        if slot is None:
            return None
        victim = self._adapters[self._slot_owner[slot]]
        self._slot_owner[slot] = None
        victim.slot = None
        self._move(victim, AdapterState.HOST)
        self._commands.append(pb.WorkerCommand(evict_slot=pb.EvictSlot(slot=slot)))
        log_adapter(logging.INFO, "adapter evicted", victim, "gpu", slot=slot)
        return slot

    def _stage(self, adapter: Adapter) -> None:
        self._move(adapter, AdapterState.STAGING)
        self._commands.append(pb.WorkerCommand(stage_adapter=pb.StageAdapter(name=adapter.name)))
        self._metrics.host.start(adapter.name, time.monotonic())

    def _load(self, adapter: Adapter, slot: int, from_host: bool) -> None:
        """`from_host`: the adapter is all in host memory, so its copy's end can be predicted (one
        still being read streams at the disk's pace)."""
        self._move(adapter, AdapterState.LOADING)
        self._slot_owner[slot] = adapter.name
        adapter.slot = slot
        self._commands.append(pb.WorkerCommand(load_slot=pb.LoadSlot(name=adapter.name, slot=slot,
                                                                     blocking=self._blocking_loads)))
        self.loads_started += 1
        now = time.monotonic()
        self._metrics.gpu.start(adapter.name, now)
        if from_host and not self._blocking_loads:
            self.load_clock.started(adapter.name, adapter.size_bytes, now)
        if self._blocking_loads:  # the worker finishes the copy before it runs the next forward
            self._move(adapter, AdapterState.RESIDENT)
            adapter.loaded_at = time.monotonic()
            self.loads_finished += 1

    # Worker events ---------------------------------------------------------------------------

    def on_staged(self, name: str, now: float) -> None:
        adapter = self._adapters.get(name)
        if adapter is None:
            return
        log_adapter(logging.INFO, "adapter loaded", adapter, "host", self._metrics.host.finish(adapter, now))
        if adapter.state is AdapterState.STAGING:
            self._move(adapter, AdapterState.HOST)

    def on_loaded(self, name: str, slot: int, now: float, copy_s: float = 0.0) -> None:
        """`copy_s`: the copy's own time as the worker timed it (0: not timed)."""
        adapter = self._adapters.get(name)
        if adapter is not None and adapter.slot == slot and adapter.state is AdapterState.LOADING:
            self._move(adapter, AdapterState.RESIDENT)
            adapter.loaded_at = now
            self.loads_finished += 1
            self.load_clock.finished(name, now, copy_s)
            log_adapter(logging.INFO, "adapter loaded", adapter, "gpu", self._metrics.gpu.finish(adapter, now),
                        slot=slot)

    def on_blocking_load_done(self, name: str) -> None:
        """The worker answered a blocking load: the copy is done (counted resident when issued)."""
        adapter = self._adapters.get(name)
        if adapter is not None:
            seconds = self._metrics.gpu.finish(adapter, time.monotonic())
            log_adapter(logging.INFO, "adapter loaded", adapter, "gpu", seconds, slot=adapter.slot)

    def load_failed(self, name: str, error: str) -> AdapterState | None:
        """Forgets the failed stage or load's start; the adapter's state, None if it is not registered."""
        self._metrics.fail(name)
        self.load_clock.forget(name)
        adapter = self._adapters.get(name)
        if adapter is None:
            return None
        if adapter.state is not AdapterState.ON_DISK:  # on disk: a failure reported twice, logged once
            tier = "gpu" if adapter.state in (AdapterState.LOADING, AdapterState.RESIDENT) else "host"
            log_adapter(logging.WARNING, "adapter load failed", adapter, tier, error=error)
        return adapter.state

    def roll_back_to_disk(self, name: str) -> None:
        """After a failed stage or load: no slot, not in host memory."""
        adapter = self._adapters[name]
        if adapter.slot is not None:
            self._slot_owner[adapter.slot] = None
            adapter.slot = None
        if adapter.state is not AdapterState.ON_DISK:  # a failure reported twice
            self._move(adapter, AdapterState.ON_DISK)

    # Unloads ---------------------------------------------------------------------------------

    def begin_unload(self, name: str, on_done: UnloadDone) -> None:
        """Refuses new requests for the adapter; `on_done()` runs once it is unreferenced and gone."""
        self._adapters[name].unloading = True
        self._unloads.setdefault(name, PendingUnload(name)).on_done.append(on_done)
        self.complete_unloads()

    def complete_unloads(self) -> None:
        for name, unload in list(self._unloads.items()):
            adapter = self._adapters[name]
            if adapter.references or adapter.waiting or adapter.state in (AdapterState.STAGING, AdapterState.LOADING):
                continue
            log_adapter(logging.INFO, "adapter unloaded", adapter, tier_of(adapter), time.monotonic() - unload.started_at)
            if adapter.slot is not None:
                self._commands.append(pb.WorkerCommand(evict_slot=pb.EvictSlot(slot=adapter.slot)))
                self._slot_owner[adapter.slot] = None
            self._commands.append(pb.WorkerCommand(unregister_adapter=pb.UnregisterAdapter(name=name)))
            del self._adapters[name]
            self._host.pop(name, None)
            del self._unloads[name]
            for callback in unload.on_done:
                callback()

    def answer_pending_unloads(self) -> None:
        """The worker is gone: every pending unload is done (the next worker never has the adapter)."""
        for unload in self._unloads.values():
            for on_done in unload.on_done:
                on_done()

    # State changes and commands ----------------------------------------------------------------

    def _move(self, adapter: Adapter, state: AdapterState) -> None:
        """The one place an adapter changes state; an edge the state machine lacks is a bug."""
        if state not in LEGAL_TRANSITIONS[adapter.state]:
            raise IllegalTransition(adapter.name, adapter.state, state)
        adapter.state = state
        if state in IN_HOST_CACHE:
            self._host[adapter.name] = adapter
        else:
            self._host.pop(adapter.name, None)

    def take_commands(self) -> list[pb.WorkerCommand]:
        commands, self._commands = self._commands, []
        return commands
