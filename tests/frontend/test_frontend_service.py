"""The real frontend (gRPC on 127.0.0.1) against a fake scheduler on an ipc:// socket."""

from __future__ import annotations

import asyncio
import faulthandler
import math
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from transformers import AutoTokenizer

from frontend.server import FrontendServer
from frontend.validation import no_tokenizer
from loraserve.client import LoraServeClient
from loraserve.demo import build_tokenizer
from settings.config import FrontendConfig
from tests.frontend.fake_scheduler import LOGPROB, FakeScheduler

MULTILINGUAL = "héllo wörld 🙂 日本"
SLOW_TOKEN_S = 0.05
SERVICE = "loraserve.v1.LoraServing"
WAIT_S = 30.0  # for conditions that hold at once on a fast machine; generous for a loaded one
T = TypeVar("T")


def wait_for(condition: Callable[[], bool], what: str, timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class BackgroundFrontend:
    """A FrontendServer on an event loop of its own thread, so tests can use the sync client."""

    def __init__(self, config: FrontendConfig, scheduler_address: str) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="frontend", daemon=True)
        self._thread.start()
        self.server = self._run(self._create(config, scheduler_address))
        self.address = f"127.0.0.1:{self._run(self.server.start())}"

    @staticmethod
    async def _create(config: FrontendConfig, scheduler_address: str) -> FrontendServer:
        return FrontendServer(config, scheduler_address)

    def _run(self, coroutine: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout)

    def stop(self) -> None:
        try:
            self._run(self.server.stop(grace_s=0.5))
        except FutureTimeout:
            self._show_where_the_loop_is_stuck()
            raise
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        self._loop.close()

    def _show_where_the_loop_is_stuck(self) -> None:
        """Every thread's stack (a call blocking the loop shows in the frontend thread's) and every
        task's await, in the failed test's captured output."""
        faulthandler.dump_traceback(all_threads=True)
        for task in asyncio.all_tasks(self._loop):
            task.print_stack()


@contextmanager
def running_frontend(scheduler_address: str, **options: Any) -> Iterator[LoraServeClient]:
    frontend = BackgroundFrontend(FrontendConfig(port=0, **options), scheduler_address)
    try:
        with LoraServeClient(frontend.address, timeout=10) as client:
            yield client
    finally:
        frontend.stop()


def health_status(client: LoraServeClient, service: str = "") -> int:
    with grpc.insecure_channel(client.address) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                         timeout=5).status


