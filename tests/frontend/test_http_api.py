"""The HTTP side of the frontend against the fake scheduler: the authorization hook (given, and
the default one from the gRPC API's bearer tokens), a client that leaves mid-stream, and the
metrics endpoint while the scheduler does not answer."""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Iterator

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from frontend.server import FrontendServer
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
    assert scrape(frontend)["loraserve_scheduler_up[]"] == 1
    fake.ready = False
    samples = scrape(frontend)
    assert samples["loraserve_scheduler_up[]"] == 0
    assert samples["loraserve_requests_total[('adapter', ''), ('outcome', 'length')]"] >= 1
    assert "loraserve_requests_running[]" not in samples
