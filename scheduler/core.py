"""The scheduling sequencer, free of sockets: feed it events, take out worker commands and outputs.

It owns the request queues and sequences each step: admit waiting requests (those that waited
`drain_after_s` in arrival order, then the shortest), starting the adapter loads they need so
loads overlap the step that follows; then build one ragged batch of decodes and prefill chunks
under the token budget. With overlap on, only requests whose adapter is resident run; the rest
are admitted as their loads complete. With overlap off (the seed's baseline) a request's load is
issued as a blocking load ahead of the forward, stalling it.

Steps are scheduled one ahead (`max_forwards_in_flight`, 2 by default): the next batch is sent
while the worker runs the current one, so the GPU never waits for this process; if a token in
flight ends a request, the extra step's token is dropped. With overlap on, a request's adapter
load starts as the request arrives (into a free or idle slot), not at the next step: the copy
then runs beside the forwards in flight.

It delegates to three owners: `AdapterTier` (adapter states, slots, host room, loads, unloads
and every adapter command), `SlotContention` (drains, reclaims, pause and resume) and
`build_forward` (the batch).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass

from protos.loraserve.v1 import internal_pb2 as pb
from protos.loraserve.v1 import serving_pb2
from scheduler.adapter_tier import AdapterTier, LoadStart, UnloadDone
from scheduler.adapters import ON_GPU, AdapterState
from scheduler.batch_builder import InFlightForward, build_forward
from scheduler.landing import StepClock
from scheduler.metrics import SchedulerMetrics
from scheduler.pages import PageAllocator
from scheduler.request_trace import RequestTrace
from scheduler.requests import Phase, Request, Sampling
from scheduler.slot_contention import SlotContention
from settings.config import SchedulerConfig

log = logging.getLogger("loraserve.scheduler")


class RequestRejected(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class Counters:
    requests_finished: int = 0
    requests_aborted: int = 0
    forward_steps: int = 0
    worker_forward_seconds: float = 0.0
    scheduler_step_seconds: float = 0.0


class SchedulerCore:
    def __init__(self, config: SchedulerConfig, hello: pb.WorkerHello) -> None:
        self.config = config
        self.hello = hello
        self.requests: dict[str, Request] = {}
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.outputs: list[tuple[bytes, pb.SchedulerMessage]] = []
        self._eos_token_ids = frozenset(hello.eos_token_ids)
        self._pages = PageAllocator(hello.num_kv_pages, hello.page_size)
        self._metrics = SchedulerMetrics()
        self._tier = AdapterTier(hello.max_loras_per_batch, hello.host_cache_bytes, hello.max_loaded_loras,
                                 blocking_loads=not config.overlap_loading, metrics=self._metrics,
                                 saved_module_slots=hello.saved_module_slots)
        self._contention = SlotContention(config, self._tier, self._pages, self.running, self.waiting)
        self._counters = Counters()
        self._idle_before_admission = True  # no request ran when this admission pass began
        self._forwards_in_flight: deque[InFlightForward] = deque()  # oldest first
        self._steps = StepClock()
        self._trace = RequestTrace()

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
            self._tier.request_queued(request.adapter)
            self._start_load_on_arrival(request)

    def _start_load_on_arrival(self, request: Request) -> None:
        """With overlap on, a request's adapter starts loading as it arrives, into a slot free or
        idle now, not at the next admission pass (up to a step later while forwards are in
        flight): the copy runs beside them. Never ahead of a waiting request that still needs a
        slot (it goes first), nor into the idle slot of an adapter whose requests await admission."""
        adapter = self._tier[request.adapter]
        # The queue is scanned last: under load every slot is usually referenced.
        if (self.config.overlap_loading and adapter.state not in ON_GPU and self._tier.slot_unclaimed_by_waiters(adapter)
                and not self._waiting_for_slots(besides=request)):
            self._tier.start_loading(adapter)

    def _waiting_for_slots(self, besides: Request) -> bool:
        """Whether another waiting request has its adapter neither on the GPU nor loading."""
        return any(r.adapter and r is not besides and self._tier[r.adapter].state not in ON_GPU for r in self.waiting)

    def _new_request(self, client: bytes, submit: pb.SubmitRequest) -> Request:
        if submit.request_id in self.requests:
            raise RequestRejected(pb.ALREADY_EXISTS, f"request id {submit.request_id!r} is already in use")
        if len(self.waiting) >= self.config.max_queued_requests:
            raise RequestRejected(pb.RESOURCE_EXHAUSTED,
                                  f"the queue is full ({self.config.max_queued_requests} requests waiting)")
        adapter = submit.adapter
        if adapter and not self._tier.accepts_requests(adapter):
            raise RequestRejected(pb.NOT_FOUND, f"adapter {adapter!r} is not loaded")
        sampling = Sampling.from_proto(submit.sampling)
        total = len(submit.input_ids) + sampling.max_new_tokens
        if not submit.input_ids or total > self.hello.max_context_length:
            raise RequestRejected(pb.INVALID_ARGUMENT,
                                  f"prompt of {len(submit.input_ids)} tokens plus {sampling.max_new_tokens} new "
                                  f"tokens exceeds the context of {self.hello.max_context_length}")
        if self._pages.pages_for(total) > self._pages.num_pages:
            raise RequestRejected(pb.INVALID_ARGUMENT, f"{total} tokens exceed the whole KV cache")
        if any(t >= self.hello.vocab_size for t in submit.input_ids):
            raise RequestRejected(pb.INVALID_ARGUMENT, f"token ids must be below {self.hello.vocab_size}")
        return Request(submit.request_id, client, list(submit.input_ids), adapter, sampling,
                       arrival=time.monotonic())

    def abort(self, request_id: str) -> None:
        request = self.requests.get(request_id)
        if request is None:
            return
        self._counters.requests_aborted += 1
        self._finish(request, "abort")

    # Adapter events -------------------------------------------------------------------

    def register(self, registered: pb.RegisteredAdapter, path: str) -> serving_pb2.AdapterInfo:
        return self._tier.register(registered, path).info()

    def on_load_events(self, events: pb.LoadEvents) -> None:
        now = time.monotonic()
        for name in events.staged:
            self._tier.on_staged(name, now)
        for loaded in events.loaded:
            self._tier.on_loaded(loaded.name, loaded.slot, now, loaded.copy_s)
        for failed in events.failed:
            self.on_adapter_failed(failed.name, failed.error)
        for copying in events.copying:
            self._tier.load_clock.progress(copying.name, copying.landed, now)
        self._tier.complete_unloads()

    def on_adapter_failed(self, name: str, error: pb.Error) -> None:
        """A stage or load failed: roll the adapter back; requests fail unless it may pass later.

        Requests started while the load was landing (pipelined) ran on a slot that never got
        the adapter: they fail whatever the error, and their tokens still in flight are dropped.
        """
        state = self._tier.load_failed(name, error.message)
        if state is None:
            return
        message = f"adapter {name!r} could not be loaded: {error.message}"
        if state is AdapterState.LOADING:
            self._fail_requests_for(name, self.running, error.code, message)
        self._tier.roll_back_to_disk(name)
        if error.code != pb.RESOURCE_EXHAUSTED:
            self._fail_requests_for(name, self.waiting, error.code, message)

    def _fail_requests_for(self, adapter: str, queue: list[Request] | deque[Request], code: int,
                           message: str) -> None:
        for request in [r for r in queue if r.adapter == adapter]:
            self._emit_error(request.client, request.request_id, code, message)
            self._drop(request)

    def on_blocking_load_done(self, name: str) -> None:
        self._tier.on_blocking_load_done(name)

    def begin_unload(self, name: str, on_done: UnloadDone) -> None:
        """Marks the adapter unloading; `on_done()` runs once it is unreferenced and gone."""
        self._tier.begin_unload(name, on_done)

    def answer_pending_unloads(self) -> None:
        """The worker is gone: every pending unload's `on_done()` runs (the next worker never has
        the adapter)."""
        self._tier.answer_pending_unloads()

    # Steps ----------------------------------------------------------------------------

    def schedule(self) -> pb.Forward | None:
        """Admits what it can, starts loads, and returns the next batch (None: nothing to run)."""
        if len(self._forwards_in_flight) >= self.config.max_forwards_in_flight:
            return None
        self._admit()
        if self.config.prefetch:
            self._tier.prefetch()
        batch, step = build_forward(self.running, self._contention.leaving(), self.config.max_batch_tokens)
        if not step.members:
            return None
        self._forwards_in_flight.append(step)
        self._counters.forward_steps += 1
        return batch

    def _admit(self) -> None:
        now = time.monotonic()
        self._contention.begin_admission_pass(now, self._ids_in_flight())
        self._idle_before_admission = not self.running
        for request in self.admission_order(now):
            if len(self.running) >= self.config.max_running_requests:
                return
            if not self._adapter_ready(request, now):
                continue
            if request.phase is Phase.PAUSED:
                self._contention.resume(request, now)
                continue
            if not self._pages.can_allocate(request.kv_tokens):
                return  # later requests in this order wait behind this one for pages
            self._start_running(request, now)

    def _ids_in_flight(self) -> set[int]:
        return {id(r) for step in self._forwards_in_flight for r in step.members}

    def admission_order(self, now: float) -> list[Request]:
        """Requests that have waited `drain_after_s` first, oldest first (they may drain a slot);
        then those whose adapter holds a slot, so they reference it before another request looks
        for an idle slot to take; then the rest by fewest new tokens. That order decides who
        takes a slot that frees: with more adapters asked for than slots, the request that gives
        it back soonest lets the most requests start (shortest job first). Tokens left is
        exact for requests that ignore EOS and a bound for others; ties keep queue order. A
        paused request counts its queued time before admission and while paused, and queues
        again behind the requests waiting when it paused.

        Public so that a subclass can stand in another policy for comparison
        (benchmarks/slot_policy_sim.py)."""
        def key(request: Request) -> tuple[int, int]:
            if request.waited_s(now) >= self.config.drain_after_s:
                return 0, 0
            if not request.adapter or self._tier[request.adapter].slot is not None:
                return 1, 0
            return 2, request.tokens_left

        return sorted(self.waiting, key=key)

    def _adapter_ready(self, request: Request, now: float) -> bool:
        if not request.adapter:
            return True
        adapter = self._tier[request.adapter]
        if adapter.state is AdapterState.RESIDENT:
            return self._contention.admits_to(adapter.slot)
        started = self._tier.start_loading(adapter)
        if started is not LoadStart.STARTED:
            if started is LoadStart.NO_SLOT:
                self._contention.slot_refused(adapter.name, request.waited_s(now))
            self._contention.reclaim_slot_for(request, adapter)
            return False
        # Blocking mode: the copy is done before the next forward. Pipelined loads on an idle
        # server: the request starts at once (the worker starts every load when it arrives, one
        # still being read from disk streaming layer by layer) and its forward waits per layer
        # on the copy. Otherwise, once a worker report has shown the copy's pace (or the adapter's
        # last copy kept the learned pace), it joins the first forward predicted to meet the copy
        # at that pace without waiting for it, so that no request in that forward waits
        # (scheduler/landing.py).
        if not self.config.overlap_loading:
            return True
        if self.config.pipelined_loads and self._idle_before_admission:
            return True
        return self.config.admit_landing_loads and self._lands_in_time_for_next_forward(request, now)

    def _lands_in_time_for_next_forward(self, request: Request, now: float) -> bool:
        in_flight = [step.extra_tokens for step in self._forwards_in_flight]
        landing = self._tier.load_clock.landing(request.adapter, self._steps.next_start(now, in_flight))
        prompt_chunk = min(request.num_tokens - request.fed, self.config.max_batch_tokens)
        return landing is not None and self._steps.lands_in_time(*landing, now, in_flight,
                                                                  extra_tokens=prompt_chunk - 1)

    def _start_running(self, request: Request, now: float) -> None:
        self.waiting.remove(request)
        request.waited_before_s = now - request.arrival
        request.phase = Phase.RUNNING
        request.admitted_at = now
        request.pages = self._pages.allocate(request.kv_tokens)
        if request.adapter:
            adapter = self._tier.request_started(request.adapter, now)
            request.slot = adapter.slot
            # A pipelined start (copy still running) waited for the adapter until now.
            ready_at = now if adapter.state is AdapterState.LOADING else (adapter.loaded_at or request.arrival)
            request.adapter_ready_at = max(request.arrival, ready_at)
        else:
            request.adapter_ready_at = request.arrival
        self.running.append(request)
        log.debug("request admitted", extra={"request_id": request.request_id, "slot": request.slot,
                                             "queued_ms": round((now - request.arrival) * 1e3, 2)})

    # Results --------------------------------------------------------------------------

    def on_forward_result(self, result: pb.ForwardResult | None, error: pb.Error | None = None) -> None:
        """The oldest forward in flight has ended (the worker answers in order)."""
        step = self._forwards_in_flight.popleft() if self._forwards_in_flight else InFlightForward([], [])
        self._steps.result(time.monotonic(), len(self._forwards_in_flight), step.extra_tokens)
        for request in step.sampling:
            request.tokens_in_flight -= 1
        if error is not None:
            for request in step.members:
                if request.phase is Phase.RUNNING:
                    self._emit_error(request.client, request.request_id, error.code, error.message)
                    self._drop(request)
            return
        self._counters.worker_forward_seconds += result.forward_ms / 1e3
        self._metrics.worker_forward_seconds.observe(result.forward_ms / 1e3)
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
        self._counters.requests_finished += 1
        self._finish(request, reason, output)

    def _finish_reason(self, request: Request, token_id: int) -> str | None:
        s = request.sampling
        if token_id in s.stop_token_ids or (token_id in self._eos_token_ids and not s.ignore_eos):
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
        self._trace.record(request, reason)
        self._drop(request)

    def _drop(self, request: Request) -> None:
        """Releases everything the request holds."""
        self.requests.pop(request.request_id, None)
        if request.phase in (Phase.WAITING, Phase.PAUSED):
            self.waiting.remove(request)
            self._tier.request_left_queue(request.adapter)
        elif request.phase is Phase.RUNNING:
            self.running.remove(request)
            self._tier.request_stopped(request.adapter)
        self._pages.release(request.pages)  # a paused request keeps its pages
        request.pages = []
        request.phase = Phase.FINISHED
        self._tier.complete_unloads()

    def fail_all(self, code: int, message: str) -> None:
        """The worker is gone: every request ends with `code`."""
        for request in list(self.requests.values()):
            self._emit_error(request.client, request.request_id, code, message)
            self._drop(request)
        self._forwards_in_flight.clear()

    def _emit_error(self, client: bytes, request_id: str, code: int, message: str) -> None:
        log.info("request failed", extra={"request_id": request_id, "code": pb.ErrorCode.Name(code), "error": message})
        output = pb.RequestOutput(request_id=request_id, finished=True, error=pb.Error(code=code, message=message))
        self.outputs.append((client, pb.SchedulerMessage(output=output)))

    def add_scheduler_step_time(self, seconds: float) -> None:
        """The scheduler's own work from a forward's result to sending the next forward (or to having
        nothing more to send); never time spent waiting for requests or for the worker."""
        self._counters.scheduler_step_seconds += seconds

    # Queries --------------------------------------------------------------------------

    def has_requests(self) -> bool:
        return bool(self.waiting or self.running)

    def has_forward_in_flight(self) -> bool:
        return bool(self._forwards_in_flight)

    def request_ids_in_flight(self) -> set[str]:
        return {r.request_id for step in self._forwards_in_flight for r in step.members}

    def has_adapter(self, name: str) -> bool:
        """Registered and accepting requests (not being unloaded)."""
        return self._tier.accepts_requests(name)

    def adapter_infos(self) -> list[serving_pb2.AdapterInfo]:
        """Every registered adapter, unloading ones included, by name."""
        return self._tier.infos()

    def replica_state(self) -> pb.ReplicaState:
        """What the frontends' routers need: where adapters are, and how many requests are here."""
        on_gpu, in_host = self._tier.residency()
        return pb.ReplicaState(gpu_adapters=on_gpu, host_adapters=in_host,
                               requests=len(self.waiting) + len(self.running))

    def slot_owners(self) -> list[str | None]:
        """The adapter assigned to each GPU slot (loading or resident), None for a free slot."""
        return self._tier.slot_owners()

    def draining_adapters(self) -> list[str]:
        return self._contention.draining_adapters()

    def requests_to_pause(self) -> list[str]:
        return self._contention.requests_to_pause()

    def request_trace_events(self) -> list[dict]:
        return self._trace.events()

    def stats(self) -> serving_pb2.ServerStats:
        c = self._counters
        return serving_pb2.ServerStats(
            waiting_requests=len(self.waiting), running_requests=len(self.running),
            kv_pages_used=self._pages.used, kv_pages_total=self._pages.num_pages,
            slot_references=self._tier.references,
            slots_used=self._tier.slots_used, host_cache_bytes=self._tier.host_bytes,
            requests_finished=c.requests_finished, requests_aborted=c.requests_aborted,
            forward_steps=c.forward_steps, loads_started=self._tier.loads_started,
            loads_finished=self._tier.loads_finished,
            worker_forward_seconds=c.worker_forward_seconds, scheduler_step_seconds=c.scheduler_step_seconds,
            requests_paused=self._contention.requests_paused,
        )

    def metrics_snapshot(self) -> pb.MetricsSnapshot:
        m = self._metrics
        return pb.MetricsSnapshot(
            stats=self.stats(), gpu_slots_total=self._tier.num_slots,
            host_cache_capacity_bytes=self._tier.host_capacity_bytes,
            adapters_registered=self._tier.registered_count, host=m.host.to_proto(), gpu=m.gpu.to_proto(),
            worker_forward_seconds=m.worker_forward_seconds.to_proto(),
        )

    def take_commands(self) -> list[pb.WorkerCommand]:
        return self._tier.take_commands()

    def take_outputs(self) -> list[tuple[bytes, pb.SchedulerMessage]]:
        outputs, self.outputs = self.outputs, []
        return outputs
