"""The worker process: executes the scheduler's commands on the engine, over ZeroMQ.

The worker connects a DEALER socket to the scheduler's ROUTER, announces itself with a
`WorkerHello`, answers every `WorkerCommand` with a `CommandResult` in order, and, while
idle with staging or loads in flight, polls the engine and sends `LoadEvents` unprompted.
A load of an adapter still being staged starts at once and streams: each layer is copied
as soon as the reader has it (the wait is on the load's stream or thread, never here).

A forward is launched on the GPU and answered once its tokens are back; a forward command
arriving meanwhile (the scheduler sends the next step before it has this one's tokens) is
launched first, so the GPU has the next step queued when the current one ends, unless the
current one has already ended: then its tokens are answered first. An overlapped slot load
(and the eviction before it) also runs while a forward runs: the forward's launch has read every
slot it needs on the host, and the copies wait on the GPU for the forwards still reading the
slot (the copier's last-use markers), so waiting here for the forward's tokens would only start
the copy a step later. Any other command waits for the forward in flight to be answered.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Protocol

import zmq

from protos.loraserve.v1 import internal_pb2 as pb
from settings.config import EngineConfig
from worker.batch import SamplingParams, SequenceInput
from worker.engine import Engine, LoadReport, PendingForward
from worker.errors import (
    AdapterNotFoundError,
    AdapterStateError,
    CapacityError,
    InvalidAdapterError,
)

log = logging.getLogger("loraserve.worker")
IDLE_POLL_MS = 100
LOADING_POLL_MS = 1
IN_FLIGHT_POLL_MS = 1  # how often the next command is looked for while the GPU runs a forward
PREVIOUS_TOKEN_PLACEHOLDER = 0  # input id until the GPU writes the previous forward's token


class GroupRelay(Protocol):
    """The other ranks of a tensor-parallel group, seen from rank 0 (`worker.group.Followers`)."""

    def relay_command(self, command: bytes) -> None: ...

    def relay_poll(self) -> None: ...

    def check(self) -> None: ...

    def stop(self) -> None: ...


@dataclass(frozen=True)
class WorkerConfig:
    scheduler_address: str
    engine: EngineConfig


@dataclass(frozen=True)
class InFlightForward:
    command_id: int
    forward: PendingForward
    launched_at: float  # perf_counter


def error_message(error: Exception) -> pb.Error:
    if isinstance(error, AdapterNotFoundError):
        code = pb.NOT_FOUND
    elif isinstance(error, InvalidAdapterError | ValueError):
        code = pb.INVALID_ARGUMENT
    elif isinstance(error, CapacityError):
        code = pb.RESOURCE_EXHAUSTED
    elif isinstance(error, AdapterStateError):
        code = pb.FAILED_PRECONDITION
    else:
        code = pb.INTERNAL
    return pb.Error(code=code, message=str(error))


class WorkerService:
    def __init__(self, config: WorkerConfig, engine: Engine | None = None,
                 followers: GroupRelay | None = None) -> None:
        """`engine`: one built from `config.engine` beforehand (with test hooks, say); by default a new one.
        `followers`: the other ranks of this worker's tensor-parallel group, which get every command first."""
        self.config = config
        self.engine = engine or Engine(config.engine)
        self.followers = followers
        if self.engine.graph_runner is not None:
            self.engine.graph_runner.capture_all()
        self.in_flight: InFlightForward | None = None
        self.context = zmq.Context.instance()
        self.socket = self.context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.stopping = False

    def run(self) -> None:
        self.socket.connect(self.config.scheduler_address)
        self._send(pb.WorkerEvent(hello=self._hello()))
        log.info("worker connected to %s", self.config.scheduler_address)
        while not self.stopping:
            if self.followers is not None:
                self.followers.check()
            if self.in_flight is not None:
                self._wait_for_command_or_gpu()
            timeout = 0 if self.in_flight else LOADING_POLL_MS if self._loading() else IDLE_POLL_MS
            if self.socket.poll(timeout):
                self._receive()
            elif self.in_flight is not None:
                self._answer_in_flight()
            elif self._loading():
                events = self._poll_events()
                if _has_events(events):
                    self._send(pb.WorkerEvent(load_events=events))
        self.close()

    def close(self) -> None:
        self.socket.close(linger=0)
        if self.followers is not None:
            self.followers.stop()
        self.engine.close()

    def _receive(self) -> None:
        self._on_command(pb.WorkerCommand.FromString(self.socket.recv()))

    def _relay(self, command: pb.WorkerCommand) -> None:
        """The other ranks get each command right before rank 0 runs it: every poll rank 0 makes
        on the way (answering a forward) is relayed in the same order, so their collectives meet."""
        if self.followers is not None:
            self.followers.relay_command(command.SerializeToString())

    def _wait_for_command_or_gpu(self) -> None:
        """Returns once a command is waiting or the forward in flight has finished on the GPU."""
        while not self.in_flight.forward.is_done() and not self.socket.poll(IN_FLIGHT_POLL_MS):
            continue

    def _on_command(self, command: pb.WorkerCommand) -> None:
        if command.WhichOneof("kind") != "forward":
            if not (_starts_beside_a_forward(command) and self._forward_running()):
                self._answer_in_flight()
            self._relay(command)
            self._send(pb.WorkerEvent(result=self.execute(command)))
            return
        if self.in_flight is not None and self.in_flight.forward.is_done():
            # Its tokens leave now, not once the next forward is launched (on CPU: has run).
            self._answer_in_flight()
        self._relay(command)
        try:
            launched = InFlightForward(command.command_id, self._launch(command.forward), time.perf_counter())
        except Exception as error:  # reported to the scheduler; the worker keeps serving
            self._answer_in_flight()
            self._send(pb.WorkerEvent(result=self._failed(command, error)))
            return
        self._answer_in_flight()  # the previous step's tokens, while this one runs
        self.in_flight = launched

    def _forward_running(self) -> bool:
        return self.in_flight is not None and not self.in_flight.forward.is_done()

    def _answer_in_flight(self) -> None:
        if self.in_flight is None:
            return
        in_flight, self.in_flight = self.in_flight, None
        result = pb.CommandResult(command_id=in_flight.command_id)
        try:
            output = self.engine.finish(in_flight.forward)
        except Exception as error:
            log.exception("forward failed")
            result.error.CopyFrom(error_message(error))
        else:
            result.forward.forward_ms = (time.perf_counter() - in_flight.launched_at) * 1e3
            for token in output.tokens:
                sampled = result.forward.tokens.add(request_id=token.request_id, token_id=token.token_id)
                if token.logprob is not None:
                    sampled.logprob = token.logprob
        result.load_events.CopyFrom(self._poll_events())
        self._send(pb.WorkerEvent(result=result))

    def execute(self, command: pb.WorkerCommand) -> pb.CommandResult:
        """Runs a command other than a forward and answers it."""
        result = pb.CommandResult(command_id=command.command_id)
        try:
            execute_command(self.engine, command, result)
        except Exception as error:  # reported to the scheduler; the worker keeps serving
            return self._failed(command, error)
        result.load_events.CopyFrom(self._poll_events())
        return result

    def _failed(self, command: pb.WorkerCommand, error: Exception) -> pb.CommandResult:
        if error_message(error).code == pb.INTERNAL:
            request_ids = [s.request_id for s in command.forward.sequences]
            log.exception("command %s failed", command.WhichOneof("kind"), extra={"request_ids": request_ids})
        result = pb.CommandResult(command_id=command.command_id, error=error_message(error))
        result.load_events.CopyFrom(self._poll_events())
        return result

    def _launch(self, forward: pb.Forward) -> PendingForward:
        if log.isEnabledFor(logging.DEBUG):
            log.debug("forward", extra={"request_ids": [s.request_id for s in forward.sequences]})
        return self.engine.launch([sequence_input(s) for s in forward.sequences])

    def _loading(self) -> bool:
        return self.engine.busy_loading

    def _poll_events(self) -> pb.LoadEvents:
        if self.followers is not None and self.engine.busy_loading:  # the same loads and stagings on every rank
            self.followers.relay_poll()
        return load_events_message(self.engine.poll())

    def _hello(self) -> pb.WorkerHello:
        engine, model = self.engine, self.engine.model_config
        config = engine.config
        return pb.WorkerHello(
            model=config.model_path, architecture=model.architecture, dtype=str(engine.dtype).removeprefix("torch."),
            device=str(engine.device), vocab_size=model.vocab_size,
            max_context_length=context_length(config, model.max_position_embeddings), num_kv_pages=config.num_kv_pages,
            page_size=config.page_size, max_loras_per_batch=config.max_loras_per_batch,
            max_loaded_loras=config.max_loaded_loras, max_lora_rank=config.max_lora_rank,
            host_cache_bytes=config.host_cache_bytes, eos_token_ids=list(model.eos_token_ids), pid=os.getpid(),
            saved_module_slots=config.saved_module_slots,
        )

    def _send(self, event: pb.WorkerEvent) -> None:
        self.socket.send(event.SerializeToString())


