"""Starts the worker, scheduler and frontend as three processes, supervises and stops them.

The processes talk over ipc:// sockets in a private runtime directory. If any process
exits, the others are stopped and the launcher exits non-zero; SIGINT/SIGTERM stop all
three (SIGTERM, then SIGKILL after a grace period), leaving no process behind.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loraserve.flags import PARENT_PID_VARIABLE

log = logging.getLogger("loraserve.launcher")


@dataclass(frozen=True)
class ServeConfig:
    model_path: str
    tokenizer_path: str | None
    lora_paths: dict[str, str] = field(default_factory=dict)
    host: str = "127.0.0.1"
    port: int = 50051
    http_port: int | None = None  # the OpenAI-compatible HTTP API (off when None)
    metrics_port: int | None = None  # Prometheus /metrics (off when None)
    served_model_name: str | None = None  # the base model's name in the APIs (default: the model directory's name)
    device: str = "auto"
    dtype: str = "auto"
    load_format: str = "safetensors"
    max_loras_per_batch: int = 8
    max_loaded_loras: int = 16
    max_lora_rank: int = 64
    overlap_loading: bool = True
    pipelined_loads: bool = False
    page_size: int = 16
    num_kv_pages: int = 2048
    host_cache_bytes: int = 4 << 30
    cuda_graphs: bool = True
    mixed_graphs: bool = False
    max_batch_tokens: int = 2048
    max_running_requests: int = 256
    max_queued_requests: int = 1024
    slow_loads: dict[str, float] = field(default_factory=dict)  # test only
    startup_timeout_s: float = 300.0
    grace_seconds: float = 5.0
    log_level: str = "info"
    log_format: str = "logfmt"
    log_file: str | None = None  # the three processes' logs are appended here instead of stderr


@dataclass(frozen=True)
class Addresses:
    frontend: str  # the scheduler's socket for frontends
    worker: str  # the scheduler's socket for the worker


def process_commands(config: ServeConfig, addresses: Addresses) -> dict[str, list[str]]:
    python = [sys.executable, "-m"]
    logging_flags = ["--log-level", config.log_level, "--log-format", config.log_format]
    worker = [*python, "worker", "--scheduler-address", addresses.worker, "--model-path", config.model_path,
              "--load-format", config.load_format, "--device", config.device, "--dtype", config.dtype,
              "--page-size", str(config.page_size), "--num-kv-pages", str(config.num_kv_pages),
              "--max-loras-per-batch", str(config.max_loras_per_batch),
              "--max-loaded-loras", str(config.max_loaded_loras), "--max-lora-rank", str(config.max_lora_rank),
              "--host-cache-bytes", str(config.host_cache_bytes), *logging_flags]
    if not config.cuda_graphs:
        worker.append("--disable-cuda-graphs")
    if config.mixed_graphs:
        worker.append("--enable-mixed-graphs")
    for name, seconds in config.slow_loads.items():
        worker += ["--slow-load", f"{name}={seconds}"]
    scheduler = [*python, "scheduler", "--frontend-address", addresses.frontend,
                 "--worker-address", addresses.worker,
                 "--enable-lora-overlap-loading" if config.overlap_loading else "--disable-lora-overlap-loading",
                 *(["--pipelined-loads"] if config.pipelined_loads else []),
                 "--max-batch-tokens", str(config.max_batch_tokens),
                 "--max-running-requests", str(config.max_running_requests),
                 "--max-queued-requests", str(config.max_queued_requests), *logging_flags]
    if config.lora_paths:
        scheduler += ["--lora-paths", *(f"{n}={p}" for n, p in config.lora_paths.items())]
    frontend = [*python, "frontend", "--host", config.host, "--port", str(config.port),
                "--scheduler-address", addresses.frontend,
                "--model-name", config.served_model_name or Path(config.model_path).name,
                "--grace-seconds", str(config.grace_seconds), *logging_flags]
    for flag, port in (("--http-port", config.http_port), ("--metrics-port", config.metrics_port)):
        if port is not None:
            frontend += [flag, str(port)]
    if config.tokenizer_path:
        frontend += ["--tokenizer", config.tokenizer_path]
    return {"scheduler": scheduler, "worker": worker, "frontend": frontend}


class Launcher:
    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.runtime_dir = Path(tempfile.mkdtemp(prefix="loraserve-"))
        self.addresses = Addresses(frontend=f"ipc://{self.runtime_dir}/frontend.sock",
                                   worker=f"ipc://{self.runtime_dir}/worker.sock")
        self.processes: dict[str, subprocess.Popen] = {}
        self.stopping = False

    @property
    def address(self) -> str:
        return f"{self.config.host}:{self.config.port}"

    def start(self) -> None:
        with open(self.config.log_file, "a") if self.config.log_file else nullcontext() as log_file:
            for name, command in process_commands(self.config, self.addresses).items():
                environment = os.environ | {PARENT_PID_VARIABLE: str(os.getpid())}
                self.processes[name] = subprocess.Popen(command, env=environment, stderr=log_file)
                log.debug("started %s (pid %d)", name, self.processes[name].pid)

    def wait_until_serving(self) -> None:
        deadline = time.monotonic() + self.config.startup_timeout_s
        with grpc.insecure_channel(self.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                if self.stopping:
                    raise InterruptedError("stopped during start-up")
                self._check_alive()
                if _is_serving(health):
                    return
                time.sleep(0.2)
        raise TimeoutError(f"loraserve did not become ready within {self.config.startup_timeout_s} s")

    def supervise(self) -> int:
        """Blocks until a signal (exit 0) or a child's death (exit 1), then stops everything."""
        try:
            while not self.stopping:
                self._check_alive()
                time.sleep(0.2)
            return 0
        except ChildProcessError as error:
            log.error("%s", error)
            return 1
        finally:
            self.stop()

    def _check_alive(self) -> None:
        for name, process in self.processes.items():
            if process.poll() is not None:
                raise ChildProcessError(f"the {name} process exited with code {process.returncode}")

    def stop(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.config.grace_seconds + 5
        for process in self.processes.values():
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        shutil.rmtree(self.runtime_dir, ignore_errors=True)


def _is_serving(health: health_pb2_grpc.HealthStub) -> bool:
    try:
        status = health.Check(health_pb2.HealthCheckRequest(), timeout=1).status
    except grpc.RpcError:  # not listening yet
        return False
    return status == health_pb2.HealthCheckResponse.SERVING


def serve(config: ServeConfig) -> int:
    launcher = Launcher(config)
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: setattr(launcher, "stopping", True))
    launcher.start()
    try:
        launcher.wait_until_serving()
    except InterruptedError:
        launcher.stop()
        return 0
    except (TimeoutError, ChildProcessError) as error:
        log.error("start-up failed: %s", error)
        launcher.stop()
        return 1
    print(f"loraserve serving {config.model_path} on {launcher.address}", flush=True)
    return launcher.supervise()
