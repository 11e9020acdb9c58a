"""`loraserve serve` and `loraserve generate` as a user runs them; the process tree's life."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import pytest

from loraserve.client import LoraServeClient
from settings.config import ServeConfig
from settings.flags import to_argv
from tests.integration.conftest import free_port
from tests.integration.test_service import wait_for

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


# Shutdown with requests in flight ------------------------------------------------------------

SERVE_WITH_SLOW_A2 = """
import argparse, sys
from loraserve.launcher import serve
from settings.flags import add_serve_arguments, serve_config_from_args
from tests.slow_worker import slow_worker_modules
parser = argparse.ArgumentParser()
add_serve_arguments(parser)
config = serve_config_from_args(parser, parser.parse_args(sys.argv[1:]))
sys.exit(serve(config, slow_worker_modules(slow_loads={"a2": 6})))
"""


def serve_flags(config: ServeConfig) -> list[str]:
    return [flag for part in dataclasses.fields(config) for flag in to_argv(getattr(config, part.name))]


@pytest.mark.parametrize("signal_to", ["launcher", "process group"])
def test_sigterm_ends_every_request_properly_then_exits_in_order(base_config, tmp_path, signal_to):
    """Requests that outlive the grace period (queued behind a 6-second load) end with UNAVAILABLE on
    both APIs (a started HTTP stream's error event: tests/frontend/test_security.py), each is logged, and the processes exit within the grace period and a few seconds; a
    signal to the whole process group (Ctrl-C in a terminal) drains the same way."""
    port, http_port, log_file = free_port(), free_port(), tmp_path / "serve.log"
    config = base_config.replace(port=port, http_port=http_port, grace_seconds=1, log_level="info",
                                 log_file=str(log_file))
    launcher = subprocess.Popen([sys.executable, "-c", SERVE_WITH_SLOW_A2, *serve_flags(config)],
                                stdout=subprocess.DEVNULL, start_new_session=True)
    try:
        completions = f"http://127.0.0.1:{http_port}/v1/completions"
        with LoraServeClient(f"127.0.0.1:{port}", timeout=60) as client, ThreadPoolExecutor(4) as pool:
            client.wait_until_ready(120)
            children = children_of(launcher.pid)
            stream = client.generate_stream(input_ids=[5, 6, 7], adapter="a2", max_new_tokens=4, request_id="grpc")
            plain = pool.submit(http_post, completions, {"model": "a2", "prompt": [5, 6], "max_tokens": 4},
                                "http-plain")
            events = pool.submit(http_post, completions, {"model": "a2", "prompt": [5, 6], "max_tokens": 4,
                                                          "stream": True}, "http-stream")
            wait_for(lambda: client.stats().waiting_requests == 3, "three requests queued behind a2's load")
            signalled = time.monotonic()
            if signal_to == "launcher":
                launcher.send_signal(signal.SIGTERM)
            else:
                os.killpg(launcher.pid, signal.SIGTERM)
            with pytest.raises(grpc.RpcError) as cut:
                list(stream)
            assert cut.value.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in cut.value.details()
            for answer in (plain, events):  # a stream with no event sent yet answers with an HTTP status
                status, body = answer.result(timeout=30)
                assert status == 503 and "shutting down" in json.loads(body)["error"]["message"]
        assert launcher.wait(timeout=30) == 0
        assert time.monotonic() - signalled < 1 + 10
        assert wait_gone(children) == []
        finished = [json.loads(line) if line.startswith("{") else line for line in log_file.read_text().splitlines()
                    if "request finished" in line]
        for request_id in ("grpc", "http-plain", "http-stream"):
            assert any(request_id in str(line) and "unavailable" in str(line) for line in finished), request_id
        assert "the worker disconnected" not in log_file.read_text()
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait()


def http_post(url: str, body: dict[str, Any], request_id: str) -> tuple[int, str]:
    request = urllib.request.Request(url, json.dumps(body).encode(),
                                     {"Content-Type": "application/json", "X-Request-Id": request_id})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def test_a_model_that_cannot_load_is_one_line_and_no_api_is_announced(tmp_path):
    result = subprocess.run([*CLI, "serve", "--model-path", str(tmp_path / "nowhere"), "--device", "cpu",
                             "--port", str(free_port())], capture_output=True, text=True, timeout=120)
    output = result.stdout + result.stderr
    assert result.returncode == 1
    assert "Traceback" not in output and "listening" not in output and "process=frontend" not in output
    assert f"cannot serve --model-path {tmp_path / 'nowhere'}" in output and "config.json" in output


def test_a_group_size_that_cannot_split_the_model_is_one_line(service_model):
    result = subprocess.run([*CLI, "serve", "--model-path", str(service_model), "--device", "cpu", "--tp", "3",
                             "--port", str(free_port())], capture_output=True, text=True, timeout=120)
    output = result.stdout + result.stderr
    assert result.returncode == 1
    assert "Traceback" not in output and "listening" not in output
    assert "--tensor-parallel-size 3 cannot split 4 attention heads" in output
