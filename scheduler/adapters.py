"""The adapter state machine, the GPU slot table and host-cache accounting.

REGISTERED(on disk) --stage--> STAGING --staged--> HOST --load(slot)--> LOADING --loaded--> RESIDENT
RESIDENT --evict (no references)--> HOST --host evict (LRU)--> ON_DISK
any --unload--> unloading: new requests refused; gone once unreferenced and idle.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from protos.loraserve.v1 import serving_pb2

HOST_ALIGNMENT = 256  # the worker's arena rounds each adapter up to this


class AdapterState(enum.Enum):
    ON_DISK = serving_pb2.ADAPTER_STATE_ON_DISK
    STAGING = serving_pb2.ADAPTER_STATE_STAGING
    HOST = serving_pb2.ADAPTER_STATE_HOST
    LOADING = serving_pb2.ADAPTER_STATE_LOADING
    RESIDENT = serving_pb2.ADAPTER_STATE_RESIDENT


IN_HOST_CACHE = (AdapterState.STAGING, AdapterState.HOST, AdapterState.LOADING, AdapterState.RESIDENT)


@dataclass
class Adapter:
    name: str
    path: str
    rank: int
    size_bytes: int
    modules: tuple[str, ...]
    state: AdapterState = AdapterState.ON_DISK
    slot: int | None = None
    references: int = 0  # running requests using the slot
    waiting: int = 0  # queued requests asking for it
    unloading: bool = False
    last_used: float = field(default_factory=time.monotonic)
    loaded_at: float | None = None

    @property
    def host_bytes(self) -> int:
        return -(-self.size_bytes // HOST_ALIGNMENT) * HOST_ALIGNMENT

    def info(self) -> serving_pb2.AdapterInfo:
        return serving_pb2.AdapterInfo(
            name=self.name, path=self.path, rank=self.rank, size_bytes=self.size_bytes,
            state=serving_pb2.ADAPTER_STATE_UNLOADING if self.unloading else self.state.value,
            target_modules=list(self.modules), slot=-1 if self.slot is None else self.slot,
            active_requests=self.references + self.waiting,
        )


class AdapterTable:
    """Adapters by name, GPU slot owners, and the host cache's use, with LRU choices."""

    def __init__(self, num_slots: int, host_capacity_bytes: int, max_host_entries: int) -> None:
        self.adapters: dict[str, Adapter] = {}
        self.slot_owner: list[str | None] = [None] * num_slots
        self.host_capacity_bytes = host_capacity_bytes
        self.max_host_entries = max_host_entries

    def __contains__(self, name: str) -> bool:
        return name in self.adapters

    def __getitem__(self, name: str) -> Adapter:
        return self.adapters[name]

    @property
    def host_entries(self) -> list[Adapter]:
        return [a for a in self.adapters.values() if a.state in IN_HOST_CACHE]

    @property
    def host_bytes(self) -> int:
        return sum(a.host_bytes for a in self.host_entries)

    @property
    def slots_used(self) -> int:
        return sum(owner is not None for owner in self.slot_owner)

    def add(self, adapter: Adapter) -> None:
        self.adapters[adapter.name] = adapter

    def remove(self, name: str) -> None:
        adapter = self.adapters.pop(name)
        if adapter.slot is not None:
            self.slot_owner[adapter.slot] = None

    def host_has_room(self, adapter: Adapter) -> bool:
        entries = self.host_entries
        return (len(entries) < self.max_host_entries
                and self.host_bytes + adapter.host_bytes <= self.host_capacity_bytes)

    def host_victim(self, keep: set[str]) -> Adapter | None:
        """The least recently used adapter in host memory that no slot, load or request needs."""
        idle = [a for a in self.adapters.values()
                if a.state is AdapterState.HOST and a.waiting == 0 and a.name not in keep]
        return min(idle, key=lambda a: a.last_used, default=None)

    def free_slot(self) -> int | None:
        return next((slot for slot, owner in enumerate(self.slot_owner) if owner is None), None)

    def slot_victim(self) -> int | None:
        """The least recently used resident slot with no references (LRU eviction)."""
        candidates = [self.adapters[owner] for owner in self.slot_owner if owner is not None]
        idle = [a for a in candidates if a.state is AdapterState.RESIDENT and a.references == 0]
        victim = min(idle, key=lambda a: (a.waiting > 0, a.last_used), default=None)
        return None if victim is None else victim.slot

    def assign_slot(self, adapter: Adapter, slot: int) -> None:
        self.slot_owner[slot] = adapter.name
        adapter.slot = slot
        adapter.state = AdapterState.LOADING

    def release_slot(self, adapter: Adapter) -> None:
        if adapter.slot is not None:
            self.slot_owner[adapter.slot] = None
        adapter.slot = None
        adapter.state = AdapterState.HOST
