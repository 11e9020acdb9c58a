"""What an adapter is to the scheduler: its record, its states and the legal moves between them.

ON_DISK --stage--> STAGING --staged--> HOST --load(slot)--> LOADING --loaded--> RESIDENT
STAGING --load(slot)--> LOADING (the worker copies once staging is done)
RESIDENT --evict (no references)--> HOST --host evict (LRU)--> ON_DISK
STAGING, LOADING, RESIDENT --failed--> ON_DISK (a blocking load counts RESIDENT when issued)
any --unload--> unloading: new requests refused; gone once unreferenced and idle.

Only `scheduler.adapter_tier.AdapterTier` changes a record; it moves `state` along
`LEGAL_TRANSITIONS` alone.
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
ON_GPU = (AdapterState.LOADING, AdapterState.RESIDENT)

LEGAL_TRANSITIONS: dict[AdapterState, frozenset[AdapterState]] = {
    AdapterState.ON_DISK: frozenset({AdapterState.STAGING}),
    AdapterState.STAGING: frozenset({AdapterState.HOST, AdapterState.LOADING, AdapterState.ON_DISK}),
    AdapterState.HOST: frozenset({AdapterState.LOADING, AdapterState.ON_DISK}),
    AdapterState.LOADING: frozenset({AdapterState.RESIDENT, AdapterState.ON_DISK}),
    AdapterState.RESIDENT: frozenset({AdapterState.HOST, AdapterState.ON_DISK}),
}


class IllegalTransition(RuntimeError):
    """A state change the adapter state machine has no edge for: a scheduler bug."""

    def __init__(self, name: str, current: AdapterState, wanted: AdapterState) -> None:
        super().__init__(f"adapter {name!r}: no transition from {current.name} to {wanted.name}")
        self.current = current
        self.wanted = wanted


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
    ranks: tuple[int, ...] = ()  # every rank its modules have
    alphas: tuple[float, ...] = ()  # every lora_alpha its modules have
    dora: bool = False
    extra_modules: tuple[str, ...] = ()  # modules_to_save it replaces: it needs a saved-module slot

    @property
    def host_bytes(self) -> int:
        return -(-self.size_bytes // HOST_ALIGNMENT) * HOST_ALIGNMENT

    def info(self) -> serving_pb2.AdapterInfo:
        return serving_pb2.AdapterInfo(
            name=self.name, path=self.path, rank=self.rank, size_bytes=self.size_bytes,
            state=serving_pb2.ADAPTER_STATE_UNLOADING if self.unloading else self.state.value,
            target_modules=list(self.modules), slot=-1 if self.slot is None else self.slot,
            active_requests=self.references + self.waiting, ranks=self.ranks, alphas=self.alphas,
            host_bytes=self.host_bytes, gpu_bytes=self.size_bytes, dora=self.dora, extra_modules=self.extra_modules,
        )
