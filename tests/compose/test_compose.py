"""The compose deployment as a client sees it: three containers on 127.0.0.1, CPU worker.

Needs the environment scripts/compose_test.sh sets: LORASERVE_COMPOSE_ADDRESS (the
frontend), LORASERVE_COMPOSE_PROJECT and LORASERVE_COMPOSE_DOCKER (to crash the worker),
the demo model with demo-qv and demo-all served and demo-mlp in the adapters directory.
Tests run in file order: the crash test comes last.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

import grpc
import pytest

from loraserve.client import LoraServeClient

ADDRESS = os.environ["LORASERVE_COMPOSE_ADDRESS"]
PROJECT = os.environ["LORASERVE_COMPOSE_PROJECT"]
DOCKER = os.environ.get("LORASERVE_COMPOSE_DOCKER", "docker")
RECOVERY_TIMEOUT_S = 240.0


@pytest.fixture(scope="module")
def client():
    with LoraServeClient(ADDRESS, timeout=120) as client:
        client.wait_until_ready(120)
        yield client


def docker(*args: str) -> str:
    return subprocess.run([DOCKER, *args], check=True, capture_output=True, text=True, timeout=60).stdout.strip()


def worker_container() -> str:
    return docker("ps", "--quiet", "--filter", f"label=com.docker.compose.project={PROJECT}",
                  "--filter", "label=com.docker.compose.service=worker")


def test_generation_with_two_adapters(client):
    info = client.server_info()
    assert info.device == "cpu"
    served = {a.name for a in client.list_adapters().adapters}
    assert served == {"demo-qv", "demo-all"}
    texts = {}
    for adapter in ("", "demo-qv", "demo-all"):
        reply = client.generate("Hello, world", adapter=adapter, max_new_tokens=12, ignore_eos=True, seed=0)
        assert reply.usage.completion_tokens == 12 and reply.finish_reason == "length"
        texts[adapter] = list(reply.token_ids)
    assert texts["demo-qv"] != texts[""] or texts["demo-all"] != texts[""], "the adapters changed nothing"


def test_load_adapter_from_the_mounted_directory(client):
    loaded = client.load_adapter("demo-mlp", "/adapters/demo-mlp")
    assert loaded.adapter.name == "demo-mlp" and loaded.adapter.rank == 4
    reply = client.generate("Hello, world", adapter="demo-mlp", max_new_tokens=8, ignore_eos=True)
    assert reply.usage.completion_tokens == 8
    with pytest.raises(grpc.RpcError) as missing:
        client.load_adapter("nowhere", "/adapters/not-there")
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND


def test_streamed_request(client):
    parts = list(client.generate_stream("The quick brown fox", adapter="demo-all", max_new_tokens=16, ignore_eos=True))
    assert len(parts) >= 2 and parts[-1].finished
    assert sum(len(p.token_ids) for p in parts) == 16 == parts[-1].usage.completion_tokens


def test_killed_worker_fails_in_flight_requests_and_comes_back(client):
    container = worker_container()
    restarts = int(docker("inspect", "--format", "{{.RestartCount}}", container))
    stream = client.generate_stream("Hello", adapter="demo-qv", max_new_tokens=900, ignore_eos=True, timeout=RECOVERY_TIMEOUT_S)
    assert not next(stream).finished
    # SIGKILL from the host, as a crash: `docker kill` would count as a manual stop, which the
    # restart policy leaves stopped.
    os.kill(int(docker("inspect", "--format", "{{.State.Pid}}", container)), signal.SIGKILL)
    killed_at = time.monotonic()
    with pytest.raises(grpc.RpcError) as in_flight:
        for part in stream:
            assert not part.finished, "the request finished although its worker was killed"
    assert in_flight.value.code() == grpc.StatusCode.UNAVAILABLE
    failed_after = time.monotonic() - killed_at

    reply = generate_after_recovery(client, adapter="demo-mlp")  # re-registered after the restart
    print(f"\nworker killed: in-flight request failed after {failed_after:.2f} s, "
          f"a new one succeeded after {time.monotonic() - killed_at:.1f} s")
    assert reply.usage.completion_tokens == 8
    assert int(docker("inspect", "--format", "{{.RestartCount}}", container)) == restarts + 1
    assert {a.name for a in client.list_adapters().adapters} == {"demo-qv", "demo-all", "demo-mlp"}


def generate_after_recovery(client: LoraServeClient, adapter: str):
    """Retries while the worker restarts; every failure meanwhile must be UNAVAILABLE."""
    deadline = time.monotonic() + RECOVERY_TIMEOUT_S
    while True:
        try:
            return client.generate("Hello again", adapter=adapter, max_new_tokens=8, ignore_eos=True, timeout=30)
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.UNAVAILABLE, error
            assert time.monotonic() < deadline, f"no recovery within {RECOVERY_TIMEOUT_S:g} s"
            time.sleep(1)
