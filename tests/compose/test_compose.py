"""The compose deployment as a client sees it: two replicas (scheduler + CPU worker each) behind
one frontend, five containers on 127.0.0.1.

Needs the environment scripts/compose_test.sh sets: LORASERVE_COMPOSE_ADDRESS (the
frontend), LORASERVE_COMPOSE_PROJECT and LORASERVE_COMPOSE_DOCKER (to crash a worker),
the demo model with demo-qv and demo-all served and demo-mlp in the adapters directory.
Tests run in file order: the crash test comes last.
"""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
import pytest

from loraserve.client import LoraServeClient

ADDRESS = os.environ["LORASERVE_COMPOSE_ADDRESS"]
PROJECT = os.environ["LORASERVE_COMPOSE_PROJECT"]
DOCKER = os.environ.get("LORASERVE_COMPOSE_DOCKER", "docker")
RECOVERY_TIMEOUT_S = 240.0
WORKER_OF_REPLICA = {"0": "worker", "1": "worker-2"}  # by the order of the frontend's --scheduler-address


@pytest.fixture(scope="module")
def client():
    with LoraServeClient(ADDRESS, timeout=120) as client:
        client.wait_until_ready(120)
        yield client


def docker(*args: str) -> str:
    return subprocess.run([DOCKER, *args], check=True, capture_output=True, text=True, timeout=60).stdout.strip()


def container_of(service: str) -> str:
    return docker("ps", "--quiet", "--filter", f"label=com.docker.compose.project={PROJECT}",
                  "--filter", f"label=com.docker.compose.service={service}")


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


@dataclass
class Outcome:
    started: float
    ended: float
    parts: int  # stream messages received
    error: grpc.RpcError | None = None


class Traffic:
    """Streamed requests from `threads` threads, one after another, over the adapters and the base model."""

    ADAPTERS = ("", "demo-qv", "demo-all", "demo-mlp")

    def __init__(self, client: LoraServeClient, threads: int) -> None:
        self.client = client
        self.outcomes: list[Outcome] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]

    def __enter__(self) -> Traffic:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=RECOVERY_TIMEOUT_S)

    def _run(self, index: int) -> None:
        for n in itertools.count(index):
            if self._stop.is_set():
                return
            outcome = Outcome(started=time.monotonic(), ended=0.0, parts=0)
            try:
                for _ in self.client.generate_stream("Hello", adapter=self.ADAPTERS[n % len(self.ADAPTERS)],
                                                     max_new_tokens=8, ignore_eos=True, timeout=60):
                    outcome.parts += 1
            except grpc.RpcError as error:
                outcome.error = error
            outcome.ended = time.monotonic()
            self.outcomes.append(outcome)


def replicas_in_stats(client: LoraServeClient) -> set[str] | None:
    """The replicas GetStats lists (those ready); None if it failed meanwhile (a replica just lost)."""
    try:
        return {replica.replica for replica in client.stats(timeout=10).replicas}
    except grpc.RpcError as error:
        assert error.code() == grpc.StatusCode.UNAVAILABLE, error
        return None


class StatsWatch:
    """GetStats' replica lists, asked every 0.1 s from a thread of its own: a replica's outage shorter
    than the test's own requests still shows."""

    def __init__(self, client: LoraServeClient) -> None:
        self.client = client
        self.started = time.monotonic()
        self.seen: list[tuple[float, str]] = []  # (seconds since the start, what GetStats listed), on change
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> StatsWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def listed_alone(self, replica: str) -> bool:
        return str({replica}) in (listed for _, listed in self.seen)

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            try:
                listed = str(replicas_in_stats(self.client))
            except AssertionError as error:  # an error other than UNAVAILABLE
                listed = str(error).splitlines()[0]
            if not self.seen or self.seen[-1][1] != listed:
                self.seen.append((round(time.monotonic() - self.started, 1), listed))


def requests_finished(client: LoraServeClient, replica: str) -> int:
    finished = {r.replica: r.stats.requests_finished for r in client.stats(timeout=10).replicas}
    assert replica in finished, f"replica {replica} is not in GetStats: {sorted(finished)}"
    return finished[replica]


