"""Servers of three real processes (frontend, scheduler, worker) on 127.0.0.1 for the tests."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from loraserve.client import LoraServeClient
from loraserve.launcher import Launcher, ProcessModules
from settings.config import ServeConfig
from tests.model_factory import AdapterSpec, build_adapter, build_tiny_model

ALL_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SERVICE_ADAPTERS = {
    "a0": AdapterSpec(rank=8, alpha=16, target_modules=["q_proj", "v_proj"], seed=21),
    "a1": AdapterSpec(rank=16, alpha=16, target_modules=ALL_MODULES, seed=22),
    "a2": AdapterSpec(rank=4, alpha=8, target_modules=["o_proj", "down_proj"], use_rslora=True, seed=23),
    "a3": AdapterSpec(rank=12, alpha=24, target_modules=["gate_proj", "up_proj"], seed=24),
}


_ports_given: set[int] = set()


def free_port() -> int:
    """A port free now and not given before in this session: the server binds it only later, so
    two calls in a row (a server's gRPC, HTTP and metrics ports) must not return the same one."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _ports_given:
            _ports_given.add(port)
            return port


@pytest.fixture(scope="session")
def service_model(artifacts) -> Path:
    return build_tiny_model(artifacts / "service-model", "llama3", seed=3)


@pytest.fixture(scope="session")
def service_adapters(artifacts, service_model) -> dict[str, Path]:
    return {name: build_adapter(service_model, artifacts / f"service-{name}", spec)
            for name, spec in SERVICE_ADAPTERS.items()}


@pytest.fixture(scope="session")
def base_config(service_model, service_adapters) -> ServeConfig:
    return ServeConfig.of(
        model_path=str(service_model), tokenizer_path=str(service_model),
        initial_adapters={name: str(path) for name, path in service_adapters.items()},
        device="cpu", dtype="float32", max_loras_per_batch=2, max_loaded_loras=4, max_lora_rank=16,
        page_size=4, num_kv_pages=512, host_cache_bytes=16 << 20, max_batch_tokens=64,
        startup_timeout_s=120, grace_seconds=2, log_level="warning",
    )


@contextmanager
def running_server(config: ServeConfig, modules: ProcessModules = ProcessModules()
                   ) -> Iterator[tuple[Launcher, LoraServeClient]]:
    """`modules`: `tests.slow_worker.slow_worker_modules(...)` as the worker for slow loads or reads."""
    launcher = Launcher(config.replace(port=free_port()), modules)
    launcher.start()
    try:
        launcher.wait_until_serving()
        with LoraServeClient(launcher.address, timeout=60) as client:
            yield launcher, client
    finally:
        launcher.stop()


@pytest.fixture(scope="module")
def server(base_config) -> Iterator[tuple[Launcher, LoraServeClient]]:
    """Overlap on, four adapters through two slots."""
    with running_server(base_config) as pair:
        yield pair
