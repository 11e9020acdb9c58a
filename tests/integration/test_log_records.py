"""`loraserve serve --log-format json` as a user runs it: every line any of its four processes writes,
on stdout or stderr, is one JSON record, and adapter loads, unloads and refusals say what and how long."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from loraserve.client import LoraServeClient
from protos.loraserve.v1 import serving_pb2
from tests.certs import CertificateAuthority
from tests.integration.conftest import free_port

CLI = [sys.executable, "-m", "loraserve.cli"]
RECORD_KEYS = {"ts", "level", "process", "logger", "msg"}
ADAPTER_KEYS = {"adapter", "path", "bytes", "tier", "duration_ms"}
# Settings the server chooses for the libraries unless the user has: the test runs with the user's choice unset.
LIBRARY_VARIABLES = ("GRPC_VERBOSITY", "GRPC_TRACE", "HF_HUB_DISABLE_PROGRESS_BARS", "TQDM_DISABLE")


def wait_for(condition, what: str, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def records(path: Path) -> list[dict]:
    """Every line of the file as a record; fails on the first line that is not one."""
    parsed = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        try:
            record = json.loads(line)
        except ValueError:
            pytest.fail(f"{path.name} line {number} is not JSON: {line!r}")
        assert isinstance(record, dict) and RECORD_KEYS <= set(record), f"{path.name} line {number}: {line!r}"
        parsed.append(record)
    return parsed


def test_every_line_of_every_process_is_a_json_record(tmp_path):
    home, out, err = tmp_path / "home", tmp_path / "stdout", tmp_path / "stderr"
    ca = CertificateAuthority(tmp_path / "pki", "ca")
    server_identity = ca.issue("server", server=True)
    port = free_port()
    environment = {k: v for k, v in os.environ.items() if k not in LIBRARY_VARIABLES} | {"LORASERVE_HOME": str(home)}
    command = [*CLI, "serve", "--port", str(port), "--http-port", str(free_port()), "--metrics-port",
               str(free_port()), "--device", "cpu", "--log-format", "json", "--grace-seconds", "1",
               "--tls-cert", str(server_identity.cert), "--tls-key", str(server_identity.key)]
    with open(out, "w") as stdout, open(err, "w") as stderr:
        server = subprocess.Popen(command, stdout=stdout, stderr=stderr, env=environment)
    try:
        wait_for(lambda: "loraserve serving" in out.read_text() or server.poll() is not None, "the server to serve")
        assert server.poll() is None, err.read_text()
        exercise(f"127.0.0.1:{port}", ca, home)
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=60) == 0
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()

    logged = records(err)
    printed = records(out)
    for announcement in ("frontend listening on", "loraserve serving"):
        assert any(r["msg"].startswith(announcement) for r in printed), announcement
    assert {r["process"] for r in logged + printed} == {"launcher", "frontend", "scheduler", "worker"}

    def adapter_records(message: str, adapter: str) -> list[dict]:
        return [r for r in logged if r["msg"] == message and r.get("adapter") == adapter]

    registered, = adapter_records("adapter registered", "mine")
    assert ADAPTER_KEYS <= set(registered) and registered["tier"] == "disk" and registered["bytes"] > 0
    assert registered["path"] == str(home / "demo-v1" / "mine")
    loaded = {r["tier"]: r for r in adapter_records("adapter loaded", "mine")}
    assert set(loaded) == {"host", "gpu"}
    for record in loaded.values():
        assert ADAPTER_KEYS <= set(record) and record["bytes"] == registered["bytes"] and record["level"] == "info"
    unloaded, = adapter_records("adapter unloaded", "mine")
    assert ADAPTER_KEYS <= set(unloaded) and unloaded["tier"] == "gpu"
    refusals = {r["code"]: r for r in logged if r["msg"] == "adapter load refused"}
    assert set(refusals) == {"PERMISSION_DENIED", "INVALID_ARGUMENT"}
    assert all({"adapter", "path", "tier", "error", "duration_ms"} <= set(r) for r in refusals.values())
    assert refusals["INVALID_ARGUMENT"]["path"].endswith("broken")


def exercise(address: str, ca: CertificateAuthority, home: Path) -> None:
    """A generation, a load and its use, two refused loads, an unload, and a plaintext client
    knocking at the TLS port (gRPC's C core reports such handshakes on its own)."""
    root = home / "demo-v1"
    shutil.copytree(root / "adapters" / "demo-qv", root / "mine")
    shutil.copytree(root / "adapters" / "demo-qv", root / "broken")
    weights = root / "broken" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with grpc.insecure_channel(address) as plaintext:
        with pytest.raises(grpc.FutureTimeoutError):
            grpc.channel_ready_future(plaintext).result(timeout=1)
    with LoraServeClient(address, timeout=60, tls=grpc.ssl_channel_credentials(ca.identity.cert.read_bytes())) as client:
        assert client.generate("Hello", adapter="demo-all", max_new_tokens=4).usage.completion_tokens == 4
        client.load_adapter("mine", str(root / "mine"))
        client.generate("Hello", adapter="mine", max_new_tokens=2)
        wait_for(lambda: {a.name: a.state for a in client.list_adapters().adapters}["mine"]
                 == serving_pb2.ADAPTER_STATE_RESIDENT, "mine on the GPU", timeout=30)
        for name, path, code in (("outside", "/etc", grpc.StatusCode.PERMISSION_DENIED),
                                 ("broken", str(root / "broken"), grpc.StatusCode.INVALID_ARGUMENT)):
            with pytest.raises(grpc.RpcError) as refused:
                client.load_adapter(name, path)
            assert refused.value.code() == code
        client.unload_adapter("mine")
