"""The GenerationService on its own, without either API, against the fake scheduler: its
failures are transport-neutral `ServiceError`s."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from contextlib import aclosing
from typing import TypeVar

import pytest

from frontend.errors import ServiceError, StatusCode
from frontend.generation_service import GenerationService, ServiceSettings
from frontend.metrics import FrontendMetrics
from frontend.replicas import ReplicaSet, ReplicaSettings
from frontend.routing import RoutingConfig
from frontend.scheduler_link import LivenessConfig, SchedulerUnavailable
from protos.loraserve.v1 import serving_pb2
from tests.frontend.fake_scheduler import FakeScheduler

SETTINGS = ServiceSettings(model_name="fake-model", admin_timeout_s=5.0, load_adapter_timeout_s=5.0,
                           stop_ack_timeout_s=1.0, metrics_timeout_s=1.0)
REPLICA_SETTINGS = ReplicaSettings(LivenessConfig(), RoutingConfig(), state_interval_s=0.05,
                                   readiness_probe_timeout_s=1.0, readiness_retry_s=0.02, admin_timeout_s=5.0,
                                   load_adapter_timeout_s=5.0)
T = TypeVar("T")


@pytest.fixture(scope="module")
def fake(tmp_path_factory) -> Iterator[FakeScheduler]:
    with FakeScheduler(f"ipc://{tmp_path_factory.mktemp('service-ipc')}/scheduler.sock") as scheduler:
        yield scheduler


def with_service(fake: FakeScheduler, use: Callable[[GenerationService], Awaitable[T]]) -> T:
    """Runs `use` with a service (no tokenizer) linked to the fake, on an event loop of its own."""

    async def run() -> T:
        replicas = ReplicaSet([fake.address], REPLICA_SETTINGS)
        await replicas.start()
        try:
            return await use(GenerationService(replicas, None, SETTINGS, FrontendMetrics()))
        finally:
            await replicas.close()

    return asyncio.run(run())


async def until_ready(service: GenerationService, timeout_s: float = 5.0) -> serving_pb2.ServerInfo:
    """Asks for the server info until the link has connected (it refuses to send before)."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        try:
            return await service.fetch_server_info()
        except SchedulerUnavailable:
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.01)


async def generate(service: GenerationService, **fields) -> list[serving_pb2.GenerateStreamResponse]:
    async with aclosing(service.generate(serving_pb2.GenerateRequest(**fields))) as chunks:
        return [chunk async for chunk in chunks]


def test_an_unknown_adapter_is_a_not_found_service_error(fake: FakeScheduler):
    async def use(service: GenerationService) -> ServiceError:
        await until_ready(service)
        with pytest.raises(ServiceError) as refused:
            await generate(service, input_ids=[1, 2], adapter="nope")
        return refused.value

    error = with_service(fake, use)
    assert (error.code, error.message) == (StatusCode.NOT_FOUND, "adapter 'nope' is not loaded")


def test_requests_wait_for_server_info_then_stream_with_an_id(fake: FakeScheduler):
    async def use(service: GenerationService) -> tuple[ServiceError, list[serving_pb2.GenerateStreamResponse]]:
        with pytest.raises(ServiceError) as refused:
            await generate(service, input_ids=[1, 2])
        info = await until_ready(service)
        assert info.model == "fake-model" and service.server_info == info
        return refused.value, await generate(service, input_ids=[1, 2])

    not_ready, chunks = with_service(fake, use)
    assert not_ready.code is StatusCode.UNAVAILABLE and "not ready" in not_ready.message
    assert [token for chunk in chunks for token in chunk.token_ids] == fake.script
    assert chunks[-1].finished and chunks[-1].usage.prompt_tokens == 2
    assert len({chunk.request_id for chunk in chunks}) == 1 and chunks[0].request_id


def test_a_text_prompt_without_a_tokenizer_is_an_invalid_argument(fake: FakeScheduler):
    async def use(service: GenerationService) -> ServiceError:
        await until_ready(service)
        with pytest.raises(ServiceError) as refused:
            await generate(service, text="hello")
        return refused.value

    assert with_service(fake, use).code is StatusCode.INVALID_ARGUMENT


def test_while_draining_every_request_is_unavailable(fake: FakeScheduler):
    async def use(service: GenerationService) -> ServiceError:
        await until_ready(service)
        service.draining = True
        with pytest.raises(ServiceError) as refused:
            await generate(service, input_ids=[1, 2])
        return refused.value

    error = with_service(fake, use)
    assert error.code is StatusCode.UNAVAILABLE and "shutting down" in error.message
