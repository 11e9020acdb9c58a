"""Runs every python and bash example of README.md against a demo server started by `loraserve serve`.

Examples run in order in one scratch directory (they share the server, so an adapter loaded
by one is seen by the next), with the README's addresses replaced by the test server's and
the engine example's placeholder paths by real files (adapter paths run as written). A block
preceded by `<!-- not run: why -->` is skipped; grpcurl examples go through
`tests/grpcurl_standin.py` when grpcurl is not installed.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from loraserve.cli import main as cli_main
from loraserve.client import LoraServeClient
from loraserve.demo import DEMO_ADAPTERS
from tests.integration.conftest import free_port

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
BLOCK = re.compile(r"(<!-- not run: (?P<why>.+?) -->\n)?```(?P<lang>python|bash)\n(?P<code>.*?)```", re.DOTALL)
NOT_RUN = {"make serve", "export LORASERVE_MODEL_DIR=/models/llama", "loraserve serve"}  # the only blocks skipped, by first words
EXAMPLE_TIMEOUT_S = 240


@dataclass(frozen=True)
class Example:
    lang: str
    code: str
    skipped_because: str | None

    @property
    def title(self) -> str:
        return self.code.strip().splitlines()[0][:60]


def examples() -> list[Example]:
    return [Example(m["lang"], m["code"], m["why"]) for m in BLOCK.finditer(README.read_text())]


@dataclass(frozen=True)
class DemoServer:
    grpc: str
    http: str
    metrics: str
    home: Path


@pytest.fixture(scope="module")
def demo_server(tmp_path_factory) -> Iterator[DemoServer]:
    home = tmp_path_factory.mktemp("loraserve-home")
    ports = free_port(), free_port(), free_port()
    command = [sys.executable, "-c", "import sys; from loraserve.cli import main; sys.exit(main())",
               "serve", "--device", "cpu", "--port", str(ports[0]), "--http-port", str(ports[1]),
               "--metrics-port", str(ports[2]), "--log-level", "warning"]
    process = subprocess.Popen(command, env=os.environ | {"LORASERVE_HOME": str(home)}, cwd=REPO)
    server = DemoServer(*(f"127.0.0.1:{port}" for port in ports), home=home)
    try:
        with LoraServeClient(server.grpc) as client:
            deadline = time.monotonic() + 180
            while not client.is_ready():
                assert process.poll() is None, "loraserve serve exited during start-up"
                assert time.monotonic() < deadline, "the demo server did not become ready"
                time.sleep(0.2)
        yield server
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)


def test_readme_has_examples_and_skips_only_the_listed_ones():
    found = examples()
    assert len([e for e in found if e.skipped_because is None]) >= 9
    assert {" ".join(e.title.split()[:2]) for e in found if e.skipped_because} == NOT_RUN


def test_flag_table_covers_every_serve_flag(capsys):
    with pytest.raises(SystemExit):
        cli_main(["serve", "--help"])
    flags = set(re.findall(r"(--[a-z][a-z-]+)", capsys.readouterr().out)) - {"--help"}
    documented = set(re.findall(r"^\| `(--[a-z-]+)`", README.read_text(), re.MULTILINE))
    assert flags == documented


def test_readme_examples_run(demo_server, tmp_path):
    """Adapter paths are used as written: the demo serves its adapters from its own directory."""
    adapter = next(iter(DEMO_ADAPTERS))
    demo_root = demo_server.home / "demo-v1"
    replacements = {
        "127.0.0.1:50051": demo_server.grpc, "127.0.0.1:8000": demo_server.http,
        "127.0.0.1:9400": demo_server.metrics,
        "path/to/llama": str(demo_root / "model"), "path/to/peft-adapter": str(demo_root / "adapters" / adapter),
    }
    environment = os.environ | {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
                                "PYTHONPATH": str(REPO)}
    for example in examples():
        if example.skipped_because:
            continue
        code = example.code
        for placeholder, real in replacements.items():
            code = code.replace(placeholder, real)
        if example.lang == "bash" and shutil.which("grpcurl") is None:
            code = re.sub(r"(?m)^grpcurl ", f"{sys.executable} -m tests.grpcurl_standin ", code)
        command = [sys.executable, "-c", code] if example.lang == "python" else ["bash", "-euo", "pipefail", "-c", code]
        result = subprocess.run(command, cwd=tmp_path, env=environment, capture_output=True, text=True,
                                timeout=EXAMPLE_TIMEOUT_S)
        assert result.returncode == 0, f"README example failed: {example.title}\n{result.stdout}\n{result.stderr}"
        assert result.stdout.strip(), f"README example printed nothing: {example.title}"
        if ".state" in code:
            assert "ADAPTER_STATE_" in result.stdout, f"adapter states are printed by name: {example.title}"
