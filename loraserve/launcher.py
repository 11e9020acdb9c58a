"""Starts the worker, scheduler and frontend as three processes, supervises and stops them.

The processes talk over ipc:// sockets in a private runtime directory (mode 0700: only
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
class Addresses:
    frontend: str  # the scheduler's socket for frontends
    worker: str  # the scheduler's socket for the worker


@dataclass(frozen=True)
class RuntimeFiles:
    ready: str  # the frontend creates it once it first serves
    worker_ready: str  # the worker creates it once its model is loaded
    registry: str  # the scheduler's adapters, for its successor after a crash


@dataclass(frozen=True)
class ProcessModules:
    """What `python -m` runs for each process, with any arguments of its own (tests swap in a slow worker)."""

    worker: tuple[str, ...] = ("worker",)
    scheduler: tuple[str, ...] = ("scheduler",)
    frontend: tuple[str, ...] = ("frontend",)


def process_commands(config: ServeConfig, addresses: Addresses, files: RuntimeFiles,
                     modules: ProcessModules = ProcessModules()) -> dict[str, list[str]]:
    """Each process's command line: its addresses and runtime files, then its part of `config` whole."""
    logging_flags = to_argv(config.logging)
    worker = ["--scheduler-address", addresses.worker, "--ready-file", files.worker_ready, *to_argv(config.engine)]
    scheduler = ["--frontend-address", addresses.frontend, "--worker-address", addresses.worker,
                 *to_argv(replace(config.scheduler, registry_file=files.registry))]
    model_name = config.frontend.model_name or Path(config.engine.model_path).name
    frontend = ["--scheduler-address", addresses.frontend, "--ready-file", files.ready,
                *to_argv(replace(config.frontend, model_name=model_name))]
    return {name: [sys.executable, "-m", *getattr(modules, name), *flags, *logging_flags]
            for name, flags in (("scheduler", scheduler), ("worker", worker), ("frontend", frontend))}


class Launcher:
    def __init__(self, config: ServeConfig, modules: ProcessModules = ProcessModules()) -> None:
        self.config = config
        self.runtime_dir = Path(tempfile.mkdtemp(prefix="loraserve-"))  # mode 0700
        self.addresses = Addresses(frontend=f"ipc://{self.runtime_dir}/frontend.sock",
                                   worker=f"ipc://{self.runtime_dir}/worker.sock")
        self.files = RuntimeFiles(ready=str(self.runtime_dir / "frontend.ready"),
                                  worker_ready=str(self.runtime_dir / "worker.ready"),
                                  registry=str(self.runtime_dir / "adapters.json"))
        self.commands = process_commands(config, self.addresses, self.files, modules)
        self.processes: dict[str, subprocess.Popen] = {}
        self.restarts: dict[str, deque[float]] = {name: deque() for name in self.commands}
        self.stopping = False

    @property
    def address(self) -> str:
        return f"{self.config.frontend.host}:{self.config.frontend.port}"

    def start(self) -> None:
        """The worker and the scheduler; the frontend follows once the model is loaded (`wait_until_serving`)."""
        self._spawn("worker")
        self._spawn("scheduler")

    def _spawn(self, name: str) -> None:
        environment = os.environ | {PARENT_PID_VARIABLE: str(os.getpid())}
        # The child keeps its own copy of the log file's descriptor once started.
        log_file_path = self.config.deployment.log_file
        with open(log_file_path, "a") if log_file_path else nullcontext() as log_file:
            self.processes[name] = subprocess.Popen(self.commands[name], env=environment, stderr=log_file,
                                                    process_group=0)
        log.debug("started %s (pid %d)", name, self.processes[name].pid)

    def wait_until_serving(self) -> None:
        """Until the worker has loaded the model, then until the frontend first reports SERVING.

        The frontend starts only then, so that a model that cannot load never has an API announced
        for it. A death meanwhile is fatal.
        """
        deadline = time.monotonic() + self.config.deployment.startup_timeout_s
        self._wait_for_file(self.files.worker_ready, deadline)
        self._spawn("frontend")
        self._wait_for_file(self.files.ready, deadline)

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
            if name == "scheduler":
                self._terminate([self.processes["worker"]])  # its state belongs to the dead scheduler
                self._spawn("scheduler")
                self._spawn("worker")
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
        """The frontend first, so that its in-flight requests can finish; then the scheduler, then the worker.

        The scheduler before its worker: a worker that left first would read to the scheduler as a crash.
        """
        for name in ("frontend", "scheduler", "worker"):
            if name in self.processes:
                self._terminate([self.processes[name]])
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
