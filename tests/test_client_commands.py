"""The client commands (generate, bench, trace) against a real frontend that needs a token and mutual TLS,
and their one-line errors."""

from __future__ import annotations

import json
from importlib import metadata
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from frontend.auth import AuthTokens
from loraserve.cli import main as cli
from loraserve.client import LoraServeClient
from loraserve.healthcheck import main as healthcheck
from loraserve.demo import build_tokenizer
from tests.certs import CertificateAuthority
from tests.frontend.fake_scheduler import FakeScheduler
from tests.frontend.test_frontend_service import BackgroundFrontend, free_port
from tests.frontend.test_security import API, frontend, tls_files

SPAN = {"name": "forward", "ph": "X", "pid": "worker", "tid": "compute", "ts": 1.0e6, "dur": 2.0e3, "args": {}}
BENCH = ["--num-prompts", "3", "--random-input-len", "8", "--random-output-len", "3", "--disable-progress"]


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Any]:
    directory = tmp_path_factory.mktemp("pki")
    ca = CertificateAuthority(directory, "test-ca")
    return {"ca": ca.identity, "server": ca.issue("server", server=True), "client": ca.issue("client", server=False)}


@pytest.fixture(scope="module")
def secured(tmp_path_factory, pki) -> Iterator[tuple[BackgroundFrontend, dict[str, Path], FakeScheduler]]:
    """A frontend needing the API token and a client certificate, and the files a client passes."""
    directory = tmp_path_factory.mktemp("secured")
    build_tokenizer(directory / "tokenizer", max_length=64)
    (directory / "token").write_text(f"{API}\n")
    with FakeScheduler(f"ipc://{directory}/scheduler.sock") as fake:
        fake.trace_events = [SPAN]
        with frontend(fake, tokens=AuthTokens(api=API), tls=tls_files(pki, mutual=True),
                      tokenizer_path=str(directory / "tokenizer")) as server:
            credentials = grpc.ssl_channel_credentials(pki["ca"].cert.read_bytes(), *pki["client"].pem())
            with LoraServeClient(server.address, tls=credentials) as client:
                client.wait_until_ready(10)
            yield server, {"token": directory / "token", "ca": pki["ca"].cert, "cert": pki["client"].cert,
                           "key": pki["client"].key}, fake


def flags(server: BackgroundFrontend, files: dict[str, Path], *, token: bool = True) -> list[str]:
    words = ["--address", server.address, "--tls-ca", str(files["ca"]), "--tls-cert", str(files["cert"]),
             "--tls-key", str(files["key"])]
    return words + (["--token-file", str(files["token"])] if token else [])


def test_every_client_command_reaches_a_server_needing_a_token_and_mutual_tls(secured, tmp_path, capsys):
    server, files, _ = secured
    assert cli(["generate", "hi", "--max-tokens", "2", *flags(server, files)]) == 0
    assert capsys.readouterr().out.strip()
    assert cli(["bench", *BENCH, "--output-file", str(tmp_path / "bench.json"), *flags(server, files)]) == 0
    assert json.loads((tmp_path / "bench.json").read_text())["summary"]["completed"] == 3
    assert cli(["trace", "-o", str(tmp_path / "trace.json"), *flags(server, files)]) == 0
    assert json.loads((tmp_path / "trace.json").read_text())["traceEvents"] == [SPAN]


@pytest.mark.parametrize("command", [["generate", "hi"], ["bench", *BENCH], ["trace"]])
def test_a_missing_token_is_one_line_naming_the_flag(secured, tmp_path, capsys, monkeypatch, command):
    monkeypatch.chdir(tmp_path)
    server, files, _ = secured
    assert cli([*command, *flags(server, files, token=False)]) == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "UNAUTHENTICATED" in error and "--token-file" in error


def test_the_healthcheck_reaches_a_tls_frontend_with_the_same_flags(secured):
    server, files, _ = secured
    tls = flags(server, files, token=False)[2:]  # health needs no token
    assert healthcheck(["frontend", server.address, *tls]) == 0
    assert healthcheck(["frontend", server.address, "--timeout", "1"]) == 1


@pytest.mark.parametrize("length_flag", ["--max-tokens", "--max-new-tokens"])
def test_generate_sends_its_sampling_flags_and_leaves_the_rest_to_the_server(secured, capsys, length_flag):
    server, files, fake = secured
    fake.submits.clear()
    assert cli(["generate", "hi", length_flag, "2", "--seed", "7", "--top-p", "0.5", "--temperature", "0.7",
                "--stop", "x", "--stop", "yz", *flags(server, files)]) == 0
    assert cli(["generate", "hi", *flags(server, files)]) == 0
    chosen, default = (submit.sampling for submit in fake.submits)
    context_left = fake.info.max_context_length - len(fake.submits[1].input_ids)
    assert (chosen.max_new_tokens, chosen.seed, chosen.temperature) == (2, 7, pytest.approx(0.7))
    assert chosen.top_p == pytest.approx(0.5) and list(chosen.stop) == ["x", "yz"]
    assert default.max_new_tokens == min(128, context_left) and default.temperature == 0 and not default.HasField("seed")


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"loraserve {metadata.version('loraserve')}"


# One-line errors ----------------------------------------------------------------------------


@pytest.mark.parametrize("command", [["generate", "hi"], ["bench", *BENCH], ["trace"]])
def test_an_unreachable_address_is_one_line_naming_the_flag(tmp_path, capsys, monkeypatch, command):
    monkeypatch.chdir(tmp_path)
    assert cli([*command, "--address", f"127.0.0.1:{free_port()}"]) == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "UNAVAILABLE" in error and "--address" in error


@pytest.mark.parametrize("command", [
    ["timeline", "missing.json"], ["bench", "compare", "missing.json"], ["generate", "--token-file", "missing", "hi"],
    ["bench", "--tls-ca", "missing"], ["trace", "--tls-cert", "missing"], ["serve", "--lora-paths", "justapath"],
    ["generate", "--tls-cert", "present.pem", "hi"]])
def test_usage_errors_are_one_line_and_exit_2(tmp_path, capsys, monkeypatch, command):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "present.pem").write_text("")
    with pytest.raises(SystemExit) as exit_:
        cli(command)
    error = capsys.readouterr().err
    assert exit_.value.code == 2
    assert error.count("\n") == 1 and f"see loraserve {command[0]}" in error


@pytest.mark.parametrize("command, content, cause", [
    (["timeline", "file.json"], "not json", "not JSON"), (["timeline", "file.json"], "{}", "not a Chrome trace"),
    (["timeline", "file.json"], '{"traceEvents": []}', "no spans"),
    (["bench", "compare", "file.json"], "[1]", "no benchmark summary")])
def test_unusable_files_are_one_line_and_exit_1(tmp_path, capsys, monkeypatch, command, content, cause):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "file.json").write_text(content)
    assert cli(command) == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and cause in error
