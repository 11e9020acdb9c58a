"""Authentication, TLS, malformed and oversized requests, and the shutdown drain, on the real frontend."""

from __future__ import annotations

import asyncio
import json
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from frontend.auth import AuthDenied, AuthTokens, Denial, check_bearer
from frontend.tls import TlsFiles
from loraserve.client import LoraServeClient
from protos.loraserve.v1 import serving_pb2
from settings.config import FrontendConfig
from tests.certs import CertificateAuthority
from tests.frontend.fake_scheduler import FakeScheduler
from tests.frontend.test_frontend_service import (  # noqa: F401 (tokenizer_dir: a fixture)
    WAIT_S,
    BackgroundFrontend,
    rpc_error,
    tokenizer_dir,
    wait_for,
)

API, ADMIN = "api-secret", "admin-secret"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture
def fake(tmp_path) -> Iterator[FakeScheduler]:
    with FakeScheduler(f"ipc://{tmp_path}/scheduler.sock") as scheduler:
        yield scheduler


@contextmanager
def frontend(fake: FakeScheduler, tokens: AuthTokens = AuthTokens(), tls: TlsFiles | None = None,
             **options: Any) -> Iterator[BackgroundFrontend]:
    """`tokens` reach the frontend as token files, `tls` as its PEM files' paths."""
    with tempfile.TemporaryDirectory() as directory:
        config = FrontendConfig(port=0, readiness_retry_s=0.05, **token_files(tokens, Path(directory)),
                                **tls_paths(tls), **options)
        server = BackgroundFrontend(config, fake.address)
        try:
            yield server
        finally:
            server.stop()


def token_files(tokens: AuthTokens, directory: Path) -> dict[str, str]:
    files = {}
    for option, token in (("auth_token_file", tokens.api), ("admin_token_file", tokens.admin)):
        if token:
            files[option] = str(directory / option)
            Path(files[option]).write_text(f"{token}\n")
    return files


def tls_paths(tls: TlsFiles | None) -> dict[str, str | None]:
    return {} if tls is None else {"tls_cert": tls.cert, "tls_key": tls.key, "tls_client_ca": tls.client_ca}


def health(address: str, credentials: grpc.ChannelCredentials | None = None) -> int:
    channel = grpc.insecure_channel(address) if credentials is None else grpc.secure_channel(address, credentials)
    with channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status


# Bearer tokens ------------------------------------------------------------------------------

BOTH = AuthTokens(api=API, admin=ADMIN)
DECISIONS = [  # (tokens, header, admin RPC, expected denial or None)
    (AuthTokens(), None, True, None),
    (BOTH, None, False, Denial.UNAUTHENTICATED),
    (BOTH, "Basic abc", False, Denial.UNAUTHENTICATED),
    (BOTH, "Bearer ", False, Denial.UNAUTHENTICATED),
    (BOTH, "Bearer wrong", False, Denial.UNAUTHENTICATED),
    (BOTH, f"Bearer {API}", False, None),
    (BOTH, f"bearer {API}", False, None),
    (BOTH, f"Bearer {ADMIN}", False, None),
    (BOTH, f"Bearer {API}", True, Denial.PERMISSION_DENIED),
    (BOTH, f"Bearer {ADMIN}", True, None),
    (BOTH, "Bearer wrong", True, Denial.UNAUTHENTICATED),
    (AuthTokens(api=API), f"Bearer {API}", True, None),
    (AuthTokens(admin=ADMIN), None, False, None),
    (AuthTokens(admin=ADMIN), None, True, Denial.UNAUTHENTICATED),
    (AuthTokens(admin=ADMIN), f"Bearer {ADMIN}", True, None),
]


@pytest.mark.parametrize("tokens, header, admin, expected", DECISIONS)
def test_check_bearer_decisions(tokens, header, admin, expected):
    if expected is None:
        check_bearer(header, tokens, admin)
        return
    with pytest.raises(AuthDenied) as denied:
        check_bearer(header, tokens, admin)
    assert denied.value.denial is expected
    assert denied.value.denial.http_status == {Denial.UNAUTHENTICATED: 401, Denial.PERMISSION_DENIED: 403}[expected]