def execute_command(engine: Engine, command: pb.WorkerCommand, result: pb.CommandResult) -> None:
    """Runs a command other than a forward on `engine`, filling `result`."""
    kind = command.WhichOneof("kind")
    if kind == "register_adapter":
        info = engine.register_adapter(command.register_adapter.name, command.register_adapter.path)
        result.adapter.CopyFrom(pb.RegisteredAdapter(
            name=info.name, rank=info.rank, size_bytes=info.nbytes, target_modules=sorted(info.modules),
            ranks=info.ranks, alphas=info.alphas, dora=info.dora, extra_modules=sorted(info.extra_modules)))
    elif kind == "unregister_adapter":
        engine.unregister_adapter(command.unregister_adapter.name)
    elif kind == "stage_adapter":
        engine.stage_adapter(command.stage_adapter.name)
    elif kind == "evict_host":
        engine.evict_host(command.evict_host.name)
    elif kind == "load_slot":
        load = command.load_slot
        engine.load_adapter(load.name, load.slot, blocking=load.blocking)
    elif kind == "evict_slot":
        engine.evict_slot(command.evict_slot.slot)
    elif kind == "export_timeline":
        result.timeline_json = json.dumps(engine.timeline.chrome_trace())
    else:
        raise ValueError(f"unknown worker command {kind!r}")


