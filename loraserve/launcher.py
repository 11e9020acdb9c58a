"""Starts the worker, scheduler and frontend as three processes, supervises and stops them.

The processes talk over ipc:// sockets in a private runtime directory (mode 0700: only
this user can open them). A process that dies after start-up is restarted: the worker
alone (the scheduler fails its in-flight requests and re-registers every adapter with the
new one), the scheduler together with the worker (a new scheduler cannot know the old
worker's state; it re-registers the adapters its predecessor served from the registry
file), the frontend alone. More than `max_restarts` restarts of one process within
`restart_window_s`, or a death during start-up, stops everything and exits non-zero.

SIGINT/SIGTERM drain: the frontend is stopped first (NOT_SERVING, new requests
UNAVAILABLE, in-flight ones finish within the grace period), then the scheduler and the
worker; SIGKILL for anything still running after that, leaving no process behind.
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
from collections import deque
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

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
    overlap_schedule: bool = True  # the next step is sent while the worker runs the current one
    pause_tokens_ratio: float | None = None  # slot preemption; None: the scheduler's default
    page_size: int = 16
    num_kv_pages: int = 2048
    host_cache_bytes: int = 4 << 30
    cuda_graphs: bool = True
    mixed_graphs: bool = True
    max_batch_tokens: int = 2048
    max_running_requests: int = 256
    max_queued_requests: int = 1024
    slow_loads: dict[str, float] = field(default_factory=dict)  # test only
    slow_reads: dict[str, float] = field(default_factory=dict)  # test only
    startup_timeout_s: float = 300.0
    grace_seconds: float = 5.0
    log_level: str = "info"
    log_format: str = "logfmt"
    log_file: str | None = None  # the three processes' logs are appended here instead of stderr
    adapter_root: str | None = None  # LoadAdapter accepts only paths inside it
    auth_token_file: str | None = None  # bearer token for every RPC but health
    admin_token_file: str | None = None  # bearer token for LoadAdapter/UnloadAdapter
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None  # mutual TLS
    max_restarts: int = 5  # of one process within restart_window_s, then the launcher gives up
    restart_window_s: float = 600.0


@dataclass(frozen=True)
class Addresses:
    frontend: str  # the scheduler's socket for frontends
    worker: str  # the scheduler's socket for the worker


@dataclass(frozen=True)
class RuntimeFiles:
    ready: str  # the frontend creates it once it first serves
    registry: str  # the scheduler's adapters, for its successor after a crash


def _optional(flag: str, value: str | None) -> list[str]:
    return [flag, value] if value else []


def process_commands(config: ServeConfig, addresses: Addresses, files: RuntimeFiles) -> dict[str, list[str]]:
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
    if not config.mixed_graphs:
        worker.append("--disable-mixed-graphs")
    for name, seconds in config.slow_loads.items():
        worker += ["--slow-load", f"{name}={seconds}"]
    for name, seconds in config.slow_reads.items():
        worker += ["--slow-read", f"{name}={seconds}"]
    scheduler = [*python, "scheduler", "--frontend-address", addresses.frontend,
                 "--worker-address", addresses.worker,
                 "--enable-lora-overlap-loading" if config.overlap_loading else "--disable-lora-overlap-loading",
                 *(["--pipelined-loads"] if config.pipelined_loads else []),
                 *([] if config.overlap_schedule else ["--disable-overlap-schedule"]),
                 *_optional("--pause-tokens-ratio", None if config.pause_tokens_ratio is None
                            else str(config.pause_tokens_ratio)),
                 "--max-batch-tokens", str(config.max_batch_tokens),
                 "--max-running-requests", str(config.max_running_requests),
                 "--max-queued-requests", str(config.max_queued_requests), *logging_flags,
                 "--registry-file", files.registry, *_optional("--adapter-root", config.adapter_root)]
    if config.lora_paths:
        scheduler += ["--lora-paths", *(f"{n}={p}" for n, p in config.lora_paths.items())]
    frontend = [*python, "frontend", "--host", config.host, "--port", str(config.port),
                "--scheduler-address", addresses.frontend,
                "--model-name", config.served_model_name or Path(config.model_path).name,
                "--grace-seconds", str(config.grace_seconds), "--ready-file", files.ready, *logging_flags,
                *_optional("--auth-token-file", config.auth_token_file),
                *_optional("--admin-token-file", config.admin_token_file),
                *_optional("--tls-cert", config.tls_cert), *_optional("--tls-key", config.tls_key),
                *_optional("--tls-client-ca", config.tls_client_ca)]
    for flag, port in (("--http-port", config.http_port), ("--metrics-port", config.metrics_port)):
        if port is not None:
            frontend += [flag, str(port)]
    if config.tokenizer_path:
        frontend += ["--tokenizer", config.tokenizer_path]
    return {"scheduler": scheduler, "worker": worker, "frontend": frontend}


class Launcher:
    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.runtime_dir = Path(tempfile.mkdtemp(prefix="loraserve-"))  # mode 0700
        self.addresses = Addresses(frontend=f"ipc://{self.runtime_dir}/frontend.sock",
                                   worker=f"ipc://{self.runtime_dir}/worker.sock")
        self.files = RuntimeFiles(ready=str(self.runtime_dir / "frontend.ready"),
                                  registry=str(self.runtime_dir / "adapters.json"))
        self.commands = process_commands(config, self.addresses, self.files)
        self.processes: dict[str, subprocess.Popen] = {}
        self.restarts: dict[str, deque[float]] = {name: deque() for name in self.commands}
        self.stopping = False

    @property
    def address(self) -> str:
        return f"{self.config.host}:{self.config.port}"

    def start(self) -> None:
        for name in self.commands:
            self._spawn(name)

    def _spawn(self, name: str) -> None:
        environment = os.environ | {PARENT_PID_VARIABLE: str(os.getpid())}
        # The child keeps its own copy of the log file's descriptor once started.
        with open(self.config.log_file, "a") if self.config.log_file else nullcontext() as log_file:
            self.processes[name] = subprocess.Popen(self.commands[name], env=environment, stderr=log_file)
        log.debug("started %s (pid %d)", name, self.processes[name].pid)

    def wait_until_serving(self) -> None:
        """Until the frontend first reports SERVING (its ready file); a death meanwhile is fatal."""
        deadline = time.monotonic() + self.config.startup_timeout_s
        while time.monotonic() < deadline:
            if self.stopping:
                raise InterruptedError("stopped during start-up")
            self._check_alive()
            if os.path.exists(self.files.ready):
                return
            time.sleep(0.2)
        raise TimeoutError(f"loraserve did not become ready within {self.config.startup_timeout_s} s")

    def supervise(self) -> int:
        """Blocks until a signal (exit 0) or a process that keeps dying (exit 1), then stops everything."""
        try:
            while not self.stopping:
                self.restart_the_dead()
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

    def restart_the_dead(self) -> None:
        """Restarts each process that has exited (the scheduler with the worker); see the module's doc."""
        for name in list(self.processes):
            process = self.processes[name]  # after a scheduler restart, the worker is a new one too
            if process.poll() is None or self.stopping:
                continue
            self._count_restart(name, process.returncode)
            if name == "scheduler":
                self._terminate([self.processes["worker"]])  # its state belongs to the dead scheduler
                self._spawn("scheduler")
                self._spawn("worker")
            else:
                self._spawn(name)

    def _count_restart(self, name: str, returncode: int) -> None:
        now = time.monotonic()
        recent = self.restarts[name]
        while recent and now - recent[0] > self.config.restart_window_s:
            recent.popleft()
        if len(recent) >= self.config.max_restarts:
            raise ChildProcessError(f"the {name} process exited with code {returncode} after {len(recent)} "
                                    f"restarts within {self.config.restart_window_s:g} s: giving up")
        recent.append(now)
        log.warning("the %s process exited with code %d; restarting it", name, returncode)

    def stop(self) -> None:
        """The frontend first, so that its in-flight requests can finish; then the rest."""
        self._terminate([self.processes[name] for name in ("frontend",) if name in self.processes])
        self._terminate(list(self.processes.values()))
        shutil.rmtree(self.runtime_dir, ignore_errors=True)

    def _terminate(self, processes: list[subprocess.Popen]) -> None:
        """SIGTERM, then SIGKILL whatever still runs after the grace period (and 5 s to exit)."""
        for process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.config.grace_seconds + 5
        for process in processes:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


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
