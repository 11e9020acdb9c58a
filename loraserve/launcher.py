"""Starts the frontend and each replica's scheduler and worker as processes, supervises and stops them.

A replica is a scheduler with its worker; `--replicas N` starts N (one per GPU by default when
there are several), each worker on its own GPU, all behind the one frontend, which routes
between them (frontend/replicas.py). The processes talk over ipc:// sockets in a private runtime directory (mode 0700: only
this user can open them). A process that dies after start-up is restarted: the worker
alone (the scheduler fails its in-flight requests and re-registers every adapter with the
new one), the scheduler together with the worker (a new scheduler cannot know the old
worker's state; it re-registers the adapters its predecessor served from the registry
file), the frontend alone. More than `max_restarts` restarts of one process within
`restart_window_s`, or a death during start-up, stops everything and exits non-zero.

SIGINT/SIGTERM drain: the frontend is stopped first (NOT_SERVING, new requests
UNAVAILABLE, in-flight ones finish within the grace period, those left then end with
UNAVAILABLE), then the scheduler, then the worker; SIGKILL for anything still running after
that, leaving no process behind. The children run in a process group of their own, so a
signal to the launcher's group (Ctrl-C in a terminal, `kill -TERM -PGID`) reaches the
launcher alone and it drains in that order instead of every process stopping at once.
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
from dataclasses import dataclass, replace
from pathlib import Path

from settings.config import ServeConfig
from settings.flags import to_argv
from settings.logs import announce
from settings.process import PARENT_PID_VARIABLE

log = logging.getLogger("loraserve.launcher")


@dataclass(frozen=True)
class Replica:
    """One scheduler+worker pair: its processes' names, sockets and runtime files."""

    scheduler: str  # process names: "scheduler" and "worker" for the first, "scheduler-1", ... after
    worker: str
    frontend_address: str  # the scheduler's socket for frontends
    worker_address: str  # the scheduler's socket for the worker
    worker_ready: str  # the worker creates it once its model is loaded
    registry: str  # the scheduler's adapters, for its successor after a crash
    gpu: str | None = None  # CUDA_VISIBLE_DEVICES of its worker (group); None: the launcher's own


def replicas_in(runtime_dir: Path, count: int, gpus: list[str], gpus_per_replica: int = 1) -> list[Replica]:
    """`count` replicas, each worker (a tensor-parallel group: `gpus_per_replica` GPUs) on GPUs of its
    own (round robin if there are fewer) when several."""
    def named(kind: str, index: int) -> str:
        return kind if index == 0 else f"{kind}-{index}"

    return [Replica(scheduler=named("scheduler", i), worker=named("worker", i),
                    frontend_address=f"ipc://{runtime_dir}/{named('frontend', i)}.sock",
                    worker_address=f"ipc://{runtime_dir}/{named('worker', i)}.sock",
                    worker_ready=str(runtime_dir / f"{named('worker', i)}.ready"),
                    registry=str(runtime_dir / f"{named('adapters', i)}.json"),
                    gpu=",".join(gpus[(i * gpus_per_replica + j) % len(gpus)] for j in range(gpus_per_replica))
                    if count > 1 and gpus else None)
            for i in range(count)]


def visible_gpus() -> list[str]:
    """The CUDA devices this process may use (CUDA_VISIBLE_DEVICES, else those nvidia-smi lists)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [device for device in visible.split(",") if device.strip()]
    try:
        listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(index) for index, line in enumerate(listed.splitlines()) if line.startswith("GPU ")]


def replica_count(config: ServeConfig, gpus: list[str]) -> int:
    """--replicas, or one per GPU (per group of --tensor-parallel-size GPUs) when serving on CUDA with several."""
    if config.deployment.replicas is not None:
        return config.deployment.replicas
    groups = len(gpus) // config.engine.tensor_parallel_size
    return groups if config.engine.device != "cpu" and groups > 1 else 1


@dataclass(frozen=True)
class ProcessModules:
    """What `python -m` runs for each process, with any arguments of its own (tests swap in a slow worker)."""

    worker: tuple[str, ...] = ("worker",)
    scheduler: tuple[str, ...] = ("scheduler",)
    frontend: tuple[str, ...] = ("frontend",)


def process_commands(config: ServeConfig, replicas: list[Replica], ready_file: str,
                     modules: ProcessModules = ProcessModules()) -> dict[str, list[str]]:
    """Each process's command line: its addresses and runtime files, then its part of `config` whole."""
    logging_flags = to_argv(config.logging)
    model_name = config.frontend.model_name or Path(config.engine.model_path).name
    flags = {"frontend": [*(word for r in replicas for word in ("--scheduler-address", r.frontend_address)),
                          "--ready-file", ready_file, *to_argv(replace(config.frontend, model_name=model_name))]}
    for replica in replicas:
        flags[replica.scheduler] = ["--frontend-address", replica.frontend_address,
                                    "--worker-address", replica.worker_address,
                                    *to_argv(replace(config.scheduler, registry_file=replica.registry))]
        flags[replica.worker] = ["--scheduler-address", replica.worker_address, "--ready-file", replica.worker_ready,
                                 *to_argv(config.engine)]
    return {name: [sys.executable, "-m", *getattr(modules, name.split("-")[0]), *words, *logging_flags]
            for name, words in flags.items()}


