"""A tensor-parallel worker group: N processes, one per GPU, that act as one worker.

Rank 0 is the worker the scheduler knows: it starts the other ranks (children that die with
it), receives every command, and relays it to them before running it, so that every rank runs
the same engine calls in the same order and their collectives meet. Commands travel as the
scheduler's protobuf bytes over a gloo group (never a pickle); a forward's collectives use
NCCL on CUDA and gloo on CPU, with a timeout, so that a hung or dead rank takes the group
down (`GroupFailure`) instead of hanging it. The launcher then starts the group again.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from protos.loraserve.v1 import internal_pb2 as pb
from settings.process import PARENT_PID_VARIABLE, TP_RANK_FLAG, TP_RENDEZVOUS_FLAG
from worker.engine import Engine
from worker.service import execute_command, sequence_input
from worker.tensor_parallel import GroupFailure, TensorParallel

log = logging.getLogger("loraserve.worker")
COMMAND, POLL, STOP = b"C", b"P", b"S"
# Followers wait on the control group for their next command however long the worker idles.
CONTROL_TIMEOUT = timedelta(days=365)
FOLLOWER_EXIT_S = 10.0


@dataclass(frozen=True)
class GroupSpec:
    size: int
    rank: int
    rendezvous: str  # the FileStore file through which the ranks find one another
    timeout_s: float  # the longest a forward's collective may take


def backend_device(device: str) -> str:
    """`cuda` or `cpu`, as the engine will resolve `device`."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def join(spec: GroupSpec, device: str) -> TensorParallel:
    """Joins the group (blocks until every rank has); returns this rank's place in it."""
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # the group talks over loopback only
    on_cuda = backend_device(device) == "cuda"
    if on_cuda:
        torch.cuda.set_device(spec.rank)
    store = dist.FileStore(spec.rendezvous, spec.size)
    dist.init_process_group("nccl" if on_cuda else "gloo", store=store, rank=spec.rank, world_size=spec.size,
                            timeout=timedelta(seconds=spec.timeout_s))
    control = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
    # Every rank samples the same tokens from the same gathered logits: same generator state.
    torch.manual_seed(0)
    return TensorParallel(spec.rank, spec.size, group=dist.group.WORLD, control=control)


class Followers:
    """Rank 0's handle on the ranks it started: relays commands, notices deaths, stops them."""

    def __init__(self, argv: list[str], size: int) -> None:
        self.directory = tempfile.mkdtemp(prefix="loraserve-tp-")
        self.rendezvous = str(Path(self.directory) / "rendezvous")
        environment = {**os.environ, PARENT_PID_VARIABLE: str(os.getpid())}
        self.processes = [
            subprocess.Popen([sys.executable, "-m", "worker", *argv, TP_RANK_FLAG, str(rank),
                              TP_RENDEZVOUS_FLAG, self.rendezvous], env=environment)
            for rank in range(1, size)]
        self.tp: TensorParallel | None = None

    def relay_command(self, command: bytes) -> None:
        """Before rank 0 runs a command (the scheduler's bytes), every other rank gets it."""
        self._relay(COMMAND + command)

    def relay_poll(self) -> None:
        """Before rank 0 polls loads: the ranks agree on which are done (`Engine.poll`)."""
        self._relay(POLL)

    def _relay(self, message: bytes) -> None:
        self.check()
        self.tp.broadcast_bytes(message)

    def check(self) -> None:
        """Raises `GroupFailure` if a rank has exited."""
        for rank, process in enumerate(self.processes, start=1):
            code = process.poll()
            if code is not None:
                raise GroupFailure(f"tensor-parallel rank {rank} exited with code {code}")

    def stop(self) -> None:
        """Asks the ranks to leave; kills those that do not (a hung one, a stopped one)."""
        try:
            if self.tp is not None and all(p.poll() is None for p in self.processes):
                self.tp.broadcast_bytes(STOP)
        except GroupFailure:
            pass
        for process in self.processes:
            try:
                process.wait(timeout=FOLLOWER_EXIT_S)
            except subprocess.TimeoutExpired:
                process.send_signal(signal.SIGKILL)
                process.wait()
        for path in Path(self.directory).iterdir():
            path.unlink()
        os.rmdir(self.directory)


def follow(engine: Engine) -> None:
    """A rank other than 0: runs what rank 0 relays until told to stop. Errors are rank 0's to
    report (every rank meets the same ones); a `GroupFailure` ends the process."""
    if engine.graph_runner is not None:
        engine.graph_runner.capture_all()
    tp = engine.tp
    while True:
        message = tp.broadcast_bytes()
        op, body = message[:1], message[1:]
        if op == STOP:
            return
        try:
            if op == POLL:
                engine.poll()
            elif op == COMMAND:
                _follow_command(engine, pb.WorkerCommand.FromString(body))
        except Exception as error:  # noqa: BLE001 - rank 0 reports the same error
            log.debug("rank %d: %s", tp.rank, error)


def _follow_command(engine: Engine, command: pb.WorkerCommand) -> None:
    if command.WhichOneof("kind") == "forward":
        # Launched and left: this rank's tokens are rank 0's; the GPU stream keeps the order.
        engine.launch([sequence_input(s) for s in command.forward.sequences])
    else:
        execute_command(engine, command, pb.CommandResult())