def test_tokens_come_from_files(tmp_path):
    (tmp_path / "api").write_text(f"{API}\n")
    (tmp_path / "empty").write_text("\n")
    assert AuthTokens.from_files(str(tmp_path / "api"), None) == AuthTokens(api=API)
    with pytest.raises(ValueError, match="empty"):
        AuthTokens.from_files(str(tmp_path / "empty"), None)


def test_every_rpc_but_health_needs_the_token_and_admin_rpcs_the_admin_token(fake):
    with frontend(fake, tokens=BOTH) as server:
        wait_for(lambda: health(server.address) == SERVING, "SERVING without credentials")
        anonymous = LoraServeClient(server.address, timeout=10)
        wrong = LoraServeClient(server.address, timeout=10, token="guess")
        user = LoraServeClient(server.address, timeout=10, token=API)
        admin = LoraServeClient(server.address, timeout=10, token=ADMIN)
        for client in (anonymous, wrong):
            for call in (lambda: client.generate(input_ids=[1, 2]), lambda: list(client.generate_stream(input_ids=[1])),
                         client.stats, client.list_adapters, client.server_info, lambda: client.tokenize("x"),
                         lambda: client.load_adapter("a", "/adapters/a"), lambda: client.unload_adapter("a")):
                assert rpc_error(call).code() == grpc.StatusCode.UNAUTHENTICATED
        assert fake.submits == [] and fake.adapters == {}
        assert rpc_error(lambda: user.load_adapter("a", "/adapters/a")).code() == grpc.StatusCode.PERMISSION_DENIED
        assert "a" not in fake.adapters
        assert list(user.generate(input_ids=[1, 2], max_new_tokens=2).token_ids) == [10, 11]
        assert [m.token_ids[0] for m in user.generate_stream(input_ids=[1], max_new_tokens=1)] == [10]
        assert admin.load_adapter("a", "/adapters/a").adapter.name == "a"
        assert rpc_error(lambda: user.unload_adapter("a")).code() == grpc.StatusCode.PERMISSION_DENIED
        admin.unload_adapter("a")
        assert list(admin.generate(input_ids=[1, 2], max_new_tokens=1).token_ids) == [10]
        for client in (anonymous, wrong, user, admin):
            client.close()


