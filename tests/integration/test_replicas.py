"""Replicas (scheduler+worker pairs) behind one frontend, all real processes on CPU: outputs as one
replica gives them, routing by residency, fleet-wide adapter operations under traffic, a replica's
worker killed and back, a frontend restarted."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator

import grpc
import pytest

from loraserve.client import LoraServeClient
from loraserve.launcher import Launcher
from tests.integration.conftest import running_server
from tests.integration.test_faults import long_streams, supervised_server, wait_until_generating
from tests.integration.test_service import (  # noqa: F401 - fixtures
    WORKLOAD,
    assert_consistent,
    oracle,
    prompt,
    reference,
    run_workload,
    wait_for,
)

GPU_STATES = {"ADAPTER_STATE_LOADING", "ADAPTER_STATE_RESIDENT"}


@pytest.fixture(scope="module")
def fleet(base_config) -> Iterator[tuple[Launcher, LoraServeClient]]:
    with supervised_server(base_config.replace(replicas=2)) as (launcher, client):
        # The frontend serves once one replica is ready; the tests below need both.
        wait_for(lambda: len(client.stats().replicas) == 2, "both replicas to be ready")
        yield launcher, client


def finished_per_replica(client: LoraServeClient) -> dict[str, int]:
    return {r.replica: r.stats.requests_finished for r in client.stats().replicas}


def test_two_replicas_give_the_outputs_of_one(fleet, oracle, reference):  # noqa: F811
    _, client = fleet
    outputs = run_workload(client)
    for request_id, adapter, ids, _ in WORKLOAD:
        assert_consistent(oracle, reference[request_id], ids, adapter, outputs[request_id])
    assert all(count > 0 for count in finished_per_replica(client).values()), "both replicas served"


def test_three_replicas_give_the_outputs_of_one(base_config, oracle, reference):  # noqa: F811
    with running_server(base_config.replace(replicas=3)) as (_, client):
        assert len(client.server_info().replicas) == 3
        outputs = run_workload(client)
    for request_id, adapter, ids, _ in WORKLOAD:
        assert_consistent(oracle, reference[request_id], ids, adapter, outputs[request_id])


def test_an_adapters_requests_stay_on_the_replica_holding_it(fleet):
    _, client = fleet
    before = finished_per_replica(client)
    for i in range(6):
        client.generate(input_ids=prompt(900 + i, 5), adapter="a2", max_new_tokens=2, ignore_eos=True)
    after = finished_per_replica(client)
    served = sorted(after[name] - before[name] for name in after)
    assert served == [0, 6], "one replica took them all"


def test_load_and_unload_span_every_replica_under_traffic(fleet, service_adapters):
    _, client = fleet
    failures: list[BaseException] = []

    def traffic() -> None:
        for i in range(16):
            try:
                client.generate(input_ids=prompt(950 + i, 6), adapter=["a0", "", "a1"][i % 3], max_new_tokens=4)
            except grpc.RpcError as error:
                failures.append(error)

    worker = threading.Thread(target=traffic)
    worker.start()
    client.load_adapter("extra", str(service_adapters["a3"]))
    [extra] = [a for a in client.list_adapters().adapters if a.name == "extra"]
    assert sorted(p.replica for p in extra.replicas) == ["0", "1"]
    with pytest.raises(grpc.RpcError) as refused:
        client.load_adapter("broken", "/nonexistent/adapter")
    assert refused.value.code() == grpc.StatusCode.NOT_FOUND
    assert len(client.generate(input_ids=[5, 6, 7], adapter="extra", max_new_tokens=3, ignore_eos=True).token_ids) == 3
    client.unload_adapter("extra")
    worker.join(timeout=120)
    names = {a.name for a in client.list_adapters().adapters}
    assert "extra" not in names and "broken" not in names
    assert failures == []


def test_a_replicas_worker_killed_takes_nothing_else_down(fleet):
    launcher, client = fleet
    old = launcher.processes["worker-1"]
    streams = long_streams(client, 1000)
    os.kill(old.pid, signal.SIGKILL)
    for i in range(6):  # the other replica serves meanwhile; a request lost before its first token is retried
        client.generate(input_ids=prompt(1100 + i, 5), max_new_tokens=2)
    for stream in streams:
        try:
            assert list(stream)[-1].finish_reason == "length"
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.UNAVAILABLE, error.details()
    wait_for(lambda: len(client.stats().replicas) == 2, "the replica back in routing", timeout=180)
    assert launcher.processes["worker-1"].pid != old.pid
    assert {a.name for a in client.list_adapters().adapters} >= {"a0", "a1", "a2", "a3"}


def test_a_restarted_frontend_serves_the_fleet_again(fleet, service_adapters):
    launcher, client = fleet
    client.load_adapter("kept", str(service_adapters["a0"]))
    os.kill(launcher.processes["frontend"].pid, signal.SIGKILL)
    wait_until_generating(client)
    wait_for(lambda: len(client.stats().replicas) == 2, "both replicas ready")
    [kept] = [a for a in client.list_adapters().adapters if a.name == "kept"]
    assert sorted(p.replica for p in kept.replicas) == ["0", "1"]
    client.unload_adapter("kept")
