"""Bad adapters, escaping paths, malformed internal messages and fuzzed requests against the
three real processes: each is refused with its status code, never INTERNAL, and the server
goes on answering a known request correctly."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import zmq
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from loraserve.client import LoraServeClient
from loraserve.launcher import Launcher
from protos.loraserve.v1 import internal_pb2 as pb
from protos.loraserve.v1 import serving_pb2
from tests import model_factory as factory
from tests.integration.conftest import running_server
from tests.integration.test_service import (  # noqa: F401 - fixtures
    WORKLOAD,
    assert_consistent,
    oracle,
    reference,
)

INITIAL = ("a0", "a1", "a2", "a3")
BAD_ADAPTERS = {  # directory -> (builder, expected code)
    "pickle-only": (factory.build_pickle_only_adapter, grpc.StatusCode.INVALID_ARGUMENT),
    "truncated": (factory.build_truncated_adapter, grpc.StatusCode.INVALID_ARGUMENT),
    "corrupt": (factory.build_corrupt_adapter, grpc.StatusCode.INVALID_ARGUMENT),
    "resized-vocab": (factory.build_resized_vocab_adapter, grpc.StatusCode.INVALID_ARGUMENT),
    "modules-to-save": (factory.build_modules_to_save_adapter, grpc.StatusCode.INVALID_ARGUMENT),
    "other-base": (factory.build_adapter_for_other_base, grpc.StatusCode.INVALID_ARGUMENT),
    "rank-too-high": (lambda model, out: factory.build_high_rank_adapter(model, out, rank=32),
                      grpc.StatusCode.INVALID_ARGUMENT),
}
REFUSALS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.ALREADY_EXISTS,
            grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.FAILED_PRECONDITION,
            grpc.StatusCode.RESOURCE_EXHAUSTED}


@pytest.fixture(scope="module")
def adapter_root(artifacts, service_model) -> Path:
    root = artifacts / "adapter-root"
    factory.build_adapter(service_model, root / "good", factory.AdapterSpec(rank=8, seed=51))
    for name, (build, _) in BAD_ADAPTERS.items():
        build(service_model, root / name)
    (root / "not-peft").mkdir()
    (root / "outside").mkdir(exist_ok=True)
    outside = artifacts / "outside-root"
    if not outside.exists():
        shutil.copytree(root / "good", outside)
        (root / "escape").symlink_to(outside)
    return root


@pytest.fixture(scope="module")
def hostile_server(base_config, adapter_root) -> Iterator[tuple[Launcher, LoraServeClient]]:
    with running_server(base_config.replace(adapter_root=str(adapter_root))) as pair:
        yield pair


def code_of(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as error:
        call()
    return error.value.code()


def assert_still_correct(launcher: Launcher, client: LoraServeClient, oracle, reference, pids: dict) -> None:  # noqa: F811
    request_id, adapter, ids, new_tokens = WORKLOAD[2]
    response = client.generate(input_ids=ids, adapter=adapter, max_new_tokens=new_tokens, ignore_eos=True)
    assert_consistent(oracle, reference[request_id], ids, adapter, list(response.token_ids))
    assert {name: p.pid for name, p in launcher.processes.items()} == pids, "no process died or was restarted"
    assert all(p.poll() is None for p in launcher.processes.values())
    assert {a.name for a in client.list_adapters().adapters} == set(INITIAL)


def pids_of(launcher: Launcher) -> dict[str, int]:
    return {name: p.pid for name, p in launcher.processes.items()}


def test_bad_adapters_are_refused_with_their_codes(hostile_server, adapter_root, oracle, reference):  # noqa: F811
    launcher, client = hostile_server
    pids = pids_of(launcher)
    for name, (_, expected) in BAD_ADAPTERS.items():
        assert code_of(lambda: client.load_adapter(name, str(adapter_root / name))) == expected, name
    assert code_of(lambda: client.load_adapter("missing", str(adapter_root / "nowhere"))) == grpc.StatusCode.NOT_FOUND
    assert code_of(lambda: client.load_adapter("np", str(adapter_root / "not-peft"))) == grpc.StatusCode.NOT_FOUND
    assert code_of(lambda: client.load_adapter("a0", str(adapter_root / "good"))) == grpc.StatusCode.ALREADY_EXISTS
    assert code_of(lambda: client.generate(input_ids=[5, 6], adapter="unknown")) == grpc.StatusCode.NOT_FOUND
    assert_still_correct(launcher, client, oracle, reference, pids)


def test_the_adapter_root_confines_load_paths_and_is_reported(hostile_server, adapter_root, service_adapters):
    launcher, client = hostile_server
    assert client.server_info().adapter_root == str(adapter_root.resolve())
    escaping = [str(service_adapters["a0"]), f"{adapter_root}/good/../good", "../outside-root", "escape",
                str(adapter_root / "escape"), "/etc"]
    for path in escaping:
        assert code_of(lambda: client.load_adapter("x", path)) == grpc.StatusCode.PERMISSION_DENIED, path
    info = client.load_adapter("inside", "good").adapter
    assert info.path == str((adapter_root / "good").resolve())
    assert len(client.generate(input_ids=[5, 6, 7], adapter="inside", max_new_tokens=2).token_ids) == 2
    client.unload_adapter("inside")


def test_malformed_internal_messages_are_dropped(hostile_server, oracle, reference):  # noqa: F811
    launcher, client = hostile_server
    pids = pids_of(launcher)
    context = zmq.Context()
    garbage = [[b"\xff\xff\xff"], [b""], [b"a", b"b", b"c"], [pb.FrontendMessage().SerializeToString()],
               [os.urandom(4096)]]
    try:
        for address in (launcher.replicas[0].frontend_address, launcher.replicas[0].worker_address):
            peer = context.socket(zmq.DEALER)
            peer.setsockopt(zmq.LINGER, 0)
            peer.connect(address)
            for frames in garbage:
                peer.send_multipart(frames)
            # A result from a peer that is not the worker the scheduler knows is ignored.
            peer.send(pb.WorkerEvent(result=pb.CommandResult(command_id=1)).SerializeToString())
            peer.close()
    finally:
        context.term()
    assert_still_correct(launcher, client, oracle, reference, pids)


# Fuzzing ------------------------------------------------------------------------------------

UINT32 = st.integers(0, 2**32 - 1)
FLOATS = st.floats(width=32)
sampling_params = st.builds(
    serving_pb2.SamplingParams,
    max_new_tokens=st.none() | st.integers(0, 4) | st.integers(250, 2**32 - 1),
    temperature=st.none() | st.floats(0, 2) | FLOATS, top_p=st.none() | st.floats(0.01, 1) | FLOATS,
    top_k=st.none() | st.integers(-1, 50) | st.integers(-2**31, 2**31 - 1),
    seed=st.none() | st.integers(0, 2**64 - 1), stop=st.lists(st.text(max_size=4), max_size=3),
    stop_token_ids=st.lists(UINT32, max_size=3), ignore_eos=st.booleans(), logprobs=st.booleans(),
)
TEXTS = st.text(max_size=40)
IDS = st.lists(st.integers(0, 255) | st.integers(0, 300) | UINT32, max_size=300)
prompts = st.one_of(  # (text, input_ids): mostly one of the two, as a client sends
    st.tuples(TEXTS, st.just([])), st.tuples(st.just(""), IDS), st.tuples(TEXTS, IDS))
generate_requests = st.builds(
    lambda prompt, **fields: serving_pb2.GenerateRequest(text=prompt[0], input_ids=prompt[1], **fields),
    prompt=prompts, request_id=st.text(max_size=12),
    adapter=st.sampled_from(["", "a0", "a3", "missing"]) | st.text(max_size=10), sampling=sampling_params,
)
adapter_calls = st.tuples(
    st.sampled_from(["load", "unload", "list"]),
    st.sampled_from(["fz", "a0", ""]) | st.text(max_size=20),
    st.sampled_from(["good", "corrupt", "pickle-only", "escape", "../x", "/etc", "", "rank-too-high"])
    | st.text(max_size=30),
)


@settings(max_examples=150, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(request=generate_requests, stream=st.booleans())
def test_fuzzed_generate_requests_are_answered_or_refused(hostile_server, request, stream):
    _, client = hostile_server
    stub = client._stub
    try:
        if stream:
            messages = list(stub.GenerateStream(request, timeout=60))
            finish = messages[-1]
            tokens = [t for m in messages for t in m.token_ids]
        else:
            finish = stub.Generate(request, timeout=60)
            tokens = list(finish.token_ids)
    except grpc.RpcError as error:
        assert error.code() in REFUSALS, f"{error.code()}: {error.details()}"
        return
    event("generated")
    assert finish.finish_reason in ("stop", "length")
    if request.sampling.HasField("max_new_tokens"):
        assert len(tokens) <= request.sampling.max_new_tokens


@settings(max_examples=100, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(payload=st.binary(max_size=200), method=st.sampled_from(["Generate", "LoadAdapter", "UnloadAdapter"]))
def test_fuzzed_bytes_are_answered_or_refused(hostile_server, payload, method):
    launcher, _ = hostile_server
    with grpc.insecure_channel(launcher.address) as channel:
        call = channel.unary_unary(f"/loraserve.v1.LoraServing/{method}", request_serializer=bytes,
                                   response_deserializer=bytes)
        try:
            call(payload, timeout=60)
        except grpc.RpcError as error:
            assert error.code() in REFUSALS, f"{error.code()}: {error.details()}"
        if method == "UnloadAdapter":
            return
    # Bytes that happen to parse as a load of a real adapter leave it loaded: put the server back.
    _, client = hostile_server
    for adapter in client.list_adapters().adapters:
        if adapter.name not in INITIAL:
            client.unload_adapter(adapter.name)


@settings(max_examples=60, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(call=adapter_calls)
def test_fuzzed_adapter_rpcs_are_answered_or_refused(hostile_server, call):
    _, client = hostile_server
    kind, name, path = call
    try:
        if kind == "load":
            client.load_adapter(name, path)
            client.unload_adapter(name)  # the server is left as it was
        elif kind == "unload" and name not in INITIAL:
            client.unload_adapter(name)
        else:
            client.list_adapters()
    except grpc.RpcError as error:
        assert error.code() in REFUSALS, f"{error.code()}: {error.details()}"


def test_after_the_fuzzing_the_server_still_answers_correctly(hostile_server, oracle, reference):  # noqa: F811
    launcher, client = hostile_server
    assert_still_correct(launcher, client, oracle, reference, pids_of(launcher))
    stats = client.stats()
    assert (stats.kv_pages_used, stats.slot_references, stats.running_requests, stats.waiting_requests) == (0,) * 4
