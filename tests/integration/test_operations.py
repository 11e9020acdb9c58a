"""What operators and app developers use, against the three real processes: the OpenAI-compatible
HTTP API (through the official `openai` client), Prometheus metrics and request ids in the logs."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from transformers import AutoTokenizer

from loraserve.client import LoraServeClient
from tests.integration.conftest import free_port, running_server

BASE = "service-model"  # the served name of the base model: its directory's name


@pytest.fixture(scope="module")
def ops_server(base_config, tmp_path_factory) -> Iterator[dict]:
    log_file = tmp_path_factory.mktemp("ops-logs") / "loraserve.jsonl"
    config = base_config.replace(http_port=free_port(), metrics_port=free_port(), log_level="debug",
                     log_format="json", log_file=str(log_file))
    with running_server(config) as (launcher, client):
        host = f"http://127.0.0.1:{config.frontend.http_port}"
        yield {
            "grpc": client,
            "openai": openai.OpenAI(base_url=f"{host}/v1", api_key="unused", timeout=60, max_retries=0),
            "http": host,
            "metrics": f"http://127.0.0.1:{config.frontend.metrics_port}/metrics",
            "log_file": log_file,
        }


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


# OpenAI-compatible HTTP API ---------------------------------------------------------------

def test_models_lists_the_base_model_and_every_adapter(ops_server):
    models = {m.id: m for m in ops_server["openai"].models.list().data}
    assert set(models) == {BASE, "a0", "a1", "a2", "a3"}
    assert models["a1"].parent == BASE and models[BASE].parent is None


def test_completion_matches_the_grpc_api(ops_server):
    client, grpc_client = ops_server["openai"], ops_server["grpc"]
    for model, adapter in ((BASE, ""), ("a1", "a1")):
        completion = client.completions.create(model=model, prompt="Hello, world", max_tokens=6, temperature=0,
                                               extra_body={"ignore_eos": True})
        reference = grpc_client.generate("Hello, world", adapter=adapter, max_new_tokens=6, ignore_eos=True)
        choice = completion.choices[0]
        assert choice.text == reference.text and choice.finish_reason == "length"
        assert completion.model == model and completion.object == "text_completion"
        assert completion.usage.completion_tokens == 6
        assert completion.usage.prompt_tokens == reference.usage.prompt_tokens
    batch = client.completions.create(model="a1", prompt=["Hello, world", [5, 6, 7]], max_tokens=6, temperature=0,
                                      extra_body={"ignore_eos": True})
    assert [c.index for c in batch.choices] == [0, 1] and batch.choices[0].text == choice.text
    assert batch.usage.completion_tokens == 12


def test_streamed_completion_adds_up_to_the_unary_one(ops_server):
    client = ops_server["openai"]
    params = dict(model="a2", prompt=[5, 6, 7, 8], max_tokens=8, temperature=0, extra_body={"ignore_eos": True})
    whole = client.completions.create(**params).choices[0].text
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **params))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8


def test_chat_uses_the_tokenizers_chat_template(ops_server, service_model):
    client, grpc_client = ops_server["openai"], ops_server["grpc"]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello?"}]
    tokenizer = AutoTokenizer.from_pretrained(service_model)
    prompt_ids = tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False),
                                  add_special_tokens=False)
    reference = grpc_client.generate(input_ids=prompt_ids, adapter="a0", max_new_tokens=5, ignore_eos=True)
    params = dict(model="a0", messages=messages, max_tokens=5, temperature=0, extra_body={"ignore_eos": True})
    chat = client.chat.completions.create(**params)
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content == reference.text
    assert chat.usage.prompt_tokens == len(prompt_ids)
    stream = list(client.chat.completions.create(stream=True, **params))
    assert stream[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in stream) == reference.text
    assert stream[-1].choices[0].finish_reason == "length"


def test_logprobs_are_the_sampled_tokens(ops_server):
    completion = ops_server["openai"].completions.create(model="a3", prompt="Hi", max_tokens=4, temperature=0,
                                                         logprobs=0, extra_body={"ignore_eos": True})
    logprobs = completion.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == 4
    assert all(lp <= 0 for lp in logprobs.token_logprobs)


def test_errors_are_http_statuses_with_openai_bodies(ops_server):
    client = ops_server["openai"]
    with pytest.raises(openai.NotFoundError) as not_found:
        client.completions.create(model="no-such-adapter", prompt="Hi", max_tokens=2)
    assert not_found.value.body["code"] == "model_not_found" and not_found.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as too_long:
        client.completions.create(model=BASE, prompt="Hi", max_tokens=100_000)
    assert "context" in too_long.value.body["message"] and too_long.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as several:
        client.completions.create(model=BASE, prompt="Hi", n=2)
    assert several.value.body["param"] == "n"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=BASE, messages=[])
    status, body = post_raw(ops_server["http"] + "/v1/completions", b"{not json")
    assert status == 400 and set(body["error"]) == {"message", "type", "param", "code"}


def test_client_request_id_is_echoed(ops_server):
    request_id = f"http-{uuid.uuid4().hex[:8]}"
    raw = ops_server["openai"].completions.with_raw_response.create(
        model=BASE, prompt="Hi", max_tokens=2, extra_headers={"X-Request-Id": request_id})
    assert raw.headers["x-request-id"] == request_id
    assert raw.parse().id == f"cmpl-{request_id}"


def post_raw(url: str, payload: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=payload, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


# Metrics ----------------------------------------------------------------------------------

def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of one scrape."""
    with urllib.request.urlopen(url, timeout=30) as response:
        text = response.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: dict, name: str, **labels: str) -> float:
    """A sample's value; the scheduler's figures also carry their replica's label (this server has one, "0")."""
    of_frontend = (name, tuple(sorted(labels.items())))
    of_replica = (name, tuple(sorted({**labels, "replica": "0"}.items())))
    return samples.get(of_frontend, samples.get(of_replica, 0.0))


