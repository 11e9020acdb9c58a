"""`loraserve serve` and `loraserve generate` as a user runs them; the process tree's life."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.integration.conftest import free_port

CLI = [sys.executable, "-m", "loraserve.cli"]


def children_of(pid: int) -> list[int]:
    result = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
    return [int(line) for line in result.stdout.split()]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().split()[2] != "Z"


def wait_gone(pids: list[int], timeout: float = 20.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.1)
    return [p for p in pids if alive(p)]


@pytest.fixture
def demo_server(tmp_path):
    port = free_port()
    env = os.environ | {"LORASERVE_HOME": str(tmp_path / "home")}
    server = subprocess.Popen([*CLI, "serve", "--port", str(port), "--device", "cpu", "--log-level", "warning"],
                              stdout=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 180
    line = ""
    while time.monotonic() < deadline and "serving" not in line:
        line = server.stdout.readline()
        assert line or server.poll() is None, "the launcher exited during start-up"
    assert f"127.0.0.1:{port}" in line
    yield server, port
    if server.poll() is None:
        server.kill()
        server.wait()


def test_serve_demo_generate_and_sigterm_stops_everything(demo_server):
    server, port = demo_server
    for extra in ([], ["--stream"], ["--adapter", "demo-all"]):
        result = subprocess.run([*CLI, "generate", "--address", f"127.0.0.1:{port}", "--max-new-tokens", "8",
                                 *extra, "Hello, world"], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
    missing = subprocess.run([*CLI, "generate", "--address", f"127.0.0.1:{port}", "--adapter", "nope", "Hi"],
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode == 1 and "NOT_FOUND" in missing.stderr
    children = children_of(server.pid)
    assert len(children) == 3
    server.send_signal(signal.SIGTERM)
    assert server.wait(timeout=30) == 0
    assert wait_gone(children) == []


def test_children_die_with_a_killed_launcher(demo_server):
    server, _ = demo_server
    children = children_of(server.pid)
    assert len(children) == 3
    server.kill()
    server.wait()
    assert wait_gone(children) == []


def test_scheduler_process_never_imports_torch():
    code = "import sys, scheduler.__main__, scheduler.service; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_a_bad_setting_is_a_usage_error_not_a_traceback():
    result = subprocess.run([*CLI, "serve", "--pause-tokens-ratio", "1"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "pause_tokens_ratio must exceed 1" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("process", ["frontend", "scheduler", "worker"])
def test_each_process_lists_the_flags_of_its_part(process):
    result = subprocess.run([sys.executable, "-m", process, "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "--log-level" in result.stdout
    assert {"frontend": "--served-model-name", "scheduler": "--no-prefetch", "worker": "--host-cache-bytes"}[
        process] in result.stdout
