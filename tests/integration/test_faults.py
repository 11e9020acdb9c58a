"""Dying processes, overload and shutdown, on the three real processes under the launcher."""

from __future__ import annotations

import os
import signal
import stat
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loraserve.client import LoraServeClient
from loraserve.launcher import Launcher
from settings.config import ServeConfig
from tests.integration.conftest import free_port, running_server
from tests.integration.test_service import (  # noqa: F401 - fixtures
    WORKLOAD,
    assert_consistent,
    oracle,
    prompt,
    reference,
    run_workload,
    wait_for,
    worker_paused,
)
from tests.model_factory import AdapterSpec, build_adapter
from tests.slow_worker import slow_worker_modules

RECOVERY_TIMEOUT_S = 180.0  # a new worker imports torch and loads the model, on a shared 2-core machine


@contextmanager
def supervised_server(config: ServeConfig) -> Iterator[tuple[Launcher, LoraServeClient]]:
    """A launcher that supervises (restarts the dead) on a thread, as `loraserve serve` does."""
    launcher = Launcher(config.replace(port=free_port()))
    launcher.start()
    supervisor = threading.Thread(target=launcher.supervise, name="supervisor", daemon=True)
    try:
        launcher.wait_until_serving()
        supervisor.start()
        with LoraServeClient(launcher.address, timeout=60) as client:
            yield launcher, client
    finally:
        launcher.stopping = True
        if supervisor.is_alive():
            supervisor.join(timeout=60)
        else:
            launcher.stop()


@pytest.fixture(scope="module")
def supervised(base_config) -> Iterator[tuple[Launcher, LoraServeClient]]:
    with supervised_server(base_config) as pair:
        yield pair


def long_streams(client: LoraServeClient, seed: int) -> list:
    streams = [client.generate_stream(input_ids=prompt(seed + i, 6), adapter=adapter, max_new_tokens=240,
                                      ignore_eos=True) for i, adapter in enumerate(["a0", "", "a1"])]
    for stream in streams:
        next(stream)
    return streams


def assert_ended_unavailable(streams: list) -> None:
    """Each stream ends UNAVAILABLE, unless it had already finished its tokens before the kill."""
    unavailable = 0
    for stream in streams:
        try:
            assert list(stream)[-1].finish_reason == "length"
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.UNAVAILABLE, error.details()
            unavailable += 1
    assert unavailable, "the kill came after every stream had finished: nothing was tested"


def wait_until_generating(client: LoraServeClient) -> None:
    deadline = time.monotonic() + RECOVERY_TIMEOUT_S
    while True:
        try:
            client.generate(input_ids=[5, 6, 7], max_new_tokens=2, timeout=10)
            return
        except grpc.RpcError as error:
            assert error.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED), error.details()
            assert time.monotonic() < deadline, "the service did not recover"
            time.sleep(0.5)


def assert_recovered(client: LoraServeClient, oracle, reference, adapters: set[str]) -> None:  # noqa: F811
    wait_until_generating(client)
    assert {a.name for a in client.list_adapters().adapters} == adapters, "every adapter re-registered"
    outputs = run_workload(client)
    for request_id, adapter, ids, _ in WORKLOAD:
        assert_consistent(oracle, reference[request_id], ids, adapter, outputs[request_id])
    wait_for(lambda: (lambda s: (s.kv_pages_used, s.slot_references, s.running_requests, s.waiting_requests)
                      == (0, 0, 0, 0))(client.stats()), "idle after the workload")


def test_worker_killed_mid_generation_is_restarted(supervised, oracle, reference):  # noqa: F811
    launcher, client = supervised
    streams = long_streams(client, 400)
    old = launcher.processes["worker"]
    os.kill(old.pid, signal.SIGKILL)
    assert_ended_unavailable(streams)
    assert_recovered(client, oracle, reference, {"a0", "a1", "a2", "a3"})
    assert launcher.processes["worker"].pid != old.pid
    assert all(p.poll() is None for p in launcher.processes.values())


