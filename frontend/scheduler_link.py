"""The frontend's end of the ZeroMQ link to the scheduler.

A zmq.asyncio DEALER connects to the scheduler's ROUTER. Each message is one serialized
protobuf: `FrontendMessage` up, `SchedulerMessage` down. One receive loop hands each
`RequestOutput` to its request's queue and each `AdminResponse` to the future waiting on
its correlation id.

Liveness: the socket is `IMMEDIATE`, so a send while the scheduler is not connected fails
at once (UNAVAILABLE) instead of queueing for a scheduler that may never come. Work in
flight fails with UNAVAILABLE when the connection drops (a restarted scheduler does not
know the old requests), and when the scheduler stays silent: once work is in flight and
nothing has arrived for `LivenessConfig.silence_s`, the link pings with a cheap `stats`
request and fails the work if no answer comes within `ping_timeout_s`. An answering
scheduler may keep a request waiting as long as it likes (client deadlines bound that).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import zmq
import zmq.asyncio
from google.protobuf.message import DecodeError
from zmq.utils.monitor import parse_monitor_message

from frontend.errors import ServiceError, StatusCode
from protos.loraserve.v1 import internal_pb2, serving_pb2

log = logging.getLogger("loraserve.frontend.link")

SEND_HIGH_WATER_MARK = 100_000  # messages; far above what the scheduler lets queue up


@dataclass(frozen=True)
class LivenessConfig:
    silence_s: float = 10.0  # ping after this long without a message while work is in flight
    ping_timeout_s: float = 5.0  # then fail the work if the ping is not answered in time
    check_interval_s: float = 1.0


class SchedulerUnavailable(ServiceError):
    """The scheduler is not connected or did not answer in time."""

    code = StatusCode.UNAVAILABLE


class SchedulerFailure(ServiceError):
    """The scheduler refused or failed a request; `code` is its error code."""

    def __init__(self, error: internal_pb2.Error) -> None:
        code = status_code(error.code)
        super().__init__(error.message or f"the scheduler failed the request ({code.name})", code)


class RequestIdInUse(ServiceError):
    """Another request with this id is still running on this frontend."""

    code = StatusCode.ALREADY_EXISTS


def status_code(code: int) -> StatusCode:
    """Internal ErrorCode names are status code names; anything else is INTERNAL."""
    if code not in internal_pb2.ErrorCode.values():
        return StatusCode.INTERNAL
    return StatusCode.named(internal_pb2.ErrorCode.Name(code))


def _unavailable_output(request_id: str, reason: str) -> internal_pb2.RequestOutput:
    return internal_pb2.RequestOutput(request_id=request_id, finished=True,
                                      error=internal_pb2.Error(code=internal_pb2.UNAVAILABLE, message=reason))


class SchedulerLink:
    def __init__(self, address: str, liveness: LivenessConfig | None = None,
                 on_disconnect: Callable[[], None] | None = None) -> None:
        self.address = address
        self._liveness = liveness or LivenessConfig()
        self._on_disconnect = on_disconnect
        self._context = zmq.asyncio.Context()
        self._socket: zmq.asyncio.Socket | None = None
        self._monitor: zmq.asyncio.Socket | None = None
        self._streams: dict[str, asyncio.Queue[internal_pb2.RequestOutput]] = {}
        self._pending_admin: dict[int, asyncio.Future[internal_pb2.AdminResponse]] = {}
        self._correlation_ids = itertools.count(1)
        self._last_heard = time.monotonic()
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        socket = self._context.socket(zmq.DEALER)
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.IMMEDIATE, 1)
        socket.setsockopt(zmq.SNDHWM, SEND_HIGH_WATER_MARK)
        self._monitor = socket.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        socket.connect(self.address)
        self._socket = socket
        self._tasks = [asyncio.create_task(self._receive()), asyncio.create_task(self._watch_connection()),
                       asyncio.create_task(self._watch_liveness())]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.fail_all("the frontend is shutting down")
        if self._socket is not None:
            self._socket.disable_monitor()
            self._socket.close(linger=0)
            self._socket = None
        if self._monitor is not None:
            self._monitor.close(linger=0)
            self._monitor = None
        self._context.term()

    @property
    def in_flight(self) -> int:
        """Generations and admin calls waiting for the scheduler."""
        return len(self._streams) + len(self._pending_admin)

    # Generation ---------------------------------------------------------------------------

    def open_stream(self, request_id: str) -> asyncio.Queue[internal_pb2.RequestOutput]:
        """Registers a request before it is submitted, so no output can be missed."""
        if request_id in self._streams:
            raise RequestIdInUse(f"request id {request_id!r} is already in use")
        queue: asyncio.Queue[internal_pb2.RequestOutput] = asyncio.Queue()
        self._streams[request_id] = queue
        return queue

    def close_stream(self, request_id: str) -> None:
        """Outputs that still arrive for the request (after an abort) are dropped."""
        self._streams.pop(request_id, None)

    def submit(self, request: internal_pb2.SubmitRequest) -> None:
        self._send(internal_pb2.FrontendMessage(submit=request))

    def abort(self, request_id: str) -> None:
        """Best effort: if the scheduler is unreachable it has no resources of ours to free."""
        try:
            self._send(internal_pb2.FrontendMessage(abort=internal_pb2.AbortRequest(request_id=request_id)))
        except SchedulerUnavailable:
            log.debug("could not send the abort of %s: the scheduler is unreachable", request_id)

    # Admin --------------------------------------------------------------------------------

    async def admin(self, request: internal_pb2.AdminRequest, timeout_s: float | None) -> internal_pb2.AdminResponse:
        """Sends an admin request and waits for its answer; an error answer raises SchedulerFailure."""
        correlation_id = next(self._correlation_ids)
        message = internal_pb2.FrontendMessage(admin=request)
        message.admin.correlation_id = correlation_id
        future: asyncio.Future[internal_pb2.AdminResponse] = asyncio.get_running_loop().create_future()
        self._pending_admin[correlation_id] = future
        try:
            self._send(message)
            response = await asyncio.wait_for(future, timeout_s)
        except asyncio.TimeoutError:
            raise SchedulerUnavailable(f"the scheduler did not answer within {timeout_s:g} s") from None
        finally:
            self._pending_admin.pop(correlation_id, None)
        if response.HasField("error"):
            raise SchedulerFailure(response.error)
        return response

    # Internals ----------------------------------------------------------------------------

    def _send(self, message: internal_pb2.FrontendMessage) -> None:
        if self._socket is None:
            raise SchedulerUnavailable("the frontend's link to the scheduler is closed")
        try:
            # NOBLOCK makes the zmq.asyncio future complete (or fail) before send returns.
            self._socket.send(message.SerializeToString(), flags=zmq.NOBLOCK).result()
        except zmq.Again:
            raise SchedulerUnavailable(f"the scheduler at {self.address} is not reachable") from None
        except zmq.ZMQError as error:
            raise SchedulerUnavailable(f"cannot send to the scheduler at {self.address}: {error}") from None

    async def _receive(self) -> None:
        while True:
            payload = await self._socket.recv()
            self._last_heard = time.monotonic()
            try:
                message = internal_pb2.SchedulerMessage.FromString(payload)
            except DecodeError:
                log.warning("dropping a message from the scheduler that is not a SchedulerMessage")
                continue
            kind = message.WhichOneof("kind")
            if kind == "output":
                self._deliver_output(message.output)
            elif kind == "admin":
                self._deliver_admin(message.admin)

    def _deliver_output(self, output: internal_pb2.RequestOutput) -> None:
        queue = self._streams.get(output.request_id)
        if queue is not None:
            queue.put_nowait(output)

    def _deliver_admin(self, response: internal_pb2.AdminResponse) -> None:
        future = self._pending_admin.pop(response.correlation_id, None)
        if future is not None and not future.done():
            future.set_result(response)

    async def _watch_connection(self) -> None:
        while True:
            event = parse_monitor_message(await self._monitor.recv_multipart())
            if event["event"] == zmq.EVENT_DISCONNECTED:
                log.warning("lost the connection to the scheduler at %s", self.address)
                self.fail_all("lost the connection to the scheduler")
                if self._on_disconnect is not None:
                    self._on_disconnect()

    async def _watch_liveness(self) -> None:
        while True:
            await asyncio.sleep(self._liveness.check_interval_s)
            silent_for = time.monotonic() - self._last_heard
            if (self._streams or self._pending_admin) and silent_for >= self._liveness.silence_s:
                await self._check_alive(silent_for)

    async def _check_alive(self, silent_for: float) -> None:
        ping = internal_pb2.AdminRequest(stats=serving_pb2.GetStatsRequest())
        try:
            await self.admin(ping, self._liveness.ping_timeout_s)
        except SchedulerFailure:
            return  # an answer, even a refusal, shows the scheduler is alive
        except SchedulerUnavailable as error:
            log.warning("the scheduler has been silent for %.1f s and failed a liveness check: %s", silent_for, error)
            self.fail_all(f"the scheduler stopped answering: {error}")

    def fail_all(self, reason: str) -> None:
        """Ends every request and admin call in flight with UNAVAILABLE."""
        for request_id, queue in self._streams.items():
            queue.put_nowait(_unavailable_output(request_id, reason))
            self.abort(request_id)  # frees its resources should the scheduler come back
        for future in self._pending_admin.values():
            if not future.done():
                future.set_exception(SchedulerUnavailable(reason))
        self._pending_admin.clear()
