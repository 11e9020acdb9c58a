"""The scheduler process's sockets when the worker goes away over tcp (a killed container).

A real SchedulerService runs in a thread on 127.0.0.1; the tests play the worker and a
frontend with plain DEALER sockets.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
import zmq

from loraserve.healthcheck import healthy
from protos.loraserve.v1 import internal_pb2 as pb
from protos.loraserve.v1 import serving_pb2
from scheduler.service import SchedulerService, SchedulerServiceConfig
from settings.config import SchedulerConfig
from tests.scheduler.fake_worker import hello

TIMEOUT_MS = 10_000
ADAPTER = pb.RegisteredAdapter(name="a0", rank=8, size_bytes=1000, target_modules=["q_proj"])


@pytest.fixture
def scheduler() -> Iterator[SchedulerService]:
    config = SchedulerConfig(prefetch=False, initial_adapters={"a0": "/adapters/a0"})
    service = SchedulerService(SchedulerServiceConfig("tcp://127.0.0.1:0", "tcp://127.0.0.1:0", config))
    thread = threading.Thread(target=service.run, daemon=True)
    thread.start()
    yield service
    service.stopping = True
    thread.join(timeout=10)


def endpoint(socket: zmq.Socket) -> str:
    return socket.getsockopt_string(zmq.LAST_ENDPOINT)


def dealer(address: str) -> zmq.Socket:
    socket = zmq.Context.instance().socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    socket.connect(address)
    return socket


def receive(socket: zmq.Socket, message_type):
    assert socket.poll(TIMEOUT_MS), f"no {message_type.__name__} within {TIMEOUT_MS} ms"
    return message_type.FromString(socket.recv())


def connect_worker(scheduler: SchedulerService) -> zmq.Socket:
    """Says hello and registers the start-up adapter, as the worker does."""
    worker = dealer(endpoint(scheduler.worker))
    worker.send(pb.WorkerEvent(hello=hello()).SerializeToString())
    command = receive(worker, pb.WorkerCommand)
    assert command.register_adapter.name == "a0"
    worker.send(pb.WorkerEvent(result=pb.CommandResult(command_id=command.command_id, adapter=ADAPTER))
                .SerializeToString())
    return worker


def submit(frontend: zmq.Socket, request_id: str) -> None:
    request = pb.SubmitRequest(request_id=request_id, input_ids=[10, 11, 12], adapter="",
                               sampling=serving_pb2.SamplingParams(max_new_tokens=4))
    frontend.send(pb.FrontendMessage(submit=request).SerializeToString())


def next_forward(worker: zmq.Socket) -> pb.WorkerCommand:
    while True:
        command = receive(worker, pb.WorkerCommand)
        if command.WhichOneof("kind") == "forward":
            return command


def health(scheduler: SchedulerService) -> dict[str, bool]:
    """What the compose healthchecks of the scheduler and the worker say."""
    return {service: healthy(service, endpoint(scheduler.frontends), timeout_s=5) for service in ("scheduler", "worker")}


def test_a_disconnected_worker_fails_in_flight_requests_and_a_new_one_is_used(scheduler):
    assert health(scheduler) == {"scheduler": True, "worker": False}
    worker = connect_worker(scheduler)
    deadline = time.monotonic() + TIMEOUT_MS / 1000  # the registration's result may still be on its way
    while health(scheduler) != {"scheduler": True, "worker": True}:
        assert time.monotonic() < deadline, health(scheduler)
        time.sleep(0.05)
    frontend = dealer(endpoint(scheduler.frontends))
    submit(frontend, "r1")
    assert next_forward(worker).forward.sequences[0].request_id == "r1"
    worker.close(linger=0)  # the worker dies with r1's forward in flight

    failed = receive(frontend, pb.SchedulerMessage).output
    assert failed.request_id == "r1" and failed.finished and failed.error.code == pb.UNAVAILABLE
    submit(frontend, "r2")  # while no worker is connected: refused at once, not queued
    refused = receive(frontend, pb.SchedulerMessage).output
    assert refused.request_id == "r2" and refused.error.code == pb.UNAVAILABLE
    assert health(scheduler) == {"scheduler": True, "worker": False}

    successor = connect_worker(scheduler)  # the start-up adapter is registered again
    submit(frontend, "r3")
    assert next_forward(successor).forward.sequences[0].request_id == "r3"


def test_another_connection_closing_does_not_drop_the_worker(scheduler):
    worker = connect_worker(scheduler)
    stray = dealer(endpoint(scheduler.worker))
    stray.send(b"not a worker event")  # makes sure the connection is established, then closes it
    stray.close(linger=0)
    frontend = dealer(endpoint(scheduler.frontends))
    submit(frontend, "r1")
    assert next_forward(worker).forward.sequences[0].request_id == "r1"