def context_length(config: EngineConfig, model_positions: int) -> int:
    """The longest request in tokens: `--context-length` (the engine refused one beyond the model's), or the model's."""
    return model_positions if config.context_length is None else config.context_length


def sequence_input(message: pb.SequenceInput) -> SequenceInput:
    s = message.sampling
    return SequenceInput(
        request_id=message.request_id,
        token_ids=[PREVIOUS_TOKEN_PLACEHOLDER] if message.previous_token else list(message.token_ids),
        context_len=message.context_len,
        page_table=list(message.page_table),
        adapter_slot=message.adapter_slot,
        sample=message.sample,
        previous_token=message.previous_token,
        sampling=SamplingParams(
            temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
            seed=s.seed if s.HasField("seed") else None, logprobs=s.logprobs,
        ),
    )


def _starts_beside_a_forward(command: pb.WorkerCommand) -> bool:
    """An overlapped slot load or a slot eviction: they need nothing from the forward in flight
    but its GPU order, which the copier keeps."""
    kind = command.WhichOneof("kind")
    return kind == "evict_slot" or (kind == "load_slot" and not command.load_slot.blocking)


def load_events_message(report: LoadReport) -> pb.LoadEvents:
    events = pb.LoadEvents(staged=report.staged)
    for name, slot in report.loaded:
        events.loaded.add(name=name, slot=slot, copy_s=report.copy_seconds.get(name, 0.0))
    for name, error in report.failed:
        events.failed.add(name=name, error=error_message(error))
    for name, landed in report.copying.items():
        events.copying.add(name=name, landed=landed)
    return events


def _has_events(events: pb.LoadEvents) -> bool:
    return bool(events.staged or events.loaded or events.failed)