def rpc_error(call: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as error:
        call()
    return error.value


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("tokenizer")
    build_tokenizer(directory, max_length=64)
    return directory


@pytest.fixture(scope="module")
def hf_tokenizer(tokenizer_dir):
    return AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture(scope="module")
def ipc_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ipc")


@pytest.fixture(scope="module")
def fake(ipc_dir) -> Iterator[FakeScheduler]:
    with FakeScheduler(f"ipc://{ipc_dir}/shared.sock") as scheduler:
        yield scheduler


@pytest.fixture(scope="module")
def shared_frontend(fake, tokenizer_dir) -> Iterator[LoraServeClient]:
    with running_frontend(fake.address, tokenizer_path=str(tokenizer_dir), model_name="fake-model") as client:
        client.wait_until_ready(WAIT_S)
        yield client


@pytest.fixture
def client(shared_frontend, fake) -> LoraServeClient:
    fake.reset()
    return shared_frontend


@pytest.fixture
def own_fake(ipc_dir, request) -> Iterator[FakeScheduler]:
    """A fake of the test's own, not started: the test decides when it runs."""
    scheduler = FakeScheduler(f"ipc://{ipc_dir}/{request.node.name[:40]}.sock")
    yield scheduler
    if scheduler.running:
        scheduler.stop()


# Generation -----------------------------------------------------------------------------


def test_unary_generate_returns_tokens_text_and_resolved_defaults(client, fake, hf_tokenizer):
    fake.script = hf_tokenizer.encode(MULTILINGUAL, add_special_tokens=False)
    response = client.generate("Hi", max_new_tokens=40, logprobs=True, seed=7)
    assert list(response.token_ids) == fake.script
    assert response.text == MULTILINGUAL
    assert response.finish_reason == "stop"
    prompt = list(client.tokenize("Hi").input_ids)
    assert (response.usage.prompt_tokens, response.usage.completion_tokens) == (len(prompt), len(fake.script))
    assert list(response.logprobs) == [LOGPROB] * len(fake.script)
    assert response.timing.queued_ms == 1.0 and len(response.request_id) == 32
    submit = fake.submits[-1]
    assert list(submit.input_ids) == prompt and submit.request_id == response.request_id
    sampling = submit.sampling
    assert (sampling.max_new_tokens, sampling.temperature, sampling.top_p, sampling.top_k) == (40, 0.0, 1.0, -1)
    assert sampling.HasField("seed") and sampling.seed == 7 and sampling.logprobs


def test_stream_emits_only_complete_characters(client, fake, hf_tokenizer):
    fake.script = hf_tokenizer.encode(MULTILINGUAL, add_special_tokens=False)
    messages = list(client.generate_stream(input_ids=[1, 5, 6], request_id="stream-1"))
    assert [t for m in messages for t in m.token_ids] == fake.script
    assert "".join(m.text for m in messages) == MULTILINGUAL
    assert not any("\ufffd" in m.text for m in messages)
    assert any(m.token_ids and not m.text for m in messages), "a split character must be held back"
    assert [m.finished for m in messages] == [False] * (len(messages) - 1) + [True]
    assert messages[-1].finish_reason == "stop" and messages[-1].usage.completion_tokens == len(fake.script)
    assert all(m.request_id == "stream-1" for m in messages)
    sampling = fake.submits[-1].sampling
    assert sampling.max_new_tokens == 64 - 3, "the default is capped to what is left of the context"
    assert not sampling.HasField("seed")


def test_max_new_tokens_finishes_with_length(client, fake):
    fake.script = [20, 21, 22, 23, 24]
    response = client.generate(input_ids=[1, 2], max_new_tokens=3)
    assert list(response.token_ids) == [20, 21, 22] and response.finish_reason == "length"


def test_a_failing_request_does_not_disturb_the_others(client, fake):
    fake.script = [30, 31, 32, 33]
    fake.token_interval_s = 0.01
    with ThreadPoolExecutor(max_workers=6) as pool:
        good = [pool.submit(client.generate, input_ids=[1, i + 2], max_new_tokens=4) for i in range(5)]
        bad = pool.submit(client.generate, input_ids=[1, 2], adapter="missing", max_new_tokens=4)
        assert rpc_error(bad.result).code() == grpc.StatusCode.NOT_FOUND
        assert all(list(f.result().token_ids) == [30, 31, 32, 33] for f in good)


# Validation and errors ------------------------------------------------------------------

INVALID = {
    "no prompt": {},
    "text and ids": {"text": "hi", "input_ids": [1, 2]},
    "id out of vocab": {"input_ids": [1, 256]},
    "prompt fills the context": {"input_ids": [5] * 64},
    "prompt plus new tokens exceed the context": {"input_ids": [5] * 60, "max_new_tokens": 5},
    "zero new tokens": {"input_ids": [1, 2], "max_new_tokens": 0},
    "more new tokens than the context": {"input_ids": [1, 2], "max_new_tokens": 65},
    "negative temperature": {"input_ids": [1, 2], "temperature": -0.5},
    "nan temperature": {"input_ids": [1, 2], "temperature": math.nan},
    "top_p zero": {"input_ids": [1, 2], "top_p": 0.0},
    "top_p above one": {"input_ids": [1, 2], "top_p": 1.5},
    "top_k zero": {"input_ids": [1, 2], "top_k": 0},
    "top_k below -1": {"input_ids": [1, 2], "top_k": -2},
    "empty stop string": {"input_ids": [1, 2], "stop": ["ok", ""]},
}


@pytest.mark.parametrize("case", INVALID)
def test_invalid_requests_are_refused_before_the_scheduler(client, fake, case):
    kwargs = dict(INVALID[case])
    error = rpc_error(lambda: client.generate(kwargs.pop("text", None), **kwargs))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and error.details()
    assert fake.submits == []


def test_scheduler_errors_pass_through_with_their_codes(client, fake):
    assert rpc_error(lambda: client.generate(input_ids=[1], adapter="missing")).code() == grpc.StatusCode.NOT_FOUND
    client.load_adapter("sql", "/adapters/sql")
    already = rpc_error(lambda: client.load_adapter("sql", "/adapters/sql"))
    assert already.code() == grpc.StatusCode.ALREADY_EXISTS and "already loaded" in already.details()
    assert rpc_error(lambda: client.load_adapter("x", "/nowhere")).code() == grpc.StatusCode.NOT_FOUND
    assert rpc_error(lambda: client.unload_adapter("never")).code() == grpc.StatusCode.NOT_FOUND
    fake.queue_full = True
    full = rpc_error(lambda: client.generate(input_ids=[1]))
    assert full.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "queue is full" in full.details()
    assert rpc_error(lambda: list(client.generate_stream(input_ids=[1]))).code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_a_request_id_in_flight_cannot_be_reused(client, fake):
    fake.script, fake.token_interval_s = [40] * 50, SLOW_TOKEN_S
    stream = client.generate_stream(input_ids=[1, 2], request_id="dup", max_new_tokens=50)
    next(stream)
    assert rpc_error(lambda: client.generate(input_ids=[1], request_id="dup")).code() == grpc.StatusCode.ALREADY_EXISTS
    stream.cancel()
    wait_for(lambda: "dup" in fake.aborts, "the abort of dup")


# Admin ----------------------------------------------------------------------------------


def test_admin_rpcs_reach_the_scheduler(client, fake):
    info = client.load_adapter("chat", "/adapters/chat").adapter
    assert (info.name, info.rank, info.slot) == ("chat", 8, -1)
    assert [a.name for a in client.list_adapters().adapters] == ["chat"]
    client.unload_adapter("chat")
    assert list(client.list_adapters().adapters) == []
    server_info = client.server_info()
    assert (server_info.model, server_info.vocab_size, server_info.max_context_length) == ("fake-model", 256, 64)
    assert client.stats().running_requests == 0


def test_tokenize(client, hf_tokenizer):
    response = client.tokenize(MULTILINGUAL)
    assert list(response.input_ids) == hf_tokenizer.encode(MULTILINGUAL)
    assert list(response.tokens) == hf_tokenizer.convert_ids_to_tokens(list(response.input_ids))


# Stop strings, cancellation, deadlines ----------------------------------------------------


def test_stop_string_truncates_the_text_and_aborts_the_request(client, fake, hf_tokenizer):
    fake.script = hf_tokenizer.encode("Hello world. And more", add_special_tokens=False)
    fake.token_interval_s = 0.01
    through_stop = next(k for k in range(len(fake.script) + 1)
                        if "world." in hf_tokenizer.decode(fake.script[:k]))
    response = client.generate(input_ids=[1, 2], request_id="stop-1", stop=["world."], max_new_tokens=30)
    assert response.text == "Hello " and response.finish_reason == "stop"
    assert list(response.token_ids) == fake.script[:through_stop]
    assert response.usage.completion_tokens == through_stop
    assert response.timing.queued_ms == 1.0, "the timing of the scheduler's closing output"
    wait_for(lambda: "stop-1" in fake.aborts, "the abort of stop-1")


def test_streamed_stop_string_never_shows_its_text(client, fake, hf_tokenizer):
    fake.script = hf_tokenizer.encode("one two three four", add_special_tokens=False)
    fake.token_interval_s = 0.01
    messages = list(client.generate_stream(input_ids=[1, 2], request_id="stop-2", stop=["thr", "xyz"],
                                           max_new_tokens=30))
    assert "".join(m.text for m in messages) == "one two "
    assert messages[-1].finished and messages[-1].finish_reason == "stop"
    wait_for(lambda: "stop-2" in fake.aborts, "the abort of stop-2")


def test_cancelled_stream_is_aborted_at_the_scheduler(client, fake):
    fake.script, fake.token_interval_s = [40] * 50, SLOW_TOKEN_S
    stream = client.generate_stream(input_ids=[1, 2], request_id="cancel-1", max_new_tokens=50)
    next(stream)
    stream.cancel()
    wait_for(lambda: "cancel-1" in fake.aborts, "the abort of cancel-1")


def test_expired_deadline_is_aborted_at_the_scheduler(client, fake):
    fake.script, fake.token_interval_s = [40] * 50, SLOW_TOKEN_S
    error = rpc_error(lambda: client.generate(input_ids=[1, 2], request_id="late-1", max_new_tokens=50, timeout=0.3))
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_for(lambda: "late-1" in fake.aborts, "the abort of late-1")


# Health, reflection, availability ---------------------------------------------------------


def test_reflection_lists_the_service(client):
    with grpc.insecure_channel(client.address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        requests = [reflection_pb2.ServerReflectionRequest(list_services=""),
                    reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE)]
        responses = list(stub.ServerReflectionInfo(iter(requests), timeout=5))
    assert SERVICE in {s.name for s in responses[0].list_services_response.service}
    assert responses[1].file_descriptor_response.file_descriptor_proto


def test_health_turns_serving_once_the_scheduler_answers(own_fake):
    with running_frontend(own_fake.address, readiness_retry_s=0.05) as client:
        assert health_status(client) == health_pb2.HealthCheckResponse.NOT_SERVING
        own_fake.ready = False  # answers, but only "starting"
        own_fake.start()
        time.sleep(0.3)
        assert health_status(client, SERVICE) == health_pb2.HealthCheckResponse.NOT_SERVING
        own_fake.ready = True
        client.wait_until_ready(WAIT_S)
        assert health_status(client, SERVICE) == health_pb2.HealthCheckResponse.SERVING
        assert list(client.generate(input_ids=[1, 2], max_new_tokens=2).token_ids) == [10, 11]


def test_unavailable_while_no_scheduler_runs(own_fake, tokenizer_dir):
    with running_frontend(own_fake.address, tokenizer_path=str(tokenizer_dir)) as client:
        for call in (lambda: client.generate(input_ids=[1, 2]), lambda: list(client.generate_stream("hi")),
                     client.stats, client.list_adapters, client.server_info,
                     lambda: client.load_adapter("a", "/adapters/a")):
            error = rpc_error(call)
            assert error.code() == grpc.StatusCode.UNAVAILABLE and "scheduler" in error.details()
        assert list(client.tokenize("hi").input_ids), "the tokenizer needs no scheduler"


def test_silent_scheduler_fails_requests_in_flight(own_fake):
    liveness = dict(liveness_silence_s=0.3, liveness_ping_timeout_s=0.3, liveness_check_interval_s=0.05)
    own_fake.start()
    own_fake.script, own_fake.token_interval_s = [40] * 50, SLOW_TOKEN_S
    with running_frontend(own_fake.address, **liveness) as client:
        client.wait_until_ready(WAIT_S)
        stream = client.generate_stream(input_ids=[1, 2], request_id="hung-1", max_new_tokens=50)
        next(stream)
        own_fake.silent = True
        started = time.monotonic()
        error = rpc_error(lambda: list(stream))
        assert error.code() == grpc.StatusCode.UNAVAILABLE and "stopped answering" in error.details()
        assert time.monotonic() - started < 3
        wait_for(lambda: "hung-1" in own_fake.aborts, "the abort of hung-1")
        own_fake.silent = False
        assert list(client.generate(input_ids=[1, 2], max_new_tokens=2).token_ids) == [40, 40]


def test_scheduler_exit_fails_requests_and_recovers_when_it_returns(own_fake):
    own_fake.start()
    own_fake.script, own_fake.token_interval_s = [40] * 50, SLOW_TOKEN_S
    with running_frontend(own_fake.address, readiness_retry_s=0.05) as client:
        client.wait_until_ready(WAIT_S)
        stream = client.generate_stream(input_ids=[1, 2], max_new_tokens=50)
        next(stream)
        started = time.monotonic()
        own_fake.stop()
        error = rpc_error(lambda: list(stream))
        assert error.code() == grpc.StatusCode.UNAVAILABLE and "lost the connection" in error.details()
        assert time.monotonic() - started < 3, "a dropped connection must not wait for the liveness check"
        wait_for(lambda: not client.is_ready(), "NOT_SERVING")
        with FakeScheduler(own_fake.address):
            client.wait_until_ready(WAIT_S)
            assert list(client.generate(input_ids=[1, 2], max_new_tokens=2).token_ids) == [10, 11]


def test_without_a_tokenizer_prompts_must_be_token_ids(fake):
    fake.reset()
    with running_frontend(fake.address) as client:
        client.wait_until_ready(WAIT_S)
        for call in (lambda: client.generate("hello"), lambda: client.tokenize("hello"),
                     lambda: client.generate(input_ids=[1], stop=["x"])):
            error = rpc_error(call)
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert rpc_error(lambda: client.tokenize("hello")).details() == no_tokenizer().message
        response = client.generate(input_ids=[1, 2], max_new_tokens=3)
        assert list(response.token_ids) == [10, 11, 12] and response.text == ""


def test_python_m_frontend_serves_and_exits_cleanly_on_sigterm(fake):
    fake.reset()
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "frontend", "--host", "127.0.0.1", "--port", str(port), "--scheduler-address",
         fake.address, "--grace-seconds", "1", "--log-level", "warning"],
        stdout=subprocess.PIPE, text=True)
    try:
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.append(process.stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout=30)
        assert len(lines) == 1 and f'msg="frontend listening on 127.0.0.1:{port}" api=grpc port={port}\n' in lines[0]
        with LoraServeClient(f"127.0.0.1:{port}", timeout=10) as client:
            client.wait_until_ready(WAIT_S)
            assert list(client.generate(input_ids=[1, 2], max_new_tokens=2).token_ids) == [10, 11]
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=15) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