def test_killed_worker_of_one_replica_under_traffic(client):
    """The worker of the replica running a long stream is killed under traffic: that stream ends
    UNAVAILABLE, every other request succeeds (those the dead worker had not started, and those
    routed to its replica before the frontend knew, are retried on the other replica before their
    first token), and once its container has restarted the replica takes requests again."""
    assert replicas_in_stats(client) == {"0", "1"}
    stream = client.generate_stream("Hello", adapter="demo-qv", max_new_tokens=900, ignore_eos=True,
                                    timeout=RECOVERY_TIMEOUT_S)
    assert not next(stream).finished
    running = {r.replica: r.stats.running_requests + r.stats.waiting_requests for r in client.stats(timeout=10).replicas}
    assert sorted(running.values()) == [0, 1], f"the long stream should be the only request: {running}"
    killed = next(replica for replica, requests in running.items() if requests == 1)
    survivor = ({"0", "1"} - {killed}).pop()
    container = container_of(WORKER_OF_REPLICA[killed])
    restarts = int(docker("inspect", "--format", "{{.RestartCount}}", container))
    with Traffic(client, threads=2) as traffic:
        time.sleep(1.0)  # traffic on both replicas
        # SIGKILL from the host, as a crash: `docker kill` would count as a manual stop, which the
        # restart policy leaves stopped.
        os.kill(int(docker("inspect", "--format", "{{.State.Pid}}", container)), signal.SIGKILL)
        killed_at = time.monotonic()
        with StatsWatch(client) as watch:  # from the kill until the replica is back
            with pytest.raises(grpc.RpcError) as in_flight:
                for part in stream:
                    assert not part.finished, "the request finished although its worker was killed"
            assert in_flight.value.code() == grpc.StatusCode.UNAVAILABLE
            failed_after = time.monotonic() - killed_at
            # demo-qv is resident on the dead replica: the frontend retries it on the other if it goes there.
            reply = client.generate("Hello again", adapter="demo-qv", max_new_tokens=8, ignore_eos=True,
                                    timeout=60)
            assert reply.usage.completion_tokens == 8
            succeeded_after = time.monotonic() - killed_at

            deadline = killed_at + RECOVERY_TIMEOUT_S
            # GetStats lists the survivor alone while the worker is down, then both again.
            while True:
                restarted = int(docker("inspect", "--format", "{{.RestartCount}}", container)) - restarts
                if watch.listed_alone(survivor) and replicas_in_stats(client) == {"0", "1"} and restarted == 1:
                    break
                assert time.monotonic() < deadline, (
                    f"replica {killed} not back within {RECOVERY_TIMEOUT_S:g} s: GetStats listed (seconds after "
                    f"the kill, replicas) {watch.seen}; the worker's container restarted {restarted} times")
                time.sleep(0.5)
        back_after = time.monotonic() - killed_at
        time.sleep(1.0)  # traffic on both replicas again
    outcomes = traffic.outcomes

    # Failures: only streams that were generating on the killed worker, UNAVAILABLE.
    for outcome in outcomes:
        if outcome.error is not None:
            assert outcome.error.code() == grpc.StatusCode.UNAVAILABLE, outcome.error
            assert outcome.parts > 0 and outcome.started < killed_at, \
                f"a request failed that was not generating on the killed worker: {outcome.error}"
    failed = sum(outcome.error is not None for outcome in outcomes)
    print(f"\nreplica {killed}'s worker killed: its stream failed after {failed_after:.2f} s, a new request "
          f"succeeded after {succeeded_after:.1f} s, the replica was back after {back_after:.1f} s; traffic meanwhile: "
          f"{len(outcomes)} requests, {failed} failed (generating on the killed worker)")

    # The replica serves again: base-model requests go to the least loaded replica.
    before = requests_finished(client, killed)
    while requests_finished(client, killed) == before:
        with ThreadPoolExecutor(4) as pool:
            replies = list(pool.map(lambda _: client.generate("Hello again", max_new_tokens=8, ignore_eos=True,
                                                              timeout=60), range(4)))
        assert all(reply.usage.completion_tokens == 8 for reply in replies)
        assert time.monotonic() < deadline, f"replica {killed} took no request after it came back"
    reply = client.generate("Hello again", adapter="demo-mlp", max_new_tokens=8, ignore_eos=True, timeout=60)
    assert reply.usage.completion_tokens == 8
    assert {a.name for a in client.list_adapters().adapters} == {"demo-qv", "demo-all", "demo-mlp"}
