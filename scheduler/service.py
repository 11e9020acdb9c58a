"""The scheduler process: routes frontends' requests and the worker's events through the core.

Sockets: a ROUTER bound at the frontend address (any number of frontends connect DEALERs)
and a ROUTER bound at the worker address (the worker connects a DEALER and says hello).
Up to `max_forwards_in_flight` forwards are in flight; frontend messages are handled while they run.
The service reads the core only through its methods.

Peers are not trusted: a message that is not one protobuf envelope of the expected type
is dropped with a warning. A worker that disconnects (its process died; over tcp, its
container) is noticed through the worker socket's monitor: the connection the worker's
hello came in on (its file descriptor) closing fails every request in flight with
UNAVAILABLE, and new ones are refused with UNAVAILABLE until a worker says hello again
(every adapter, including those loaded at run time, is re-registered).
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import zmq
from google.protobuf.message import DecodeError, Message
from zmq.utils.monitor import parse_monitor_message

from protos.loraserve.v1 import internal_pb2 as pb
from protos.loraserve.v1 import serving_pb2
from scheduler.adapter_paths import OutsideAdapterRoot, confine
from scheduler.core import SchedulerCore
from scheduler.metrics import StepTimer
from settings.config import SchedulerConfig
from settings.version import package_version

log = logging.getLogger("loraserve.scheduler")
IDLE_POLL_MS = 50
ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,127}$")
MAX_FRONTEND_MESSAGE_BYTES = 64 << 20  # a larger message drops the connection, not the scheduler's memory
WILDCARD_HOSTS = ("*", "0.0.0.0", "::", "[::]")
NO_WORKER = "the worker is not connected (starting or restarting); retry shortly"

CommandDone = Callable[[pb.CommandResult], None]


@dataclass(frozen=True)
class SchedulerServiceConfig:
    frontend_address: str
    worker_address: str
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)


class SchedulerService:
    def __init__(self, config: SchedulerServiceConfig) -> None:
        self.config = config
        self.context = zmq.Context.instance()
        self.frontends = self._bind(config.frontend_address)
        self.frontends.setsockopt(zmq.MAXMSGSIZE, MAX_FRONTEND_MESSAGE_BYTES)
        self.worker = self._bind(config.worker_address)
        self.worker_monitor = self.worker.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self.worker_identity: bytes | None = None
        self.worker_fd: int | None = None  # the connection the current worker's hello came in on
        self.core: SchedulerCore | None = None
        self.callbacks: dict[int, CommandDone] = {}
        self.next_command_id = 1
        # A restarted scheduler takes the adapters its predecessor served, loads and unloads included.
        saved = _read_registry(config.scheduler.registry_file)
        self.registered_paths: dict[str, str] = dict(config.scheduler.initial_adapters if saved is None else saved)
        self.registrations_pending = 0
        self.step_timer = StepTimer()
        self.stopping = False

    def _bind(self, address: str) -> zmq.Socket:
        scheme, _, rest = address.partition("://")
        if scheme == "tcp" and rest.rpartition(":")[0] in WILDCARD_HOSTS:
            raise ValueError(f"{address}: bind the scheduler to a named interface (e.g. tcp://127.0.0.1:5555), "
                             "not every interface")
        socket = self.context.socket(zmq.ROUTER)
        socket.setsockopt(zmq.LINGER, 0)
        socket.bind(address)
        return socket

    @property
    def ready(self) -> bool:
        return self.core is not None and self.registrations_pending == 0

    def run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.frontends, zmq.POLLIN)
        poller.register(self.worker, zmq.POLLIN)
        poller.register(self.worker_monitor, zmq.POLLIN)
        log.info("scheduler: frontends at %s, worker at %s", self.config.frontend_address,
                 self.config.worker_address)
        while not self.stopping:
            busy = self.core is not None and self.core.has_requests()
            self._count_step_time()  # before waiting: the wait is not the scheduler's work
            events = dict(poller.poll(0 if busy and not self.core.has_forward_in_flight() else IDLE_POLL_MS))
            if self.worker_monitor in events:  # before the worker's messages: a successor's hello comes after
                self._on_worker_socket_events()
            if self.worker in events:
                self._drain_worker()
            if self.frontends in events:
                self._drain(self.frontends, pb.FrontendMessage, self._on_frontend_message)
            self._step()
        self.close()

    def close(self) -> None:
        self.frontends.close(linger=0)
        self.worker.disable_monitor()
        self.worker_monitor.close(linger=0)
        self.worker.close(linger=0)

    def _drain(self, socket: zmq.Socket, kind: type[Message], handle: Callable[[bytes, Message], None]) -> None:
        while True:
            try:
                frames = socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            message = _parse(frames, kind)
            if message is None:
                log.warning("dropped a message that is not one %s", kind.DESCRIPTOR.full_name)
                continue
            handle(frames[0], message)

    def _step(self) -> None:
        if not self.ready:
            self._flush()
            return
        while (batch := self.core.schedule()) is not None:  # up to max_forwards_in_flight
            self._flush_commands()
            self._send_command(pb.WorkerCommand(forward=batch), self._on_forward_done)
            self._count_step_time()
        self._flush_commands()
        self._flush_outputs()  # after the forwards are on their way: streaming overlaps the GPU

    def _count_step_time(self) -> None:
        seconds = self.step_timer.close()
        if self.core is not None:
            self.core.add_scheduler_step_time(seconds)

    def _flush(self) -> None:
        self._flush_commands()
        self._flush_outputs()

    def _flush_commands(self) -> None:
        if self.core is not None:
            for command in self.core.take_commands():
                self._send_command(command, self._on_adapter_command_done(command))

    def _flush_outputs(self) -> None:
        if self.core is not None:
            for client, message in self.core.take_outputs():
                self._send_frontend(client, message)

    # Worker -----------------------------------------------------------------------------

    def _drain_worker(self) -> None:
        while True:
            try:
                frames = self.worker.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            event = _parse([frame.bytes for frame in frames], pb.WorkerEvent)
            if event is None:
                log.warning("dropped a message that is not one %s", pb.WorkerEvent.DESCRIPTOR.full_name)
                continue
            self._on_worker_message(frames[0].bytes, event, frames[-1].get(zmq.SRCFD))

    def _on_worker_socket_events(self) -> None:
        while True:
            try:
                event = parse_monitor_message(self.worker_monitor.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                return
            if self.core is not None and int(event["value"]) == self.worker_fd:
                self._drop_worker("the worker disconnected")

    def _on_worker_message(self, identity: bytes, event: pb.WorkerEvent, fd: int) -> None:
        kind = event.WhichOneof("kind")
        if kind == "hello":
            self._on_hello(identity, event.hello, fd)
        elif identity != self.worker_identity:
            log.warning("ignoring a message from a worker that is not the current one")
        elif kind == "result":
            self.core.on_load_events(event.result.load_events)
            callback = self.callbacks.pop(event.result.command_id, None)
            if callback is not None:
                callback(event.result)
        elif kind == "load_events":
            self.core.on_load_events(event.load_events)

    def _drop_worker(self, reason: str) -> None:
        """Fails everything in flight with UNAVAILABLE; not ready until a worker says hello.

        The old worker's command callbacks run while its core still exists, and pending
        unloads are answered as done (the next worker never has the adapter).
        """
        log.warning("%s: failing in-flight requests", reason)
        callbacks, self.callbacks = list(self.callbacks.values()), {}
        self.core.fail_all(pb.UNAVAILABLE, f"{reason}; retry the request")
        for callback in callbacks:
            callback(pb.CommandResult(error=pb.Error(code=pb.UNAVAILABLE, message=reason)))
        self.core.answer_pending_unloads()
        self._flush_outputs()
        self.core, self.worker_identity, self.worker_fd = None, None, None
        self.registrations_pending = 0

    def _on_hello(self, identity: bytes, hello: pb.WorkerHello, fd: int) -> None:
        if self.core is not None:
            self._drop_worker(f"the worker restarted (pid {hello.pid})")
        log.info("worker ready: %s on %s (%s)", hello.model, hello.device, hello.dtype)
        self.worker_identity = identity
        self.worker_fd = fd
        self.core = SchedulerCore(self.config.scheduler, hello)
        for name, path in self.registered_paths.items():
            self._register_at_start(name, path)

    def _register_at_start(self, name: str, path: str) -> None:
        self.registrations_pending += 1
        started = time.monotonic()

        def done(result: pb.CommandResult) -> None:
            self.registrations_pending -= 1
            if result.HasField("error") and result.error.code == pb.UNAVAILABLE:
                return  # the worker was lost; its successor's hello registers the adapter again
            if result.HasField("error"):
                _log_refused(logging.ERROR, name, path, result.error.code, result.error.message, started)
                self.registered_paths.pop(name, None)
                if name in self.config.scheduler.initial_adapters:
                    raise SystemExit(1)  # the record above says why
                return
            _log_registered(self.core.register(result.adapter, path), started)

        self._send_command(pb.WorkerCommand(register_adapter=pb.RegisterAdapter(name=name, path=path)), done)

    def _send_command(self, command: pb.WorkerCommand, done: CommandDone | None) -> None:
        command.command_id = self.next_command_id
        self.next_command_id += 1
        if done is not None:
            self.callbacks[command.command_id] = done
        self.worker.send_multipart([self.worker_identity, command.SerializeToString()])

    def _on_forward_done(self, result: pb.CommandResult) -> None:
        self.step_timer.result_arrived()
        self.core.on_forward_result(result.forward, result.error if result.HasField("error") else None)

    def _on_adapter_command_done(self, command: pb.WorkerCommand) -> CommandDone | None:
        kind = command.WhichOneof("kind")
        name = getattr(command, kind).name if kind in ("stage_adapter", "load_slot") else None

        def done(result: pb.CommandResult) -> None:
            if not result.HasField("error"):
                if kind == "load_slot" and command.load_slot.blocking and self.core is not None:
                    self.core.on_blocking_load_done(name)
                return
            if name is not None and self.core is not None:
                self.core.on_adapter_failed(name, result.error)  # logs the failed load
            else:
                log.warning("%s failed: %s", kind, result.error.message)

        return done

    # Frontends ------------------------------------------------------------------------

    def _on_frontend_message(self, client: bytes, message: pb.FrontendMessage) -> None:
        kind = message.WhichOneof("kind")
        if kind == "admin":
            self._on_admin(client, message.admin)
        elif not self.ready:
            if kind == "submit":
                self._send_frontend(client, pb.SchedulerMessage(output=pb.RequestOutput(
                    request_id=message.submit.request_id, finished=True,
                    error=pb.Error(code=pb.UNAVAILABLE, message=NO_WORKER))))
        elif kind == "submit":
            self.core.submit(client, message.submit)
        elif kind == "abort":
            self.core.abort(message.abort.request_id)

    def _on_admin(self, client: bytes, admin: pb.AdminRequest) -> None:
        def reply(response: pb.AdminResponse) -> None:
            response.correlation_id = admin.correlation_id
            self._send_frontend(client, pb.SchedulerMessage(admin=response))

        def fail(code: int, message: str) -> None:
            reply(pb.AdminResponse(error=pb.Error(code=code, message=message)))

        if not self.ready:
            fail(pb.UNAVAILABLE, NO_WORKER)
            return
        command = admin.WhichOneof("command")
        if command == "server_info":
            reply(pb.AdminResponse(server_info=self._server_info()))
        elif command == "stats":
            reply(pb.AdminResponse(stats=self.core.stats()))
        elif command == "replica_state":
            reply(pb.AdminResponse(replica_state=self.core.replica_state()))
        elif command == "metrics":
            reply(pb.AdminResponse(metrics=self.core.metrics_snapshot()))
        elif command == "list_adapters":
            adapters = self.core.adapter_infos()
            reply(pb.AdminResponse(list_adapters=serving_pb2.ListAdaptersResponse(adapters=adapters)))
        elif command == "load_adapter":
            self._load_adapter(admin.load_adapter, reply, fail)
        elif command == "unload_adapter":
            self._unload_adapter(admin.unload_adapter.name, reply, fail)
        elif command == "timeline":
            self._timeline(reply, fail)
        else:
            fail(pb.INVALID_ARGUMENT, f"unknown admin command {command!r}")

    def _load_adapter(self, request: serving_pb2.LoadAdapterRequest, reply, fail_request) -> None:
        name, path = request.name, request.path
        started = time.monotonic()

        def fail(code: int, message: str) -> None:
            _log_refused(logging.INFO, name, path, code, message, started)
            fail_request(code, message)

        if not ADAPTER_NAME.match(name):
            fail(pb.INVALID_ARGUMENT, f"adapter name {name!r} must be 1-128 letters, digits or ._:/@+-")
            return
        if not path:
            fail(pb.INVALID_ARGUMENT, "an adapter path is required")
            return
        if name in self.registered_paths:
            fail(pb.ALREADY_EXISTS, f"adapter {name!r} is already loaded")
            return
        root = self.config.scheduler.adapter_root
        if root is not None:
            try:
                path = confine(path, root)
            except OutsideAdapterRoot as error:
                fail(pb.PERMISSION_DENIED, str(error))
                return
        self.registered_paths[name] = path

        def done(result: pb.CommandResult) -> None:
            if result.HasField("error"):
                self.registered_paths.pop(name, None)
                fail(result.error.code, result.error.message)
                return
            self._save_registry()
            info = self.core.register(result.adapter, path)
            _log_registered(info, started)
            reply(pb.AdminResponse(load_adapter=serving_pb2.LoadAdapterResponse(adapter=info)))

        # Commands the core has queued go first: an unload of the same name just answered has
        # its UnregisterAdapter waiting there, and the worker must see it before this register.
        self._flush_commands()
        self._send_command(pb.WorkerCommand(register_adapter=pb.RegisterAdapter(name=name, path=path)), done)

    def _unload_adapter(self, name: str, reply, fail) -> None:
        if not self.core.has_adapter(name):
            fail(pb.NOT_FOUND, f"adapter {name!r} is not loaded")
            return

        def done() -> None:
            self.registered_paths.pop(name, None)
            self._save_registry()
            reply(pb.AdminResponse(unload_adapter=serving_pb2.UnloadAdapterResponse()))

        self.core.begin_unload(name, done)

    def _timeline(self, reply, fail) -> None:
        def done(result: pb.CommandResult) -> None:
            if result.HasField("error"):
                fail(result.error.code, result.error.message)
                return
            events = json.loads(result.timeline_json) + self.core.request_trace_events()
            trace = json.dumps({"traceEvents": events, "displayTimeUnit": "ms"})
            reply(pb.AdminResponse(timeline=serving_pb2.Timeline(chrome_trace_json=trace)))

        self._send_command(pb.WorkerCommand(export_timeline=pb.ExportTimeline()), done)

    def _server_info(self) -> serving_pb2.ServerInfo:
        hello, config = self.core.hello, self.config.scheduler
        return serving_pb2.ServerInfo(
            model=hello.model, architecture=hello.architecture, dtype=hello.dtype, device=hello.device,
            max_context_length=hello.max_context_length, vocab_size=hello.vocab_size,
            max_loras_per_batch=hello.max_loras_per_batch, max_loaded_loras=hello.max_loaded_loras,
            max_lora_rank=hello.max_lora_rank, overlap_loading=config.overlap_loading,
            num_kv_pages=hello.num_kv_pages, page_size=hello.page_size,
            max_queued_requests=config.max_queued_requests, version=package_version(),
            adapter_root=str(Path(config.adapter_root).resolve()) if config.adapter_root else "",
        )

    def _send_frontend(self, client: bytes, message: pb.SchedulerMessage) -> None:
        self.frontends.send_multipart([client, message.SerializeToString()])

    def _save_registry(self) -> None:
        """Atomically records the adapters to re-register should this scheduler be restarted."""
        path = self.config.scheduler.registry_file
        if path is None:
            return
        temporary = f"{path}.tmp"
        Path(temporary).write_text(json.dumps(self.registered_paths))
        os.replace(temporary, path)


def _log_registered(info: serving_pb2.AdapterInfo, started: float) -> None:
    """A LoadAdapter (or an adapter given at start) the worker validated: servable, still on disk."""
    log.info("adapter registered", extra={"adapter": info.name, "path": info.path, "bytes": info.size_bytes,
                                          "tier": "disk", "rank": info.rank, "duration_ms": _ms_since(started)})


def _log_refused(level: int, name: str, path: str, code: int, message: str, started: float) -> None:
    log.log(level, "adapter load refused", extra={"adapter": name, "path": path, "tier": "disk",
                                                  "code": pb.ErrorCode.Name(code), "error": message,
                                                  "duration_ms": _ms_since(started)})


def _ms_since(started: float) -> float:
    return round((time.monotonic() - started) * 1e3, 2)


def _read_registry(path: str | None) -> dict[str, str] | None:
    """The saved name -> path table; None if there is none (a first start) or it cannot be read."""
    if path is None or not Path(path).is_file():
        return None
    try:
        entries = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        log.error("ignoring the adapter registry %s: %s", path, error)
        return None
    if not isinstance(entries, dict):
        return None
    return {str(name): str(adapter_path) for name, adapter_path in entries.items()}


def _parse(frames: list[bytes], kind: type[Message]) -> Message | None:
    """[identity, payload] with a payload of `kind` that names what it carries, else None."""
    if len(frames) != 2:
        return None
    try:
        message = kind.FromString(frames[1])
    except DecodeError:
        return None
    return message if message.WhichOneof("kind") is not None else None