def test_metrics_move_as_the_requests_and_loads_say(ops_server):
    url, client = ops_server["metrics"], ops_server["grpc"]
    before = scrape(url)
    assert value(before, "loraserve_scheduler_up") == 1
    assert value(before, "loraserve_adapter_gpu_slots_total") == 2
    assert value(before, "loraserve_kv_pages_total") == 512
    # Four adapters through two slots, one after another: at least two of them must be loaded.
    sent = ["a0", "a1", "a2", "a3", "a0", "a2"]
    usages = [client.generate(input_ids=[9, 10, 11], adapter=a, max_new_tokens=3, ignore_eos=True).usage for a in sent]
    client.generate(input_ids=[9, 10], max_new_tokens=2, ignore_eos=True)
    with pytest.raises(grpc.RpcError):
        client.generate(input_ids=[9], adapter="missing", max_new_tokens=2)
    wait_for(lambda: _loads_settled(scrape(url)), "every started load to finish")
    after = scrape(url)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    for adapter in set(sent):
        assert delta("loraserve_requests_total", adapter=adapter, outcome="length") == sent.count(adapter)
    assert delta("loraserve_requests_total", adapter="", outcome="length") == 1
    assert delta("loraserve_requests_total", adapter="", outcome="not_found") == 1
    assert delta("loraserve_time_to_first_token_seconds_count") == len(sent) + 1
    assert delta("loraserve_e2e_request_latency_seconds_count") == len(sent) + 1
    assert delta("loraserve_request_adapter_wait_seconds_count") == len(sent) + 1
    assert delta("loraserve_generation_tokens_total") == sum(u.completion_tokens for u in usages) + 2
    assert delta("loraserve_prompt_tokens_total") == 3 * len(sent) + 2
    gpu_hits, gpu_misses = (delta(f"loraserve_adapter_cache_{k}_total", tier="gpu") for k in ("hits", "misses"))
    assert gpu_hits + gpu_misses == len(sent)
    assert gpu_misses >= 2
    host_lookups = delta("loraserve_adapter_cache_hits_total", tier="host") + delta(
        "loraserve_adapter_cache_misses_total", tier="host")
    assert host_lookups == gpu_misses
    loads = delta("loraserve_adapter_loads_finished_total", tier="gpu")
    assert loads >= 2 and delta("loraserve_adapter_load_seconds_count", tier="gpu") == loads
    sizes = {a.name: a.size_bytes for a in client.list_adapters().adapters}
    assert delta("loraserve_adapter_loaded_bytes_total", tier="gpu") >= loads * min(sizes.values())
    assert delta("loraserve_forward_steps_total") >= sum(u.completion_tokens for u in usages)
    assert delta("loraserve_worker_forward_seconds_count") == delta("loraserve_forward_steps_total")
    assert ("loraserve_requests_paused_total", (("replica", "0"),)) in after, "slot preemption's counter is exported"
    assert value(after, "loraserve_adapter_gpu_slots_used") == 2
    assert value(after, "loraserve_adapter_host_cache_used_bytes") >= sum(sizes.values())


