"""Scheduling policy, free of sockets: feed it events, take out worker commands and outputs.

Each step: admit waiting requests (those that waited `drain_after_s` in arrival order, then
the shortest), starting the adapter loads they need so loads overlap the step that follows;
then build one ragged batch of decodes and prefill chunks under the token budget. With
overlap on, only requests whose adapter is resident run; the rest are admitted as their
loads complete. With overlap off (the seed's baseline) a request's load is issued as a
blocking load ahead of the forward, stalling it.

Steps are scheduled one ahead (`max_forwards_in_flight`, 2 by default): the next batch is
sent while the worker runs the current one, so the GPU never waits for this process. A
request whose token is still being sampled decodes it blind (`previous_token`: the worker
feeds it on the GPU); if that token ends the request, the extra step's token is dropped.

Slot preemption (`pause_tokens_ratio`): a request that finds every slot referenced may pause
a much longer running request that is alone on its slot. The victim leaves the batches at
once but pauses only when no forward in flight holds it; it keeps its KV pages and queues
again, and on resumption feeds its last sampled token as an ordinary input.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from protos.loraserve.v1 import internal_pb2 as pb
from protos.loraserve.v1 import serving_pb2
from scheduler.adapters import Adapter, AdapterState, AdapterTable
from scheduler.metrics import SchedulerMetrics
from scheduler.pages import PageAllocator
from scheduler.requests import Phase, Request, Sampling
from settings.config import SchedulerConfig


log = logging.getLogger("loraserve.scheduler")
TRACE_CAPACITY = 100_000  # request spans kept for the timeline


class RequestRejected(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class Counters:
    requests_finished: int = 0
    requests_aborted: int = 0
    forward_steps: int = 0
    loads_started: int = 0
    loads_finished: int = 0
    requests_paused: int = 0
    worker_forward_seconds: float = 0.0
    scheduler_step_seconds: float = 0.0


UnloadDone = Callable[[], None]


@dataclass(frozen=True)
class InFlightForward:
    members: list[Request]
    sampling: list[Request]  # the members that sample a token in it


@dataclass(frozen=True)
class Reclaim:
    """A slot freed for `for_adapter` by pausing `victim`, the only request running on it."""

    victim: Request
    for_adapter: str


@dataclass
class PendingUnload:
    name: str
    on_done: list[UnloadDone] = field(default_factory=list)


class SchedulerCore:
    def __init__(self, config: SchedulerConfig, hello: pb.WorkerHello) -> None:
        self.config = config
        self.hello = hello
        self.pages = PageAllocator(hello.num_kv_pages, hello.page_size)
        self.adapters = AdapterTable(hello.max_loras_per_batch, hello.host_cache_bytes, hello.max_loaded_loras)
        self.eos_token_ids = frozenset(hello.eos_token_ids)
        self.requests: dict[str, Request] = {}
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.commands: list[pb.WorkerCommand] = []
        self.outputs: list[tuple[bytes, pb.SchedulerMessage]] = []
        self.unloads: dict[str, PendingUnload] = {}
        self.counters = Counters()
        self.metrics = SchedulerMetrics()
        # Slots that admit no new request until their running ones finish and the slot goes to
        # an adapter that waits for one. Sticky: a drain is never abandoned halfway.
        self.draining: dict[int, str] = {}  # slot -> the adapter it is draining
        self.reclaims: dict[int, Reclaim] = {}  # slot -> its pending reclaim; the slot admits no one
        self._wanting_slot: set[str] = set()  # adapters refused a slot in this admission pass
        self._idle_before_admission = True  # no request ran when this admission pass began
        self.forwards_in_flight: deque[InFlightForward] = deque()  # oldest first
        self.request_trace: deque[dict] = deque(maxlen=TRACE_CAPACITY)

    # Requests -------------------------------------------------------------------------

    def submit(self, client: bytes, submit: pb.SubmitRequest) -> None:
        try:
            request = self._new_request(client, submit)
        except RequestRejected as rejection:
            self._emit_error(client, submit.request_id, rejection.code, str(rejection))
            return
        log.debug("request queued", extra={"request_id": request.request_id, "adapter": request.adapter,
                                           "prompt_tokens": len(request.prompt)})
        self.requests[request.request_id] = request
        self.waiting.append(request)
        if request.adapter:
            self.adapters[request.adapter].waiting += 1
            self.metrics.look_up(self.adapters[request.adapter])

    def _new_request(self, client: bytes, submit: pb.SubmitRequest) -> Request:
        if submit.request_id in self.requests:
            raise RequestRejected(pb.ALREADY_EXISTS, f"request id {submit.request_id!r} is already in use")
        if len(self.waiting) >= self.config.max_queued_requests:
            raise RequestRejected(pb.RESOURCE_EXHAUSTED,
                                  f"the queue is full ({self.config.max_queued_requests} requests waiting)")
        adapter = submit.adapter
        if adapter and (adapter not in self.adapters or self.adapters[adapter].unloading):
            raise RequestRejected(pb.NOT_FOUND, f"adapter {adapter!r} is not loaded")
        sampling = Sampling.from_proto(submit.sampling)
        total = len(submit.input_ids) + sampling.max_new_tokens
        if not submit.input_ids or total > self.hello.max_context_length:
            raise RequestRejected(pb.INVALID_ARGUMENT,
                                  f"prompt of {len(submit.input_ids)} tokens plus {sampling.max_new_tokens} new "
                                  f"tokens exceeds the context of {self.hello.max_context_length}")
        if self.pages.pages_for(total) > self.pages.num_pages:
            raise RequestRejected(pb.INVALID_ARGUMENT, f"{total} tokens exceed the whole KV cache")
        if any(t >= self.hello.vocab_size for t in submit.input_ids):
            raise RequestRejected(pb.INVALID_ARGUMENT, f"token ids must be below {self.hello.vocab_size}")
        return Request(submit.request_id, client, list(submit.input_ids), adapter, sampling,
                       arrival=time.monotonic())

    def abort(self, request_id: str) -> None:
        request = self.requests.get(request_id)
        if request is None:
            return
        self.counters.requests_aborted += 1
        self._finish(request, "abort")

    # Adapter events -------------------------------------------------------------------

    def on_load_events(self, events: pb.LoadEvents) -> None:
        now = time.monotonic()
        for name in events.staged:
            adapter = self.adapters.adapters.get(name)
            if adapter is not None:
                self.metrics.host.finish(adapter, now)
            if adapter is not None and adapter.state is AdapterState.STAGING:
                adapter.state = AdapterState.HOST
        for loaded in events.loaded:
            adapter = self.adapters.adapters.get(loaded.name)
            if adapter is not None and adapter.slot == loaded.slot and adapter.state is AdapterState.LOADING:
                adapter.state = AdapterState.RESIDENT
                adapter.loaded_at = now
                self.counters.loads_finished += 1
                self.metrics.gpu.finish(adapter, now)
        for failed in events.failed:
            self.on_adapter_failed(failed.name, failed.error)
        self._complete_unloads()

    def on_adapter_failed(self, name: str, error: pb.Error) -> None:
        """A stage or load failed: roll the adapter back; requests fail unless it may pass later.

        Requests started while the load was landing (pipelined) ran on a slot that never got
        the adapter: they fail whatever the error, and their tokens still in flight are dropped.
        """
        self.metrics.fail(name)
        adapter = self.adapters.adapters.get(name)
        if adapter is None:
            return
        if adapter.state is AdapterState.LOADING:
            for request in [r for r in self.running if r.adapter == name]:
                self._emit_error(request.client, request.request_id, error.code,
                                 f"adapter {name!r} could not be loaded: {error.message}")
                self._drop(request)
        if adapter.slot is not None:
            self.adapters.slot_owner[adapter.slot] = None
            adapter.slot = None
        adapter.state = AdapterState.ON_DISK
        if error.code != pb.RESOURCE_EXHAUSTED:
            for request in [r for r in self.waiting if r.adapter == name]:
                self._emit_error(request.client, request.request_id, error.code,
                                 f"adapter {name!r} could not be loaded: {error.message}")
                self._drop(request)

    def on_blocking_load_done(self, name: str) -> None:
        """The worker answered a blocking load: the copy is done (the core counted it resident when issued)."""
        adapter = self.adapters.adapters.get(name)
        if adapter is not None:
            self.metrics.gpu.finish(adapter, time.monotonic())

    def register(self, registered: pb.RegisteredAdapter, path: str) -> Adapter:
        adapter = Adapter(registered.name, path, registered.rank, registered.size_bytes,
                          tuple(registered.target_modules))
        self.adapters.add(adapter)
        return adapter

    def begin_unload(self, name: str, on_done: UnloadDone) -> None:
        """Marks the adapter unloading; `on_done()` runs once it is unreferenced and gone."""
        adapter = self.adapters[name]
        adapter.unloading = True
        self.unloads.setdefault(name, PendingUnload(name)).on_done.append(on_done)
        self._complete_unloads()

    def _complete_unloads(self) -> None:
        for name, unload in list(self.unloads.items()):
            adapter = self.adapters[name]
            if adapter.references or adapter.waiting or adapter.state in (AdapterState.STAGING, AdapterState.LOADING):
                continue
            if adapter.slot is not None:
                self.commands.append(pb.WorkerCommand(evict_slot=pb.EvictSlot(slot=adapter.slot)))
            self.commands.append(pb.WorkerCommand(unregister_adapter=pb.UnregisterAdapter(name=name)))
            self.adapters.remove(name)
            del self.unloads[name]
            for callback in unload.on_done:
                callback()

    # Steps ----------------------------------------------------------------------------

    @property
    def can_schedule(self) -> bool:
        return len(self.forwards_in_flight) < self.config.max_forwards_in_flight

    def schedule(self) -> pb.Forward | None:
        """Admits what it can, starts loads, and returns the next batch (None: nothing to run)."""
        if not self.can_schedule:
            return None
        self._admit()
        if self.config.prefetch:
            self._prefetch()
        batch, step = self._build_batch()
        if not step.members:
            return None
        self.forwards_in_flight.append(step)
        self.counters.forward_steps += 1
        return batch

    def _admit(self) -> None:
        now = time.monotonic()
        # A drain ends when its slot changed hands, or when no adapter waited for a slot last pass.
        self.draining = {slot: name for slot, name in self.draining.items()
                         if self._wanting_slot and self.adapters.slot_owner[slot] == name}
        self._wanting_slot = set()
        self._settle_reclaims(now)
        self._idle_before_admission = not self.running
        for request in self._admission_order(now):
            if len(self.running) >= self.config.max_running_requests:
                return
            if not self._adapter_ready(request, now):
                continue
            if request.phase is Phase.PAUSED:
                self._resume(request, now)
                continue
            if not self.pages.can_allocate(self._pages_tokens(request)):
                return  # later requests in this order wait behind this one for pages
            self._start_running(request, now)

    @staticmethod
    def _pages_tokens(request: Request) -> int:
        return len(request.prompt) + request.sampling.max_new_tokens

    def _admission_order(self, now: float) -> list[Request]:
        """Requests that have waited `drain_after_s` first, oldest first (they may drain a slot);
        then those whose adapter holds a slot, so they reference it before another request looks
        for an idle slot to take; then the rest by fewest new tokens. That order decides who
        takes a slot that frees: with more adapters asked for than slots, the request that gives
        it back soonest lets the most requests start (shortest job first). Tokens left is
        exact for requests that ignore EOS and a bound for others; ties keep queue order. A
        paused request counts its queued time before admission and while paused, and queues
        again behind the requests waiting when it paused."""
        def key(request: Request) -> tuple[int, int]:
            if request.waited_s(now) >= self.config.drain_after_s:
                return 0, 0
            if not request.adapter or self.adapters[request.adapter].slot is not None:
                return 1, 0
            return 2, request.tokens_left

        return sorted(self.waiting, key=key)

    def _adapter_ready(self, request: Request, now: float) -> bool:
        if not request.adapter:
            return True
        adapter = self.adapters[request.adapter]
        if adapter.state is AdapterState.RESIDENT:
            return adapter.slot not in self.draining and adapter.slot not in self.reclaims
        if not self._ensure_loading(adapter, waited_s=request.waited_s(now)):
            self._reclaim_slot_for(request, adapter)
            return False
        # Blocking mode: the copy is done before the next forward. Pipelined loads on an idle
        # server: the request starts at once (the worker starts every load when it arrives, one
        # still being read from disk streaming layer by layer) and its forward waits per layer
        # on the copy; with other requests running it waits, so their decoding never does
        # (requests admitted beside it in the same pass have not decoded yet).
        if not self.config.overlap_loading:
            return True
        return self.config.pipelined_loads and self._idle_before_admission

    def _ensure_loading(self, adapter: Adapter, waited_s: float) -> bool:
        """Starts staging and loading `adapter` if a slot can be had; True once it has a slot."""
        if adapter.state is AdapterState.LOADING:
            return True
        # Host room before a slot: evicting a slot for an adapter that cannot be staged would
        # free it for a moment only, and the next step would evict the adapter reloaded into it.
        if adapter.state is AdapterState.ON_DISK and not self._make_host_room(adapter):
            return False
        slot = self._claim_slot(adapter, waited_s)
        if slot is None:
            return False
        if adapter.state is AdapterState.ON_DISK:
            self._stage(adapter)
        self.adapters.assign_slot(adapter, slot)
        blocking = not self.config.overlap_loading
        self.commands.append(pb.WorkerCommand(load_slot=pb.LoadSlot(name=adapter.name, slot=slot, blocking=blocking)))
        self.counters.loads_started += 1
        self.metrics.gpu.start(adapter.name, time.monotonic())
        if blocking:  # the worker finishes the copy before it runs the next forward
            adapter.state = AdapterState.RESIDENT
            adapter.loaded_at = time.monotonic()
            self.counters.loads_finished += 1
        return True

    def _claim_slot(self, adapter: Adapter, waited_s: float) -> int | None:
        """A free or evictable slot; else, once the adapter's oldest request has waited
        `drain_after_s`, a slot starts draining for it."""
        slot = self.adapters.free_slot()
        if slot is not None:
            return slot
        slot = self.adapters.slot_victim()
        if slot is None:
            if waited_s >= self.config.drain_after_s:
                self._wanting_slot.add(adapter.name)
                self._drain_for_waiting_adapters()
            return None
        victim = self.adapters[self.adapters.slot_owner[slot]]
        self.adapters.release_slot(victim)
        self.commands.append(pb.WorkerCommand(evict_slot=pb.EvictSlot(slot=slot)))
        return slot

    def _drain_for_waiting_adapters(self) -> None:
        """Every slot is referenced: stop admitting to the slots that free soonest, one per
        adapter waiting for a slot (at most `max_draining_slots`), so waiting requests cannot
        starve behind a stream of requests for resident adapters."""
        limit = min(len(self._wanting_slot), self.config.max_draining_slots)
        while len(self.draining) < limit:
            slot = self._soonest_free_slot()
            if slot is None:
                return
            self.draining[slot] = self.adapters.slot_owner[slot]

    def _soonest_free_slot(self) -> int | None:
        """The resident, not yet draining slot whose running requests have the fewest tokens left."""
        tokens_left: dict[int, int] = {}
        for request in self.running:
            if request.slot >= 0:
                left = request.sampling.max_new_tokens - len(request.generated)
                tokens_left[request.slot] = max(tokens_left.get(request.slot, 0), left)
        candidates = [slot for slot, owner in enumerate(self.adapters.slot_owner)
                      if owner is not None and slot not in self.draining and slot not in self.reclaims
                      and self.adapters[owner].state is AdapterState.RESIDENT]
        return min(candidates, key=lambda slot: tokens_left.get(slot, 0), default=None)

    # Slot preemption ---------------------------------------------------------------------

    def _reclaim_slot_for(self, request: Request, adapter: Adapter) -> None:
        """Every slot is referenced: marks the running request with the most tokens left, alone
        on its slot, to pause, if it has `pause_tokens_ratio` times the tokens `request` asks
        for. One reclaim at a time per adapter; none where a slot would not let `request` start
        (no host room for the adapter, or no KV pages for a new request)."""
        if (math.isinf(self.config.pause_tokens_ratio) or adapter.slot is not None
                or any(reclaim.for_adapter == adapter.name for reclaim in self.reclaims.values())
                or self.adapters.free_slot() is not None or self.adapters.slot_victim() is not None
                or (adapter.state is AdapterState.ON_DISK and not self.adapters.host_has_room(adapter))
                or (request.phase is Phase.WAITING and not self.pages.can_allocate(self._pages_tokens(request)))):
            return
        victim = self._pause_victim(request.tokens_left * self.config.pause_tokens_ratio)
        if victim is not None:
            self.reclaims[victim.slot] = Reclaim(victim, adapter.name)

    def _pause_victim(self, min_tokens_left: float) -> Request | None:
        pausing = {id(reclaim.victim) for reclaim in self.reclaims.values()}
        candidates = [r for r in self.running
                      if r.adapter and id(r) not in pausing and r.tokens_left >= min_tokens_left
                      and r.pauses < self.config.max_pauses_per_request and r.slot not in self.draining
                      and self.adapters[r.adapter].references == 1
                      and self.adapters[r.adapter].state is AdapterState.RESIDENT]
        return max(candidates, key=lambda r: r.tokens_left, default=None)

    def _settle_reclaims(self, now: float) -> None:
        """Pauses marked requests that no forward in flight holds any more (their last token is
        back); ends reclaims whose slot changed hands or whose adapter no longer needs one (a
        victim still running then simply goes on)."""
        in_flight = {id(r) for step in self.forwards_in_flight for r in step.members}
        for slot, reclaim in list(self.reclaims.items()):
            wanted = self.adapters.adapters.get(reclaim.for_adapter)
            if (self.adapters.slot_owner[slot] != reclaim.victim.adapter or wanted is None
                    or wanted.waiting == 0 or wanted.slot is not None):
                del self.reclaims[slot]
            elif reclaim.victim.phase is Phase.RUNNING and id(reclaim.victim) not in in_flight:
                self._pause(reclaim.victim, now)

    def _pause(self, request: Request, now: float) -> None:
        self.running.remove(request)
        request.phase = Phase.PAUSED
        request.pauses += 1
        request.waiting_since = now
        self.waiting.append(request)
        adapter = self.adapters[request.adapter]
        adapter.references -= 1
        adapter.waiting += 1
        adapter.last_used = now
        self.counters.requests_paused += 1
        log.debug("request paused", extra={"request_id": request.request_id, "slot": request.slot,
                                           "tokens_left": request.tokens_left})

    def _resume(self, request: Request, now: float) -> None:
        """Back on its adapter's slot, with the KV pages it kept; its next input is its last
        sampled token, sent as tokens (the forward that sampled it is long answered)."""
        self.waiting.remove(request)
        request.waited_before_s += now - request.waiting_since
        request.phase = Phase.RUNNING
        adapter = self.adapters[request.adapter]
        adapter.waiting -= 1
        adapter.references += 1
        adapter.last_used = now
        request.slot = adapter.slot
        self.running.append(request)
        log.debug("request resumed", extra={"request_id": request.request_id, "slot": request.slot})

    def _make_host_room(self, adapter: Adapter) -> bool:
        while not self.adapters.host_has_room(adapter):
            victim = self.adapters.host_victim(keep={adapter.name})
            if victim is None:
                return False
            victim.state = AdapterState.ON_DISK
            self.commands.append(pb.WorkerCommand(evict_host=pb.EvictHost(name=victim.name)))
        return True

    def _prefetch(self) -> None:
        """Fills never-used capacity ahead of demand: host memory first, then free slots."""
        for adapter in list(self.adapters.adapters.values()):
            if adapter.unloading:
                continue
            if adapter.state is AdapterState.ON_DISK and self.adapters.host_has_room(adapter):
                self._stage(adapter)
            if adapter.state is AdapterState.HOST and self.adapters.free_slot() is not None:
                self._ensure_loading(adapter, waited_s=0.0)

    def _stage(self, adapter: Adapter) -> None:
        adapter.state = AdapterState.STAGING
        self.commands.append(pb.WorkerCommand(stage_adapter=pb.StageAdapter(name=adapter.name)))
        self.metrics.host.start(adapter.name, time.monotonic())

    def _start_running(self, request: Request, now: float) -> None:
        self.waiting.remove(request)
        request.waited_before_s = now - request.arrival
        request.phase = Phase.RUNNING
        request.admitted_at = now
        request.pages = self.pages.allocate(self._pages_tokens(request))
        if request.adapter:
            adapter = self.adapters[request.adapter]
            adapter.waiting -= 1
            adapter.references += 1
            adapter.last_used = now
            request.slot = adapter.slot
            # A pipelined start (copy still running) waited for the adapter until now.
            ready_at = now if adapter.state is AdapterState.LOADING else (adapter.loaded_at or request.arrival)
            request.adapter_ready_at = max(request.arrival, ready_at)
        else:
            request.adapter_ready_at = request.arrival
        self.running.append(request)
        log.debug("request admitted", extra={"request_id": request.request_id, "slot": request.slot,
                                             "queued_ms": round((now - request.arrival) * 1e3, 2)})

    def _build_batch(self) -> tuple[pb.Forward, InFlightForward]:
        budget = self.config.max_batch_tokens
        batch = pb.Forward()
        step = InFlightForward([], [])
        pausing = {id(reclaim.victim) for reclaim in self.reclaims.values()}
        decodes = [r for r in self.running if not r.in_prefill and id(r) not in pausing]
        prefills = [r for r in self.running if r.in_prefill and id(r) not in pausing]
        for request in decodes + prefills:
            if budget <= 0:
                break
            if request.tokens_in_flight:
                if not self._may_decode_blind(request):
                    continue
                self._add_previous_token(batch, request)
                budget -= 1
            else:
                count = min(request.num_tokens - request.fed, budget)
                budget -= count
                self._add_sequence(batch, request, count)
            step.members.append(request)
            if batch.sequences[-1].sample:
                request.tokens_in_flight += 1
                step.sampling.append(request)
        return batch, step

    def _may_decode_blind(self, request: Request) -> bool:
        """Its token in flight is the last sampled one, and may not be its last token."""
        return (request.tokens_in_flight == 1 and request.fed == request.num_tokens
                and len(request.generated) + 1 < request.sampling.max_new_tokens)

    def _add_sequence(self, batch: pb.Forward, request: Request, count: int) -> None:
        batch.sequences.add(
            request_id=request.request_id,
            token_ids=request.tokens_from(request.fed, count),
            context_len=request.fed,
            page_table=request.pages,
            adapter_slot=request.slot,
            sample=request.fed + count == request.num_tokens,
            sampling=request.sampling.worker_params,
        )
        request.fed += count

    def _add_previous_token(self, batch: pb.Forward, request: Request) -> None:
        batch.sequences.add(
            request_id=request.request_id,
            previous_token=True,
            context_len=request.fed,
            page_table=request.pages,
            adapter_slot=request.slot,
            sample=True,
            sampling=request.sampling.worker_params,
        )
        request.fed += 1

    def on_forward_result(self, result: pb.ForwardResult | None, error: pb.Error | None = None) -> None:
        """The oldest forward in flight has ended (the worker answers in order)."""
        step = self.forwards_in_flight.popleft() if self.forwards_in_flight else InFlightForward([], [])
        for request in step.sampling:
            request.tokens_in_flight -= 1
        if error is not None:
            for request in step.members:
                if request.phase is Phase.RUNNING:
                    self._emit_error(request.client, request.request_id, error.code, error.message)
                    self._drop(request)
            return
        self.counters.worker_forward_seconds += result.forward_ms / 1e3
        self.metrics.worker_forward_seconds.observe(result.forward_ms / 1e3)
        now = time.monotonic()
        for token in result.tokens:
            request = self.requests.get(token.request_id)
            if request is None or request.phase is not Phase.RUNNING:
                continue  # aborted while the forward ran
            self._append_token(request, token, now)

    def _append_token(self, request: Request, token: pb.SampledToken, now: float) -> None:
        request.generated.append(token.token_id)
        if request.first_token_at is None:
            request.first_token_at = now
        output = pb.RequestOutput(request_id=request.request_id, token_ids=[token.token_id])
        if token.HasField("logprob"):
            output.logprobs.append(token.logprob)
        reason = self._finish_reason(request, token.token_id)
        if reason is None:
            self.outputs.append((request.client, pb.SchedulerMessage(output=output)))
            return
        self.counters.requests_finished += 1
        self._finish(request, reason, output)

    def _finish_reason(self, request: Request, token_id: int) -> str | None:
        s = request.sampling
        if token_id in s.stop_token_ids or (token_id in self.eos_token_ids and not s.ignore_eos):
            return "stop"
        if len(request.generated) >= s.max_new_tokens:
            return "length"
        return None

    def _finish(self, request: Request, reason: str, output: pb.RequestOutput | None = None) -> None:
        output = output or pb.RequestOutput(request_id=request.request_id)
        output.finished = True
        output.finish_reason = reason
        output.prompt_tokens = len(request.prompt)
        output.timing.CopyFrom(request.timing(time.monotonic()))
        self.outputs.append((request.client, pb.SchedulerMessage(output=output)))
        log.debug("request finished", extra={"request_id": request.request_id, "finish_reason": reason,
                                             "output_tokens": len(request.generated)})
        self._trace(request, reason)
        self._drop(request)

    def _trace(self, request: Request, reason: str) -> None:
        """Queued and running spans of a finished request, in wall-clock microseconds."""
        to_wall = time.time() - time.monotonic()
        args = {"request_id": request.request_id, "adapter": request.adapter, "finish_reason": reason,
                "prompt_tokens": len(request.prompt), "output_tokens": len(request.generated)}
        admitted = request.admitted_at or time.monotonic()
        spans = [("queued", request.arrival, admitted)]
        if request.admitted_at is not None:
            spans.append(("running", admitted, time.monotonic()))
        for name, start, end in spans:
            self.request_trace.append({"name": name, "ph": "X", "pid": "scheduler", "tid": request.request_id,
                                       "ts": (start + to_wall) * 1e6, "dur": (end - start) * 1e6, "args": args})

    def _drop(self, request: Request) -> None:
        """Releases everything the request holds."""
        self.requests.pop(request.request_id, None)
        if request.phase in (Phase.WAITING, Phase.PAUSED):
            self.waiting.remove(request)
            if request.adapter in self.adapters:
                self.adapters[request.adapter].waiting -= 1
        elif request.phase is Phase.RUNNING:
            self.running.remove(request)
            if request.adapter in self.adapters:
                adapter = self.adapters[request.adapter]
                adapter.references -= 1
                adapter.last_used = time.monotonic()
        self.pages.release(request.pages)  # a paused request keeps its pages
        request.pages = []
        request.phase = Phase.FINISHED
        self._complete_unloads()

    def fail_all(self, code: int, message: str) -> None:
        """The worker is gone: every request ends with `code`."""
        for request in list(self.requests.values()):
            self._emit_error(request.client, request.request_id, code, message)
            self._drop(request)
        self.forwards_in_flight.clear()

    def _emit_error(self, client: bytes, request_id: str, code: int, message: str) -> None:
        log.info("request failed", extra={"request_id": request_id, "code": pb.ErrorCode.Name(code), "error": message})
        output = pb.RequestOutput(request_id=request_id, finished=True, error=pb.Error(code=code, message=message))
        self.outputs.append((client, pb.SchedulerMessage(output=output)))

    # Introspection --------------------------------------------------------------------

    def stats(self) -> serving_pb2.ServerStats:
        c = self.counters
        return serving_pb2.ServerStats(
            waiting_requests=len(self.waiting), running_requests=len(self.running),
            kv_pages_used=self.pages.used, kv_pages_total=self.pages.num_pages,
            slot_references=sum(a.references for a in self.adapters.adapters.values()),
            slots_used=self.adapters.slots_used, host_cache_bytes=self.adapters.host_bytes,
            requests_finished=c.requests_finished, requests_aborted=c.requests_aborted,
            forward_steps=c.forward_steps, loads_started=c.loads_started, loads_finished=c.loads_finished,
            worker_forward_seconds=c.worker_forward_seconds, scheduler_step_seconds=c.scheduler_step_seconds,
            requests_paused=c.requests_paused,
        )

    def metrics_snapshot(self) -> pb.MetricsSnapshot:
        m = self.metrics
        return pb.MetricsSnapshot(
            stats=self.stats(), gpu_slots_total=len(self.adapters.slot_owner),
            host_cache_capacity_bytes=self.adapters.host_capacity_bytes,
            adapters_registered=len(self.adapters.adapters), host=m.host.to_proto(), gpu=m.gpu.to_proto(),
            worker_forward_seconds=m.worker_forward_seconds.to_proto(),
        )

    def take_commands(self) -> list[pb.WorkerCommand]:
        commands, self.commands = self.commands, []
        return commands

    def take_outputs(self) -> list[tuple[bytes, pb.SchedulerMessage]]:
        outputs, self.outputs = self.outputs, []
        return outputs
