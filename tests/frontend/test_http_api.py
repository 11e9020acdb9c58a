"""The HTTP side of the frontend against the fake scheduler: the authorization hook (given, and
the default one from the gRPC API's bearer tokens), refusals in OpenAI's field names,
`Retry-After` on 429, `/health` and `/version`, the adapter root, a client that leaves mid-stream, and the
metrics endpoint while the scheduler does not answer."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from importlib.metadata import version

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from frontend.server import FrontendServer
from loraserve.client import LoraServeClient
from settings.config import FrontendConfig
from tests.frontend.fake_scheduler import FakeScheduler
from tests.frontend.test_frontend_service import BackgroundFrontend, tokenizer_dir, wait_for  # noqa: F401 (fixture)

TOKEN = "s3cret"


def authorize(header: str | None) -> str | None:
    return None if header == f"Bearer {TOKEN}" else "a valid bearer token is required"


class AuthorizedFrontend(BackgroundFrontend):
    @staticmethod
    async def _create(config: FrontendConfig, scheduler_address: str) -> FrontendServer:
        return FrontendServer(config, scheduler_address, authorize=authorize)


@pytest.fixture(scope="module")
def fake(tmp_path_factory) -> Iterator[FakeScheduler]:
    with FakeScheduler(f"ipc://{tmp_path_factory.mktemp('http-ipc')}/scheduler.sock") as scheduler:
        yield scheduler


@pytest.fixture(scope="module")
def frontend(fake, tokenizer_dir) -> Iterator[FrontendServer]:  # noqa: F811
    background = AuthorizedFrontend(FrontendConfig(port=0, http_port=0, metrics_port=0,
                                                   tokenizer_path=str(tokenizer_dir), model_name="fake-model"),
                                    fake.address)
    try:
        wait_for(lambda: background.server._service.server_info is not None, "the frontend to be ready")
        yield background.server
    finally:
        background.stop()


@pytest.fixture
def api(frontend, fake) -> openai.OpenAI:
    fake.reset()
    return openai.OpenAI(base_url=f"http://127.0.0.1:{frontend.http_port}/v1", api_key=TOKEN, max_retries=0,
                         timeout=10)


def scrape(frontend: FrontendServer) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{frontend.metrics_port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {f"{s.name}{sorted(s.labels.items())}": s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_the_authorization_hook_guards_every_endpoint(api, frontend):
    assert [m.id for m in api.models.list()] == ["fake-model"]
    refused = openai.OpenAI(base_url=api.base_url, api_key="wrong", max_retries=0, timeout=10)
    with pytest.raises(openai.AuthenticationError) as error:
        refused.completions.create(model="fake-model", prompt="Hi", max_tokens=2)
    assert error.value.body["message"] == "a valid bearer token is required"
    with pytest.raises(urllib.error.HTTPError) as no_header:
        urllib.request.urlopen(f"http://127.0.0.1:{frontend.http_port}/v1/models", timeout=10)
    assert no_header.value.code == 401


def http_status(url: str, token: str | None) -> int:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def test_the_grpc_bearer_tokens_guard_the_http_api_by_default(fake, tokenizer_dir, tmp_path):  # noqa: F811
    (tmp_path / "api").write_text("api-token\n")
    (tmp_path / "admin").write_text("admin-token\n")
    background = BackgroundFrontend(FrontendConfig(port=0, http_port=0, metrics_port=0,
                                                   tokenizer_path=str(tokenizer_dir), model_name="fake-model",
                                                   auth_token_file=str(tmp_path / "api"),
                                                   admin_token_file=str(tmp_path / "admin")),
                                    fake.address)
    try:
        wait_for(lambda: background.server._service.server_info is not None, "the frontend to be ready")
        models = f"http://127.0.0.1:{background.server.http_port}/v1/models"
        assert [http_status(models, token) for token in (None, "wrong", "api-token", "admin-token")] == [
            401, 401, 200, 200]
        metrics = f"http://127.0.0.1:{background.server.metrics_port}/metrics"
        assert http_status(metrics, None) == 200  # scrapers need no token
    finally:
        background.stop()


GRPC_ONLY_NAMES = ("max_new_tokens", "input_ids", "send text")
TOO_MANY = 100  # new tokens beyond the fake model's context of 64


def completion(api: openai.OpenAI, **params) -> Callable[[], object]:
    return lambda: api.completions.create(model="fake-model", **({"prompt": "Hi"} | params))


def chat(api: openai.OpenAI, **params) -> Callable[[], object]:
    return lambda: api.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": "Hi"}],
                                               **params)


REFUSALS = {  # call -> (the error's `param`, what its message says)
    "max_tokens beyond the context": (lambda api: completion(api, max_tokens=TOO_MANY),
                                      "max_tokens", f"`max_tokens` {TOO_MANY} exceeds"),
    "prompt plus max_tokens": (lambda api: completion(api, prompt=[5] * 60, max_tokens=10),
                               "max_tokens", "plus `max_tokens` 10 exceed"),
    "empty prompt": (lambda api: completion(api, prompt=""), "prompt", "send `prompt` as text or"),
    "prompt as long as the context": (lambda api: completion(api, prompt=[5] * 64), "prompt", "64 tokens"),
    "token id beyond the vocabulary": (lambda api: completion(api, prompt=[5, 300]), "prompt", "token id 300"),
    "temperature": (lambda api: completion(api, temperature=-1), "temperature", "`temperature` must be"),
    "top_p": (lambda api: completion(api, top_p=0), "top_p", "`top_p` must be in (0, 1]"),
    "top_k": (lambda api: completion(api, extra_body={"top_k": 0}), "top_k", "`top_k` must be"),
    "empty stop string": (lambda api: completion(api, stop=["a", ""]), "stop", "`stop` strings must not be empty"),
    "chat max_tokens": (lambda api: chat(api, max_tokens=TOO_MANY), "max_tokens", "`max_tokens`"),
    "chat max_completion_tokens": (lambda api: chat(api, max_completion_tokens=TOO_MANY),
                                   "max_completion_tokens", "`max_completion_tokens`"),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_refusals_name_the_openai_fields(api, case):
    call, param, message = REFUSALS[case]
    with pytest.raises(openai.BadRequestError) as refused:
        call(api)()
    body = refused.value.body
    assert body["param"] == param and message in body["message"], body
    assert not any(name in body["message"] for name in GRPC_ONLY_NAMES), body


def test_without_a_tokenizer_refusals_say_how_to_send_token_ids(fake):
    fake.reset()
    background = BackgroundFrontend(FrontendConfig(port=0, http_port=0, model_name="fake-model"), fake.address)
    try:
        wait_for(lambda: background.server._service.server_info is not None, "the frontend to be ready")
        api = openai.OpenAI(base_url=f"http://127.0.0.1:{background.server.http_port}/v1", api_key="unused",
                            max_retries=0, timeout=10)
        for call, param, message in ((completion(api), "prompt", "send `prompt` as token ids"),
                                     (chat(api), "messages", "send token ids to /v1/completions")):
            with pytest.raises(openai.BadRequestError) as refused:
                call()
            assert (refused.value.body["param"], refused.value.body["message"]) == (
                param, f"this server has no tokenizer; {message}")
        assert api.completions.create(model="fake-model", prompt=[1, 2], max_tokens=3).choices[0].text == ""
    finally:
        background.stop()


@pytest.mark.parametrize("stream", [False, True])
def test_every_429_says_when_to_retry(api, fake, stream):
    fake.queue_full = True
    with pytest.raises(openai.RateLimitError) as full:
        api.completions.create(model="fake-model", prompt="Hi", max_tokens=2, stream=stream)
    assert full.value.response.headers["Retry-After"] == "1"
    assert "queue is full" in full.value.body["message"]


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def test_health_and_version_need_no_token(frontend):
    host = f"http://127.0.0.1:{frontend.http_port}"
    assert get(f"{host}/health") == (200, b"")
    status, body = get(f"{host}/version")
    assert status == 200 and json.loads(body) == {"version": version("loraserve")}
    assert get(f"{host}/v1/models")[0] == 401


def test_health_is_503_until_the_scheduler_answers_and_while_draining(tmp_path, tokenizer_dir):  # noqa: F811
    own_fake = FakeScheduler(f"ipc://{tmp_path}/scheduler.sock")
    own_fake.ready = False
    with own_fake:
        background = BackgroundFrontend(FrontendConfig(port=0, http_port=0, tokenizer_path=str(tokenizer_dir),
                                                       readiness_retry_s=0.05), own_fake.address)
        host = f"http://127.0.0.1:{background.server.http_port}"
        try:
            status, body = get(f"{host}/health")
            assert status == 503 and "not ready" in json.loads(body)["error"]["message"]
            own_fake.ready = True
            wait_for(lambda: get(f"{host}/health")[0] == 200, "/health to turn 200")
            background.server._service.draining = True
            status, body = get(f"{host}/health")
            assert status == 503 and "shutting down" in json.loads(body)["error"]["message"]
        finally:
            background.server._service.draining = False
            background.stop()


def test_the_adapter_root_is_in_server_info_and_the_base_model_card(tmp_path):
    with FakeScheduler(f"ipc://{tmp_path}/scheduler.sock") as own_fake:
        own_fake.info.adapter_root = "/srv/adapters"
        background = BackgroundFrontend(FrontendConfig(port=0, http_port=0), own_fake.address)
        try:
            with LoraServeClient(background.address, timeout=10) as client:
                client.wait_until_ready(10)
                assert client.server_info().adapter_root == "/srv/adapters"
            models = json.loads(get(f"http://127.0.0.1:{background.server.http_port}/v1/models")[1])["data"]
            assert models[0]["adapter_root"] == "/srv/adapters"
        finally:
            background.stop()


def test_a_client_that_leaves_mid_stream_aborts_its_request(api, frontend, fake):
    fake.script = list(range(10, 60))
    fake.token_interval_s = 0.05
    before = scrape(frontend)
    stream = api.completions.create(model="fake-model", prompt="Hi", max_tokens=50, stream=True,
                                    extra_headers={"X-Request-Id": "leaver"})
    next(iter(stream))
    stream.close()
    wait_for(lambda: "leaver" in fake.aborts, "the abort of the abandoned request")
    key = "loraserve_requests_total[('adapter', ''), ('outcome', 'cancelled')]"
    wait_for(lambda: scrape(frontend).get(key, 0) == before.get(key, 0) + 1, "the request counted as cancelled")


def test_scrapes_go_on_while_the_scheduler_does_not_answer(api, frontend, fake):
    api.completions.create(model="fake-model", prompt="Hi", max_tokens=2)
    assert scrape(frontend)["loraserve_scheduler_up[('replica', '0')]"] == 1
    fake.ready = False
    samples = scrape(frontend)
    assert samples["loraserve_scheduler_up[('replica', '0')]"] == 0
    assert samples["loraserve_requests_total[('adapter', ''), ('outcome', 'length')]"] >= 1
    assert "loraserve_requests_running[('replica', '0')]" not in samples