def test_scheduler_killed_mid_generation_is_restarted_with_its_adapters(supervised, oracle, reference,  # noqa: F811
                                                                          service_model, artifacts):
    launcher, client = supervised
    late = build_adapter(service_model, artifacts / "fault-late", AdapterSpec(rank=8, seed=41))
    client.load_adapter("late", str(late))
    late_before = list(client.generate(input_ids=prompt(500, 6), adapter="late", max_new_tokens=4,
                                       ignore_eos=True).token_ids)
    streams = long_streams(client, 410)
    old_scheduler, old_worker = launcher.processes["scheduler"], launcher.processes["worker"]
    os.kill(old_scheduler.pid, signal.SIGKILL)
    assert_ended_unavailable(streams)
    assert_recovered(client, oracle, reference, {"a0", "a1", "a2", "a3", "late"})
    assert launcher.processes["scheduler"].pid != old_scheduler.pid
    assert launcher.processes["worker"].pid != old_worker.pid and old_worker.poll() is not None
    late_after = client.generate(input_ids=prompt(500, 6), adapter="late", max_new_tokens=4, ignore_eos=True)
    assert list(late_after.token_ids) == late_before, "the same request alone, before and after the restart"
    client.unload_adapter("late")


def test_runtime_directory_is_private(supervised):
    launcher, _ = supervised
    info = os.stat(launcher.runtime_dir)
    assert stat.S_IMODE(info.st_mode) == 0o700 and info.st_uid == os.getuid()
    sockets = {p.name for p in launcher.runtime_dir.iterdir()}
    assert {"frontend.sock", "worker.sock"} <= sockets


# Overload and shutdown ------------------------------------------------------------------------

SLOW_LOAD_S = 5.0


@pytest.fixture(scope="module")
def slow_server(base_config) -> Iterator[tuple[Launcher, LoraServeClient]]:
    """A queue of two; loads of a2 and a3 take SLOW_LOAD_S, so requests for them wait in the queue."""
    config = base_config.replace(max_queued_requests=2,
                     grace_seconds=60)
    with running_server(config, slow_worker_modules(slow_loads={"a2": SLOW_LOAD_S, "a3": SLOW_LOAD_S})) as pair:
        yield pair


def test_a_full_queue_refuses_at_once_and_recovers(slow_server):
    launcher, client = slow_server
    waiting = [client.generate_stream(input_ids=prompt(600 + i, 6), adapter="a3", max_new_tokens=3, ignore_eos=True)
               for i in range(2)]
    wait_for(lambda: client.stats().waiting_requests == 2, "two requests queued behind the slow load")
    with worker_paused(launcher), ThreadPoolExecutor(max_workers=8) as pool:  # the queue stays full meanwhile
        refused = [pool.submit(client.generate, input_ids=prompt(610 + i, 6), max_new_tokens=2) for i in range(8)]
        codes = [f.exception().code() if f.exception() else None for f in refused]
        assert client.stats().waiting_requests == 2, "the refused requests never queued"
    assert codes == [grpc.StatusCode.RESOURCE_EXHAUSTED] * 8
    for stream in waiting:
        assert [t for m in stream for t in m.token_ids].__len__() == 3
    assert len(client.generate(input_ids=[5, 6, 7], max_new_tokens=2).token_ids) == 2


def health_status(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status


def test_stop_drains_then_every_process_exits(slow_server):
    launcher, client = slow_server
    stream = client.generate_stream(input_ids=prompt(700, 6), adapter="a2", max_new_tokens=5, ignore_eos=True)
    wait_for(lambda: client.stats().waiting_requests == 1, "the request queued behind a2's slow load")
    stopper = threading.Thread(target=launcher.stop, name="stop")
    with worker_paused(launcher):  # the request stays in flight until the refusal is seen
        stopper.start()
        wait_for(lambda: health_status(launcher.address) == health_pb2.HealthCheckResponse.NOT_SERVING,
                 "NOT_SERVING")
        with pytest.raises(grpc.RpcError) as refused:
            client.generate(input_ids=[5, 6, 7], max_new_tokens=2)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in refused.value.details()
    messages = list(stream)
    assert sum(len(m.token_ids) for m in messages) == 5 and messages[-1].finish_reason == "length"
    stopper.join(timeout=120)
    assert not stopper.is_alive()
    assert all(p.poll() is not None for p in launcher.processes.values())
    assert all(p.returncode == 0 for p in launcher.processes.values()), "every process exited by itself"
    assert not launcher.runtime_dir.exists()
