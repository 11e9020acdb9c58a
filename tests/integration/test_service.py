"""The three-process service over gRPC against the in-process engine and transformers + PEFT."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import grpc
import pytest
import torch

from loraserve.launcher import Launcher
from protos.loraserve.v1 import serving_pb2
from tests.driver import Driver, Request, make_engine, make_resident
from tests.integration.conftest import running_server
from tests.model_factory import AdapterSpec, build_adapter, build_dora_adapter
from tests.oracle import PeftOracle
from tests.slow_worker import slow_worker_modules

TEACHER_FORCED_ATOL = 1e-4
CLEAR_MARGIN = 1e-3  # tokens must be identical wherever the reference's top-two gap exceeds this


def prompt(seed: int, length: int) -> list[int]:
    return torch.randint(4, 250, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


WORKLOAD = [(f"w{i}", adapter, prompt(300 + i, 5 + 3 * i), 6 + i % 4)
            for i, adapter in enumerate(["a0", "", "a1", "a2", "a3", "a0", "a2", "a1"])]


@pytest.fixture(scope="module")
def oracle(service_model, service_adapters) -> PeftOracle:
    return PeftOracle(service_model, service_adapters)


@pytest.fixture(scope="module")
def reference(service_model, service_adapters) -> dict[str, list[int]]:
    """Greedy tokens of each workload request, alone, on the in-process engine, all adapters resident."""
    engine = make_engine(service_model, max_loras_per_batch=len(service_adapters))
    slots = {}
    for slot, (name, path) in enumerate(service_adapters.items()):
        engine.register_adapter(name, path)
        make_resident(engine, name, slot)
        slots[name] = slot
    outputs = {}
    for request_id, adapter, ids, new_tokens in WORKLOAD:
        request = Request(request_id, ids, slots.get(adapter, -1), max_new_tokens=new_tokens)
        Driver(engine).run([request])
        outputs[request_id] = request.generated
    engine.close()
    return outputs


def assert_consistent(oracle, reference_tokens, ids, adapter, generated) -> None:
    """Teacher-forced consistency everywhere; identical to the reference where the margin is clear."""
    oracle.assert_teacher_forced(ids, generated, adapter or None, atol=TEACHER_FORCED_ATOL)
    logits = oracle.logits(ids + reference_tokens, adapter or None)[len(ids) - 1:]
    for position, (ours, theirs) in enumerate(zip(generated, reference_tokens)):
        top2 = logits[position].topk(2).values
        if top2[0] - top2[1] < CLEAR_MARGIN:
            return  # a near-tie may go either way; after it the sequences may differ
        assert ours == theirs, f"token {position}: {ours} != reference {theirs}"
    assert len(generated) == len(reference_tokens)


def generate(client, request_id, adapter, ids, new_tokens, stream: bool) -> list[int]:
    params = dict(input_ids=ids, adapter=adapter, max_new_tokens=new_tokens, ignore_eos=True)
    if stream:
        tokens: list[int] = []
        for message in client.generate_stream(**params):
            tokens.extend(message.token_ids)
            if message.finished:
                assert message.finish_reason == "length"
        return tokens
    response = client.generate(**params)
    assert response.finish_reason == "length" and response.usage.prompt_tokens == len(ids)
    return list(response.token_ids)


def run_workload(client, stream_every: int = 2) -> dict[str, list[int]]:
    with ThreadPoolExecutor(max_workers=len(WORKLOAD)) as pool:
        futures = {rid: pool.submit(generate, client, rid, adapter, ids, n, i % stream_every == 0)
                   for i, (rid, adapter, ids, n) in enumerate(WORKLOAD)}
        return {rid: future.result() for rid, future in futures.items()}


def test_concurrent_mixed_adapters_streamed_and_unary(server, oracle, reference):
    _, client = server
    outputs = run_workload(client)
    for request_id, adapter, ids, _ in WORKLOAD:
        assert_consistent(oracle, reference[request_id], ids, adapter, outputs[request_id])


def test_text_prompts_are_tokenized_and_detokenized(server, oracle):
    _, client = server
    response = client.generate("Hello, world!", adapter="a1", max_new_tokens=5, ignore_eos=True)
    ids = list(client.tokenize("Hello, world!").input_ids)
    oracle.assert_teacher_forced(ids, list(response.token_ids), "a1", atol=TEACHER_FORCED_ATOL)
    assert response.usage.completion_tokens == 5 and isinstance(response.text, str)


@pytest.mark.parametrize("mode", ["overlap-off", "all-resident"])
def test_modes_agree_with_overlap_on(mode, base_config, oracle, reference):
    config = (base_config.replace(overlap_loading=False) if mode == "overlap-off"
              else base_config.replace(max_loras_per_batch=4))
    with running_server(config) as (_, client):
        if mode == "all-resident":
            wait_for(lambda: all(a.state == serving_pb2.ADAPTER_STATE_RESIDENT
                                 for a in client.list_adapters().adapters), "all adapters resident")
        outputs = run_workload(client)
    for request_id, adapter, ids, _ in WORKLOAD:
        assert_consistent(oracle, reference[request_id], ids, adapter, outputs[request_id])


def wait_for(condition, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_slow_load_does_not_hold_back_resident_adapters(base_config, oracle, reference):
    slow_seconds = 3.0
    with running_server(base_config, slow_worker_modules(slow_loads={"a3": slow_seconds})) as (_, client):
        wait_for(lambda: {a.name: a.state for a in client.list_adapters().adapters}["a0"]
                 == serving_pb2.ADAPTER_STATE_RESIDENT, "a0 resident")
        finished_at = {}

        def run(request_id, adapter, ids, n):
            response = client.generate(input_ids=ids, adapter=adapter, max_new_tokens=n, ignore_eos=True)
            finished_at[request_id] = time.monotonic()
            return response

        with ThreadPoolExecutor(max_workers=3) as pool:
            slow = pool.submit(run, *WORKLOAD[4])  # a3
            time.sleep(0.2)
            fast = [pool.submit(run, *WORKLOAD[i]) for i in (0, 1)]  # a0 and the base model
            [f.result() for f in fast]
            slow_response = slow.result()
    assert max(finished_at[WORKLOAD[i][0]] for i in (0, 1)) < finished_at[WORKLOAD[4][0]]
    assert slow_response.timing.adapter_wait_ms >= 0.8 * slow_seconds * 1e3
    assert slow_response.timing.time_to_first_token_ms >= slow_response.timing.adapter_wait_ms
    request_id, adapter, ids, _ = WORKLOAD[4]
    assert_consistent(oracle, reference[request_id], ids, adapter, list(slow_response.token_ids))


@contextmanager
def worker_paused(launcher: Launcher) -> Iterator[None]:
    """Holds the worker (SIGSTOP) so that no request can finish meanwhile, however fast the machine."""
    worker = launcher.processes["worker"]
    os.kill(worker.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(worker.pid, signal.SIGCONT)


def test_cancel_and_deadline_release_pages_and_slots(server):
    launcher, client = server
    for adapter in ("a0", "a1"):  # resident, so that every stream starts at once, with no load first
        client.generate(input_ids=[5, 6, 7], adapter=adapter, max_new_tokens=1)
    idle = client.stats()
    streams = [client.generate_stream(input_ids=prompt(50 + i, 8), adapter=["a0", "a1", ""][i % 3],
                                      max_new_tokens=240, ignore_eos=True) for i in range(6)]
    for stream in streams:
        next(stream)  # generating, and far from its last token
    with worker_paused(launcher):
        for stream in streams:
            stream.cancel()
        with ThreadPoolExecutor(max_workers=4) as pool:  # the deadlines pass while the requests are at the scheduler
            expiring = [pool.submit(client.generate, input_ids=prompt(60 + i, 8), adapter="a0", max_new_tokens=200,
                                    ignore_eos=True, timeout=1.0) for i in range(4)]
            for future in expiring:
                assert future.exception().code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_for(lambda: (lambda s: (s.kv_pages_used, s.slot_references, s.running_requests, s.waiting_requests)
                      == (0, 0, 0, 0))(client.stats()), "resources released")
    after = client.stats()
    assert after.requests_aborted - idle.requests_aborted == 10, "every cancel and expired deadline aborts"
    assert after.requests_finished == idle.requests_finished


def test_load_and_unload_while_requests_run(server, service_model, artifacts, oracle):
    _, client = server
    new_dir = build_adapter(service_model, artifacts / "service-late", AdapterSpec(rank=8, seed=31))
    with ThreadPoolExecutor(max_workers=4) as pool:
        running = [pool.submit(client.generate, input_ids=prompt(70 + i, 6), adapter="a2", max_new_tokens=30,
                               ignore_eos=True) for i in range(3)]
        info = client.load_adapter("late", str(new_dir)).adapter
        assert (info.name, info.rank) == ("late", 8)
        late = client.generate(input_ids=prompt(80, 6), adapter="late", max_new_tokens=4, ignore_eos=True)
        assert len(late.token_ids) == 4
        unload = pool.submit(client.unload_adapter, "a2")  # waits for the running a2 requests
        for i, future in enumerate(running):
            response = future.result()
            oracle.assert_teacher_forced(prompt(70 + i, 6), list(response.token_ids), "a2",
                                         atol=TEACHER_FORCED_ATOL)
        unload.result()
    names = {a.name for a in client.list_adapters().adapters}
    assert "a2" not in names and "late" in names
    with pytest.raises(grpc.RpcError) as error:
        client.generate(input_ids=[5, 6, 7], adapter="a2", max_new_tokens=2)
    assert error.value.code() == grpc.StatusCode.NOT_FOUND
    client.unload_adapter("late")
    client.load_adapter("a2", str(server[0].config.scheduler.initial_adapters["a2"]))


def test_adapter_errors_have_status_codes(server, service_adapters, tmp_path):
    _, client = server
    cases = [
        (lambda: client.generate(input_ids=[5, 6], adapter="missing", max_new_tokens=2), grpc.StatusCode.NOT_FOUND),
        (lambda: client.load_adapter("a0", str(service_adapters["a1"])), grpc.StatusCode.ALREADY_EXISTS),
        (lambda: client.load_adapter("x", str(tmp_path / "nowhere")), grpc.StatusCode.NOT_FOUND),
        (lambda: client.unload_adapter("never-loaded"), grpc.StatusCode.NOT_FOUND),
    ]
    for call, code in cases:
        with pytest.raises(grpc.RpcError) as error:
            call()
        assert error.value.code() == code, error.value.details()
    assert client.generate(input_ids=[5, 6, 7], adapter="a0", max_new_tokens=2).token_ids


def test_server_info_reports_the_configuration(server):
    launcher, client = server
    info = client.server_info()
    assert (info.architecture, info.dtype, info.device) == ("LlamaForCausalLM", "float32", "cpu")
    assert (info.max_loras_per_batch, info.max_loaded_loras, info.overlap_loading) == (2, 4, True)
    assert info.adapter_root == ""  # none configured: LoadAdapter takes any path
    assert all(process.poll() is None for process in launcher.processes.values())


def test_pipelined_load_streams_an_adapter_only_on_disk(base_config, oracle, reference):
    """--pipelined-loads with an adapter that is only on disk and slow to read: the request is
    admitted at once, its forward waits per layer for the read (streamed into the slot), and
    its tokens are right. Three host entries: prefetch leaves a3, the fourth, on disk."""
    slow_seconds = 1.5
    config = base_config.replace(pipelined_loads=True, max_loaded_loras=3)
    with running_server(config, slow_worker_modules(slow_reads={"a3": slow_seconds})) as (_, client):
        wait_for(lambda: {a.name: a.state for a in client.list_adapters().adapters} == {
            "a0": serving_pb2.ADAPTER_STATE_RESIDENT, "a1": serving_pb2.ADAPTER_STATE_RESIDENT,
            "a2": serving_pb2.ADAPTER_STATE_HOST, "a3": serving_pb2.ADAPTER_STATE_ON_DISK}, "prefetch done")
        request_id, adapter, ids, n = WORKLOAD[4]  # a3
        response = client.generate(input_ids=ids, adapter=adapter, max_new_tokens=n, ignore_eos=True)
        states = {a.name: a.state for a in client.list_adapters().adapters}
    assert response.timing.adapter_wait_ms < 0.5 * slow_seconds * 1e3, "admitted before the file was read"
    assert response.timing.time_to_first_token_ms >= 0.8 * slow_seconds * 1e3, "the forward waited for the read"
    assert states["a3"] == serving_pb2.ADAPTER_STATE_RESIDENT
    assert_consistent(oracle, reference[request_id], ids, adapter, list(response.token_ids))


def test_pipelined_load_starts_a_cold_request_on_an_idle_server(base_config, oracle, reference):
    """--pipelined-loads: admitted while its adapter's copy runs; the forward waits per layer."""
    slow_seconds = 1.5
    config = base_config.replace(pipelined_loads=True)
    with running_server(config, slow_worker_modules(slow_loads={"a3": slow_seconds})) as (_, client):
        wait_for(lambda: {a.name: a.state for a in client.list_adapters().adapters}["a0"]
                 == serving_pb2.ADAPTER_STATE_RESIDENT, "a0 resident")
        request_id, adapter, ids, n = WORKLOAD[4]  # a3
        response = client.generate(input_ids=ids, adapter=adapter, max_new_tokens=n, ignore_eos=True)
    assert response.timing.adapter_wait_ms < 0.5 * slow_seconds * 1e3, "admitted before the copy finished"
    assert response.timing.time_to_first_token_ms >= 0.8 * slow_seconds * 1e3, "the forward waited for the copy"
    assert_consistent(oracle, reference[request_id], ids, adapter, list(response.token_ids))