def _loads_settled(samples: dict) -> bool:
    return all(value(samples, "loraserve_adapter_loads_started_total", tier=t)
               == value(samples, "loraserve_adapter_loads_finished_total", tier=t) for t in ("host", "gpu"))


def test_running_requests_and_kv_pages_show_during_a_run(ops_server):
    url, client = ops_server["metrics"], ops_server["grpc"]
    assert value(scrape(url), "loraserve_requests_running") == 0
    finished = threading.Event()

    def long_request() -> None:
        for _ in client.generate_stream(input_ids=[7] * 20, adapter="a1", max_new_tokens=200, ignore_eos=True):
            pass
        finished.set()

    thread = threading.Thread(target=long_request)
    thread.start()
    during = None
    try:
        deadline = time.monotonic() + 60
        while during is None and not finished.is_set() and time.monotonic() < deadline:
            samples = scrape(url)
            if value(samples, "loraserve_requests_running") >= 1:
                during = samples
    finally:
        thread.join(timeout=120)
    assert during is not None, "no scrape saw the request running"
    assert value(during, "loraserve_requests_running") == 1
    assert value(during, "loraserve_kv_pages_used") == 220 // 4  # prompt + max_new_tokens, 4-token pages
    assert value(during, "loraserve_adapter_gpu_slot_references") == 1
    after = scrape(url)
    assert value(after, "loraserve_requests_running") == 0 and value(after, "loraserve_kv_pages_used") == 0


# Logs -------------------------------------------------------------------------------------

def test_a_client_request_id_is_in_every_process_log(ops_server):
    grpc_id, http_id = f"grpc-{uuid.uuid4().hex[:8]}", f"http-{uuid.uuid4().hex[:8]}"
    channel_client: LoraServeClient = ops_server["grpc"]
    channel_client._stub.Generate(  # metadata, as any gRPC client would send it
        _request([3, 4, 5], "a2"), metadata=[("x-request-id", grpc_id)], timeout=60)
    ops_server["openai"].completions.create(model="a0", prompt="Hi", max_tokens=2,
                                            extra_headers={"X-Request-Id": http_id})
    for request_id in (grpc_id, http_id):
        wait_for(lambda: _processes_logging(ops_server["log_file"], request_id) == {"frontend", "scheduler", "worker"},
                 f"log lines of {request_id} from all three processes")
    finished = [r for r in _records(ops_server["log_file"]) if r.get("request_id") == grpc_id
                and r["msg"] == "request finished" and r["process"] == "frontend"]
    assert finished[0]["outcome"] == "stop" or finished[0]["outcome"] == "length"
    assert finished[0]["adapter"] == "a2" and finished[0]["level"] == "info"


def _request(input_ids: list[int], adapter: str):
    from protos.loraserve.v1 import serving_pb2

    return serving_pb2.GenerateRequest(input_ids=input_ids, adapter=adapter,
                                       sampling=serving_pb2.SamplingParams(max_new_tokens=3))


def _records(log_file: Path) -> list[dict]:
    """The complete records: the processes may be writing the last line while it is read."""
    text = log_file.read_text()
    records = []
    for line in text[:text.rfind("\n") + 1].splitlines():
        if line.startswith("{"):
            records.append(json.loads(line))
    return records


def _processes_logging(log_file: Path, request_id: str) -> set[str]:
    return {r["process"] for r in _records(log_file)
            if r.get("request_id") == request_id or request_id in r.get("request_ids", [])}