class Launcher:
    def __init__(self, config: ServeConfig, modules: ProcessModules = ProcessModules()) -> None:
        self.config = config
        self.runtime_dir = Path(tempfile.mkdtemp(prefix="loraserve-"))  # mode 0700
        gpus = visible_gpus() if config.engine.device != "cpu" else []
        self.replicas = replicas_in(self.runtime_dir, replica_count(config, gpus), gpus,
                                    config.engine.tensor_parallel_size)
        self.ready_file = str(self.runtime_dir / "frontend.ready")
        self.commands = process_commands(config, self.replicas, self.ready_file, modules)
        self.processes: dict[str, subprocess.Popen] = {}
        self.restarts: dict[str, deque[float]] = {name: deque() for name in self.commands}
        self.stopping = False

    @property
    def address(self) -> str:
        return f"{self.config.frontend.host}:{self.config.frontend.port}"

    def start(self) -> None:
        """Every replica's worker and scheduler; the frontend follows once the models are loaded
        (`wait_until_serving`)."""
        for replica in self.replicas:
            self._spawn(replica.worker)
            self._spawn(replica.scheduler)

    def _spawn(self, name: str) -> None:
        environment = os.environ | {PARENT_PID_VARIABLE: str(os.getpid())}
        gpu = next((r.gpu for r in self.replicas if r.worker == name), None)
        if gpu is not None:
            environment["CUDA_VISIBLE_DEVICES"] = gpu
        # The child keeps its own copy of the log file's descriptor once started.
        log_file_path = self.config.deployment.log_file
        with open(log_file_path, "a") if log_file_path else nullcontext() as log_file:
            self.processes[name] = subprocess.Popen(self.commands[name], env=environment, stderr=log_file,
                                                    process_group=0)
        log.debug("started %s (pid %d)", name, self.processes[name].pid)

    def wait_until_serving(self) -> None:
        """Until every worker has loaded the model, then until the frontend first reports SERVING.

        The frontend starts only then, so that a model that cannot load never has an API announced
        for it. A death meanwhile is fatal.
        """
        deadline = time.monotonic() + self.config.deployment.startup_timeout_s
        for replica in self.replicas:
            self._wait_for_file(replica.worker_ready, deadline)
        self._spawn("frontend")
        self._wait_for_file(self.ready_file, deadline)

    def _wait_for_file(self, path: str, deadline: float) -> None:
        while time.monotonic() < deadline:
            if self.stopping:
                raise InterruptedError("stopped during start-up")
            self._check_alive()
            if os.path.exists(path):
                return
            time.sleep(0.2)
        raise TimeoutError(f"loraserve did not become ready within {self.config.deployment.startup_timeout_s} s")

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
            replica = next((r for r in self.replicas if r.scheduler == name), None)
            if replica is not None:
                self._terminate([self.processes[replica.worker]])  # its state belongs to the dead scheduler
                self._spawn(replica.scheduler)
                self._spawn(replica.worker)
            else:
                self._spawn(name)

    def _count_restart(self, name: str, returncode: int) -> None:
        now = time.monotonic()
        recent = self.restarts[name]
        while recent and now - recent[0] > self.config.deployment.restart_window_s:
            recent.popleft()
        if len(recent) >= self.config.deployment.max_restarts:
            raise ChildProcessError(f"the {name} process exited with code {returncode} after {len(recent)} "
                                    f"restarts within {self.config.deployment.restart_window_s:g} s: giving up")
        recent.append(now)
        log.warning("the %s process exited with code %d; restarting it", name, returncode)

    def stop(self) -> None:
        """The frontend first, so that its in-flight requests can finish; then the schedulers, then the workers.

        A scheduler before its worker: a worker that left first would read to the scheduler as a crash.
        """
        for names in (["frontend"], [r.scheduler for r in self.replicas], [r.worker for r in self.replicas]):
            self._terminate([self.processes[name] for name in names if name in self.processes])
        shutil.rmtree(self.runtime_dir, ignore_errors=True)

    def _terminate(self, processes: list[subprocess.Popen]) -> None:
        """SIGTERM, then SIGKILL whatever still runs after the grace period (and 5 s to exit)."""
        for process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.config.frontend.grace_seconds + 5
        for process in processes:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def serve(config: ServeConfig, modules: ProcessModules = ProcessModules()) -> int:
    launcher = Launcher(config, modules)
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
    announce(log, f"loraserve serving {config.engine.model_path} on {launcher.address}",
             model_path=config.engine.model_path, address=launcher.address)
    return launcher.supervise()
