"""Slot contention: what happens when every GPU slot is referenced and requests wait for an
adapter that has none.

Draining: once a waiting request has waited `drain_after_s`, the slots that free soonest (one per
adapter waiting for a slot, at most `max_draining_slots`) admit no new request until their running
ones finish and the slot goes to an adapter that waits for one. Sticky: a drain is never abandoned
halfway, so waiting requests cannot starve behind a stream of requests for resident adapters.

Reclaiming (slot preemption, `pause_tokens_ratio`): a request that finds every slot referenced may
pause a much longer running request that is alone on its slot. The victim leaves the batches at
once but pauses only when no forward in flight holds it; it keeps its KV pages and queues again,
and on resumption feeds its last sampled token as an ordinary input.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from dataclasses import dataclass

from scheduler.adapter_tier import AdapterTier
from scheduler.adapters import Adapter, AdapterState
from scheduler.pages import PageAllocator
from scheduler.requests import Phase, Request
from settings.config import SchedulerConfig

log = logging.getLogger("loraserve.scheduler")


@dataclass(frozen=True)
class Reclaim:
    """A slot freed for `for_adapter` by pausing `victim`, the only request running on it."""

    victim: Request
    for_adapter: str


class SlotContention:
    """Drains and reclaims slots; pauses and resumes the requests in the core's queues."""

    def __init__(self, config: SchedulerConfig, tier: AdapterTier, pages: PageAllocator,
                 running: list[Request], waiting: deque[Request]) -> None:
        self._config = config
        self._tier = tier
        self._pages = pages
        self._running = running
        self._waiting = waiting
        self._draining: dict[int, str] = {}  # slot -> the adapter it is draining
        self._reclaims: dict[int, Reclaim] = {}  # slot -> its pending reclaim; the slot admits no one
        self._wanting_slot: set[str] = set()  # adapters refused a slot in this admission pass
        self.requests_paused = 0

    def begin_admission_pass(self, now: float, in_flight: set[int]) -> None:
        """Ends the drains that are over and settles reclaims (`in_flight`: ids of the requests
        that forwards in flight hold)."""
        # A drain ends when its slot changed hands, or when no adapter waited for a slot last pass.
        self._draining = {slot: name for slot, name in self._draining.items()
                          if self._wanting_slot and self._tier.owner_of(slot) == name}
        self._wanting_slot = set()
        self._settle_reclaims(now, in_flight)

    def admits_to(self, slot: int) -> bool:
        return slot not in self._draining and slot not in self._reclaims

    def leaving(self) -> set[int]:
        """Ids of the requests marked to pause: they leave the batches at once."""
        return {id(reclaim.victim) for reclaim in self._reclaims.values()}

    def draining_adapters(self) -> list[str]:
        return list(self._draining.values())

    def requests_to_pause(self) -> list[str]:
        return [reclaim.victim.request_id for reclaim in self._reclaims.values()]

    # Draining ----------------------------------------------------------------------------------

    def slot_refused(self, adapter: str, waited_s: float) -> None:
        """`adapter` found no free or evictable slot for a request that has waited `waited_s`:
        once that is `drain_after_s`, a slot starts draining for it."""
        if waited_s >= self._config.drain_after_s:
            self._wanting_slot.add(adapter)
            self._drain_for_waiting_adapters()

    def _drain_for_waiting_adapters(self) -> None:
        """Stops admitting to the slots that free soonest, one per adapter waiting for a slot."""
        limit = min(len(self._wanting_slot), self._config.max_draining_slots)
        # Only slots a waiting adapter may take (one with modules_to_save: the saved-module slots).
        wanted = {slot for name in self._wanting_slot if (adapter := self._tier.get(name)) is not None
                  for slot in self._tier.slots_for(adapter)}
        while len(self._draining) < limit:
            slot = self._soonest_free_slot(wanted)
            if slot is None:
                return
            self._draining[slot] = self._tier.owner_of(slot)

    def _soonest_free_slot(self, wanted: set[int]) -> int | None:
        """The resident, not yet draining slot of `wanted` whose running requests have the fewest tokens left."""
        tokens_left: dict[int, int] = {}
        for request in self._running:
            if request.slot >= 0:
                left = request.sampling.max_new_tokens - len(request.generated)
                tokens_left[request.slot] = max(tokens_left.get(request.slot, 0), left)
        candidates = [slot for slot in self._tier.resident_slots()
                      if slot in wanted and slot not in self._draining and slot not in self._reclaims]
        return min(candidates, key=lambda slot: tokens_left.get(slot, 0), default=None)

    # Reclaiming ----------------------------------------------------------------------------------

    def reclaim_slot_for(self, request: Request, adapter: Adapter) -> None:
        """Every slot is referenced: marks the running request with the most tokens left, alone
        on its slot, to pause, if it has `pause_tokens_ratio` times the tokens `request` asks
        for. One reclaim at a time per adapter; none where a slot would not let `request` start
        (no host room for the adapter, or no KV pages for a new request)."""
        if (math.isinf(self._config.pause_tokens_ratio) or adapter.slot is not None
                or any(reclaim.for_adapter == adapter.name for reclaim in self._reclaims.values())
                or self._tier.free_slot(adapter) is not None or self._tier.slot_victim(adapter) is not None
                or (adapter.state is AdapterState.ON_DISK and not self._tier.host_has_room(adapter))
                or (request.phase is Phase.WAITING and not self._pages.can_allocate(request.kv_tokens))):
            return
        victim = self._pause_victim(request.tokens_left * self._config.pause_tokens_ratio)
        if victim is not None:
            self._reclaims[victim.slot] = Reclaim(victim, adapter.name)

    def _pause_victim(self, min_tokens_left: float) -> Request | None:
        pausing = self.leaving()
        candidates = [r for r in self._running
                      if r.adapter and id(r) not in pausing and r.tokens_left >= min_tokens_left
                      and r.pauses < self._config.max_pauses_per_request and r.slot not in self._draining
                      and self._tier[r.adapter].references == 1
                      and self._tier[r.adapter].state is AdapterState.RESIDENT]
        return max(candidates, key=lambda r: r.tokens_left, default=None)

    def _settle_reclaims(self, now: float, in_flight: set[int]) -> None:
        """Pauses marked requests that no forward in flight holds any more (their last token is
        back); ends reclaims whose slot changed hands or whose adapter no longer needs one (a
        victim still running then simply goes on)."""
        for slot, reclaim in list(self._reclaims.items()):
            wanted = self._tier.get(reclaim.for_adapter)
            if (self._tier.owner_of(slot) != reclaim.victim.adapter or wanted is None
                    or wanted.waiting == 0 or wanted.slot is not None):
                del self._reclaims[slot]
            elif reclaim.victim.phase is Phase.RUNNING and id(reclaim.victim) not in in_flight:
                self._pause(reclaim.victim, now)

    # Pause and resume ----------------------------------------------------------------------------

    def _pause(self, request: Request, now: float) -> None:
        self._running.remove(request)
        request.phase = Phase.PAUSED
        request.pauses += 1
        request.waiting_since = now
        self._waiting.append(request)
        self._tier.request_paused(request.adapter, now)
        self.requests_paused += 1
        log.debug("request paused", extra={"request_id": request.request_id, "slot": request.slot,
                                           "tokens_left": request.tokens_left})

    def resume(self, request: Request, now: float) -> None:
        """Back on its adapter's slot, with the KV pages it kept; its next input is its last
        sampled token, sent as tokens (the forward that sampled it is long answered)."""
        self._waiting.remove(request)
        request.waited_before_s += now - request.waiting_since
        request.phase = Phase.RUNNING
        request.slot = self._tier.request_started(request.adapter, now).slot
        self._running.append(request)
        log.debug("request resumed", extra={"request_id": request.request_id, "slot": request.slot})
