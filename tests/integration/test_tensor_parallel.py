"""A tensor-parallel worker group (TP=2, gloo on CPU) behind the real scheduler and frontend:
outputs as one worker gives them, a rank killed, a rank hung."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from loraserve.client import LoraServeClient
from loraserve.launcher import Launcher
from tests.integration.test_faults import (
    assert_ended_unavailable,
    assert_recovered,
    long_streams,
    supervised_server,
)
from tests.integration.test_service import (  # noqa: F401 - fixtures
    WORKLOAD,
    assert_consistent,
    oracle,
    reference,
    run_workload,
    wait_for,
)

ADAPTERS = {"a0", "a1", "a2", "a3"}
TIMEOUT_S = 10.0  # short, so that the hung rank is found soon, yet longer than a busy CI machine's stalls


@pytest.fixture(scope="module")
def group(base_config) -> Iterator[tuple[Launcher, LoraServeClient]]:
    with supervised_server(base_config.replace(tensor_parallel_size=2, tp_timeout_s=TIMEOUT_S)) as pair:
        yield pair


def ranks_started_by(pid: int) -> list[int]:
    """The processes whose parent is `pid` (rank 0 starts the group's other ranks)."""
    children = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                children.append(int(entry.name))
    return children


def test_a_group_of_two_gives_the_outputs_of_one_worker(group, oracle, reference):  # noqa: F811
    launcher, client = group
    assert len(ranks_started_by(launcher.processes["worker"].pid)) == 1
    outputs = run_workload(client)
    for request_id, adapter, ids, _ in WORKLOAD:
        assert_consistent(oracle, reference[request_id], ids, adapter, outputs[request_id])


def signal_rank_1_mid_generation(launcher: Launcher, client: LoraServeClient, oracle, reference,  # noqa: F811
                                 signum: int, seed: int) -> tuple[subprocess.Popen, int]:
    """Sends `signum` to rank 1 while streams run; they end UNAVAILABLE and the service recovers.
    Returns the old rank 0 and rank 1's pid."""
    old = launcher.processes["worker"]
    [rank_1] = ranks_started_by(old.pid)
    streams = long_streams(client, seed)
    os.kill(rank_1, signum)
    assert_ended_unavailable(streams)
    assert_recovered(client, oracle, reference, ADAPTERS)
    return old, rank_1


def test_a_rank_killed_mid_generation_takes_the_group_down_and_it_comes_back(group, oracle, reference):  # noqa: F811
    launcher, client = group
    old, _ = signal_rank_1_mid_generation(launcher, client, oracle, reference, signal.SIGKILL, 1400)
    assert launcher.processes["worker"].pid != old.pid and old.poll() is not None


def test_a_hung_rank_is_found_by_the_collective_timeout(group, oracle, reference):  # noqa: F811
    launcher, client = group
    old, rank_1 = signal_rank_1_mid_generation(launcher, client, oracle, reference, signal.SIGSTOP, 1500)
    assert old.poll() is not None, "rank 0 left the group"
    wait_for(lambda: not Path(f"/proc/{rank_1}").exists(), "the hung rank to be killed")