def test_load_adapter_says_what_it_loaded(server, service_model, artifacts):
    _, client = server
    spec = AdapterSpec(rank=8, alpha=16, target_modules=["q_proj", "k_proj", "o_proj"], rank_pattern={"k_proj": 2},
                       alpha_pattern={"o_proj": 4}, seed=33)
    info = client.load_adapter("patterned", str(build_adapter(service_model, artifacts / "service-patterned", spec)))
    adapter = info.adapter
    try:
        assert (adapter.rank, list(adapter.ranks), list(adapter.alphas)) == (8, [2, 8], [4.0, 16.0])
        assert sorted(adapter.target_modules) == ["k_proj", "o_proj", "q_proj"]
        assert adapter.gpu_bytes == adapter.size_bytes > 0 and adapter.host_bytes >= adapter.size_bytes
        [listed] = [a for a in client.list_adapters().adapters if a.name == "patterned"]
        assert (list(listed.ranks), list(listed.alphas), listed.host_bytes) == ([2, 8], [4.0, 16.0], adapter.host_bytes)
    finally:
        client.unload_adapter("patterned")


def test_a_dora_adapter_is_served_and_reported(server, service_model, artifacts):
    _, client = server
    adapter = client.load_adapter("dora", str(build_dora_adapter(service_model, artifacts / "service-dora"))).adapter
    try:
        assert adapter.dora
        reply = client.generate(input_ids=prompt(90, 6), adapter="dora", max_new_tokens=4, ignore_eos=True)
        assert len(reply.token_ids) == 4
        assert not any(a.dora for a in client.list_adapters().adapters if a.name != "dora")
    finally:
        client.unload_adapter("dora")
