"""The frontend over several replicas (frontend/replicas.py), each a fake scheduler: fleet-wide
adapter operations, routing by residency, a replica lost and back, per-replica stats and metrics."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import grpc
import pytest

from loraserve.client import LoraServeClient
from protos.loraserve.v1 import serving_pb2
from settings.config import FrontendConfig
from tests.frontend.fake_scheduler import FakeScheduler
from tests.frontend.test_frontend_service import BackgroundFrontend, rpc_error, wait_for

RESIDENT = serving_pb2.ADAPTER_STATE_RESIDENT


@pytest.fixture
def fakes(tmp_path) -> Iterator[list[FakeScheduler]]:
    with ExitStack() as stack:
        yield [stack.enter_context(FakeScheduler(f"ipc://{tmp_path}/scheduler-{i}.sock")) for i in range(2)]


@contextmanager
def fleet_frontend(fakes: list[FakeScheduler]) -> Iterator[tuple[BackgroundFrontend, LoraServeClient]]:
    config = FrontendConfig(port=0, readiness_retry_s=0.02, replica_state_interval_s=0.02)
    frontend = BackgroundFrontend(config, [fake.address for fake in fakes])
    client = LoraServeClient(frontend.address, timeout=10)
    try:
        client.wait_until_ready(10)
        wait_for(lambda: len(frontend.server._replicas.ready_replicas()) == len(fakes), "every replica ready")
        yield frontend, client
    finally:
        client.close()
        frontend.stop()


def test_load_registers_on_every_replica_and_unload_removes_everywhere(fakes):
    with fleet_frontend(fakes) as (_, client):
        loaded = client.load_adapter("a", "/adapters/a")
        assert loaded.adapter.name == "a"
        assert all("a" in fake.adapters for fake in fakes)
        [listed] = client.list_adapters().adapters
        assert sorted(p.replica for p in listed.replicas) == ["0", "1"]
        client.unload_adapter("a")
        assert not any(fake.adapters for fake in fakes)
        assert client.list_adapters().adapters == []


def test_a_load_refused_by_one_replica_is_undone_on_the_others(fakes):
    fakes[1].refused_loads = True
    with fleet_frontend(fakes) as (_, client):
        error = rpc_error(lambda: client.load_adapter("a", "/adapters/a"))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and error.details().startswith("replica 1: ")
        assert not fakes[0].adapters, "registered on none"
        fakes[1].refused_loads = False
        client.load_adapter("a", "/adapters/a")
        assert all("a" in fake.adapters for fake in fakes)


def test_requests_go_where_the_adapter_is_resident(fakes):
    with fleet_frontend(fakes) as (frontend, client):
        client.load_adapter("a", "/adapters/a")
        fakes[1].adapters["a"].state = RESIDENT
        replicas = frontend.server._replicas
        wait_for(lambda: "a" in replicas.router._views["1"].gpu_adapters, "the router to see a on replica 1")
        for _ in range(5):
            client.generate(input_ids=[1, 2], adapter="a", max_new_tokens=2)
        assert [len(fake.submits) for fake in fakes] == [0, 5]


def test_a_replica_that_comes_back_gets_the_fleets_adapters_before_traffic(fakes):
    with fleet_frontend(fakes) as (frontend, client):
        fakes[1].stop()
        wait_for(lambda: [r.name for r in frontend.server._replicas.ready_replicas()] == ["0"], "replica 1 out")
        for i in range(4):
            client.generate(input_ids=[1, 2], max_new_tokens=2)
        assert len(fakes[0].submits) == 4
        client.load_adapter("late", "/adapters/late")
        with FakeScheduler(fakes[1].address) as successor:  # a new scheduler, knowing no adapter
            wait_for(lambda: len(frontend.server._replicas.ready_replicas()) == 2, "replica 1 back")
            assert "late" in successor.adapters


def test_stats_sum_the_replicas_and_show_each(fakes):
    with fleet_frontend(fakes) as (_, client):
        fakes[0].aborts[:] = ["x", "y"]
        fakes[1].aborts[:] = ["z"]
        stats = client.stats()
        assert stats.requests_aborted == 3
        assert {r.replica: r.stats.requests_aborted for r in stats.replicas} == {"0": 2, "1": 1}
        assert list(client.server_info().replicas) == [fake.address for fake in fakes]