def test_reflection_needs_the_token_too(fake):
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    with frontend(fake, tokens=AuthTokens(api=API)) as server, grpc.insecure_channel(server.address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        error = rpc_error(lambda: list(stub.ServerReflectionInfo(iter([request]), timeout=5)))
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED
        answers = list(stub.ServerReflectionInfo(iter([request]), timeout=5,
                                                 metadata=[("authorization", f"Bearer {API}")]))
        assert answers[0].list_services_response.service


# TLS ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Any]:
    directory = tmp_path_factory.mktemp("pki")
    ca, stranger = CertificateAuthority(directory, "test-ca"), CertificateAuthority(directory / "other", "other-ca")
    return {"ca": ca.identity, "server": ca.issue("server", server=True), "client": ca.issue("client", server=False),
            "stranger": stranger.issue("stranger", server=False)}


def tls_files(pki: dict[str, Any], mutual: bool) -> TlsFiles:
    return TlsFiles(str(pki["server"].cert), str(pki["server"].key), str(pki["ca"].cert) if mutual else None)


def channel_credentials(pki: dict[str, Any], client: str | None = None) -> grpc.ChannelCredentials:
    key, cert = pki[client].pem() if client else (None, None)
    return grpc.ssl_channel_credentials(Path(pki["ca"].cert).read_bytes(), key, cert)


def test_tls_serves_tls_clients_only(fake, pki):
    with frontend(fake, tls=tls_files(pki, mutual=False)) as server:
        wait_for(lambda: health(server.address, channel_credentials(pki)) == SERVING, "SERVING over TLS")
        with LoraServeClient(server.address, timeout=10, tls=channel_credentials(pki)) as client:
            assert list(client.generate(input_ids=[1, 2], max_new_tokens=2).token_ids) == [10, 11]
        with LoraServeClient(server.address, timeout=3) as plaintext:
            assert rpc_error(lambda: plaintext.generate(input_ids=[1, 2])).code() == grpc.StatusCode.UNAVAILABLE
    assert len(fake.submits) == 1


def test_mutual_tls_needs_a_client_certificate_of_the_ca(fake, pki):
    with frontend(fake, tls=tls_files(pki, mutual=True), tokens=AuthTokens(api=API)) as server:
        wait_for(lambda: health(server.address, channel_credentials(pki, "client")) == SERVING, "SERVING over mTLS")
        for client_identity in (None, "stranger"):
            with LoraServeClient(server.address, timeout=3, token=API,
                                 tls=channel_credentials(pki, client_identity)) as refused:
                assert rpc_error(lambda: refused.generate(input_ids=[1, 2])).code() == grpc.StatusCode.UNAVAILABLE
        with LoraServeClient(server.address, timeout=10, token=API, tls=channel_credentials(pki, "client")) as client:
            assert list(client.generate(input_ids=[1, 2], max_new_tokens=2).token_ids) == [10, 11]
    assert len(fake.submits) == 1


# Malformed and oversized requests -----------------------------------------------------------

STOP_FIELD = serving_pb2.SamplingParams.DESCRIPTOR.fields_by_name["stop"].number
SAMPLING_FIELD = serving_pb2.GenerateRequest.DESCRIPTOR.fields_by_name["sampling"].number


def invalid_utf8_stop_request() -> bytes:
    """A GenerateRequest whose stop string is the bytes ff fe: no protobuf library would write it."""
    valid = serving_pb2.GenerateRequest(input_ids=[1, 2]).SerializeToString()
    stop = bytes([STOP_FIELD << 3 | 2, 2, 0xFF, 0xFE])
    return valid + bytes([SAMPLING_FIELD << 3 | 2, len(stop)]) + stop


def invalid_utf8_adapter_name() -> bytes:
    name_field = serving_pb2.LoadAdapterRequest.DESCRIPTOR.fields_by_name["name"].number
    return bytes([name_field << 3 | 2, 2, 0xFF, 0xFE])


MALFORMED = {"corrupt": b"\xff\xff\xff\xff", "truncated": b"\x0a\x05ab"}


@pytest.mark.parametrize("method, payload", [
    *((method, invalid_utf8_stop_request()) for method in ("Generate", "GenerateStream")),
    ("LoadAdapter", invalid_utf8_adapter_name()),
    *((method, payload) for method in ("Generate", "GenerateStream", "LoadAdapter") for payload in MALFORMED.values()),
])
def test_requests_that_do_not_parse_are_invalid_argument(fake, method, payload):
    with frontend(fake) as server, grpc.insecure_channel(server.address) as channel:
        wait_for(lambda: health(server.address) == SERVING, "SERVING")
        streaming = method == "GenerateStream"
        call = (channel.unary_stream if streaming else channel.unary_unary)(
            f"/loraserve.v1.LoraServing/{method}", request_serializer=bytes, response_deserializer=bytes)
        error = rpc_error(lambda: list(call(payload, timeout=5)) if streaming else call(payload, timeout=5))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "malformed" in error.details()
        assert fake.submits == []
        with LoraServeClient(server.address, timeout=10) as client:
            assert list(client.generate(input_ids=[1, 2], max_new_tokens=2).token_ids) == [10, 11]


def test_oversized_messages_are_refused_and_serving_goes_on(fake):
    with frontend(fake, max_message_bytes=64 << 10) as server:
        with LoraServeClient(server.address, timeout=10) as client:
            client.wait_until_ready(WAIT_S)
            error = rpc_error(lambda: client.generate(input_ids=[1] * 100_000))
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert fake.submits == []
            assert list(client.generate(input_ids=[1, 2], max_new_tokens=2).token_ids) == [10, 11]


# Shutdown -----------------------------------------------------------------------------------


def test_stop_drains_in_flight_requests_and_refuses_new_ones(fake):
    fake.script, fake.token_interval_s = list(range(20, 40)), 0.05  # one second of tokens
    server = BackgroundFrontend(FrontendConfig(port=0), fake.address)
    client = LoraServeClient(server.address, timeout=30)
    try:
        client.wait_until_ready(WAIT_S)
        stream = client.generate_stream(input_ids=[1, 2], max_new_tokens=20)
        first = next(stream)
        fake.silent = True  # holds the stream in flight until the refusals are checked, however slow they are
        stopping = asyncio.run_coroutine_threadsafe(server.server.stop(grace_s=30), server._loop)
        wait_for(lambda: health(server.address) == NOT_SERVING, "NOT_SERVING while draining")
        for call in (lambda: client.generate(input_ids=[1, 2]), client.stats):
            error = rpc_error(call)
            assert error.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in error.details()
        fake.silent = False
        rest = list(stream)
        assert list(first.token_ids) + [t for m in rest for t in m.token_ids] == list(range(20, 40))
        assert rest[-1].finish_reason == "length"
        stopping.result(timeout=30)
        assert fake.aborts == []
    finally:
        client.close()
        server._loop.call_soon_threadsafe(server._loop.stop)


def test_the_grace_period_ends_every_api_request_properly(fake, tokenizer_dir):  # noqa: F811
    """Requests still running when the grace period ends get UNAVAILABLE ("shutting down") on every API:
    a gRPC status, an HTTP 503 body, and on an HTTP stream an error event then [DONE]; the frontend
    stops within the grace period and a bounded moment for those ends."""
    fake.script, fake.token_interval_s = [40] * 60, 0.2  # twelve seconds of tokens
    server = BackgroundFrontend(FrontendConfig(port=0, http_port=0, tokenizer_path=str(tokenizer_dir)),
                                fake.address)
    client = LoraServeClient(server.address, timeout=30)
    completions = f"http://127.0.0.1:{server.server.http_port}/v1/completions"
    try:
        client.wait_until_ready(WAIT_S)
        stream = client.generate_stream(input_ids=[1, 2], max_new_tokens=60, request_id="long")
        next(stream)
        with ThreadPoolExecutor(max_workers=3) as pool:
            unary = pool.submit(rpc_error, lambda: client.generate(input_ids=[1, 2], max_new_tokens=60))
            plain = pool.submit(http_post, completions, {"prompt": [1, 2], "max_tokens": 60})
            events = pool.submit(http_post, completions, {"prompt": [1, 2], "max_tokens": 60, "stream": True})
            wait_for(lambda: len(fake.submits) == 4, "every request at the scheduler")
            started = time.monotonic()
            asyncio.run_coroutine_threadsafe(server.server.stop(grace_s=0.5), server._loop).result(timeout=10)
            stopped_after = time.monotonic() - started
            for error in (rpc_error(lambda: list(stream)), unary.result(timeout=10)):
                assert error.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in error.details()
            status, body = plain.result(timeout=10)
            assert status == 503 and "shutting down" in json.loads(body)["error"]["message"]
            status, body = events.result(timeout=10)
            lines = [line for line in body.splitlines() if line.startswith("data: ")]
            assert status == 200 and lines[-1] == "data: [DONE]"
            assert "shutting down" in json.loads(lines[-2].removeprefix("data: "))["error"]["message"]
        assert stopped_after < 0.5 + 3
        wait_for(lambda: "long" in fake.aborts, "the abort of the cut request")
    finally:
        client.close()
        server._loop.call_soon_threadsafe(server._loop.stop)


def http_post(url: str, body: dict[str, Any]) -> tuple[int, str]:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()
