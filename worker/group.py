"""A tensor-parallel worker group: N processes, one per GPU, that act as one worker.

Rank 0 is the worker the scheduler knows: it starts the other ranks (children that die with
it), receives every command, and relays it to them before running it, so that every rank runs
the same engine calls in the same order and their collectives meet. Commands travel as the
scheduler's protobuf bytes (never a pickle) on ZeroMQ PUSH sockets over `ipc://`: a send never
waits for a rank, and a rank may idle on its socket for as long as the worker idles. Every
collective (a forward's: NCCL on CUDA, gloo on CPU; the load agreement's: gloo) has a timeout,
so a hung or dead rank takes the group down (`GroupFailure`) instead of hanging it; the launcher
then starts the group again.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import zmq

from protos.loraserve.v1 import internal_pb2 as pb
from settings.process import PARENT_PID_VARIABLE, TP_HOST_MEMORY_FLAG, TP_RANK_FLAG, TP_RENDEZVOUS_FLAG
from worker.engine import Engine
from worker.service import execute_command, sequence_input
from worker.tensor_parallel import GroupFailure, TensorParallel

log = logging.getLogger("loraserve.worker")
COMMAND, POLL, STOP = b"C", b"P", b"S"
FOLLOWER_EXIT_S = 10.0


@dataclass(frozen=True)
class GroupSpec:
    size: int
    rank: int
    rendezvous: str  # the FileStore file through which the ranks find one another
    timeout_s: float  # the longest a forward's collective may take
    host_memory: str  # the shared host cache every rank maps (worker/lora/shared_host_memory.py)


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
    control = dist.new_group(backend="gloo", timeout=timedelta(seconds=spec.timeout_s))
    # Every rank samples the same tokens from the same gathered logits: same generator state.
    torch.manual_seed(0)
    return TensorParallel(spec.rank, spec.size, group=dist.group.WORLD, control=control, host_memory=spec.host_memory)


class Followers:
    """Rank 0's handle on the ranks it started: relays commands, notices deaths, stops them."""

    def __init__(self, argv: list[str], size: int, timeout_s: float, host_memory_fd: int) -> None:
        """`timeout_s`: how long a rank may leave a command untaken (it connects once started);
        `host_memory_fd`: the shared host cache, which the ranks inherit (same descriptor number)."""
        self.directory = tempfile.mkdtemp(prefix="loraserve-tp-")
        self.rendezvous = str(Path(self.directory) / "rendezvous")
        environment = {**os.environ, PARENT_PID_VARIABLE: str(os.getpid())}
        self.context = zmq.Context.instance()
        self.sockets = []
        for rank in range(1, size):  # bound before the rank starts: what is sent meanwhile waits for it
            socket = self.context.socket(zmq.PUSH)
            socket.setsockopt(zmq.LINGER, 0)
            socket.setsockopt(zmq.SNDHWM, 0)
            socket.setsockopt(zmq.SNDTIMEO, int(timeout_s * 1000))  # a PUSH send waits for its peer
            socket.bind(command_address(self.directory, rank))
            self.sockets.append(socket)
        self.host_memory = inherited_path(host_memory_fd)
        self.processes = [
            subprocess.Popen([sys.executable, "-m", "worker", *argv, TP_RANK_FLAG, str(rank),
                              TP_RENDEZVOUS_FLAG, self.rendezvous, TP_HOST_MEMORY_FLAG, self.host_memory],
                             env=environment, pass_fds=(host_memory_fd,))
            for rank in range(1, size)]

    def relay_command(self, command: bytes) -> None:
        """Before rank 0 runs a command (the scheduler's bytes), every other rank gets it."""
        self._relay(COMMAND + command)

    def relay_poll(self) -> None:
        """Before rank 0 polls loads and stagings: the ranks agree on which are done (`Engine.poll`)."""
        self._relay(POLL)

    def _relay(self, message: bytes) -> None:
        self.check()
        for rank, socket in enumerate(self.sockets, start=1):
            try:
                socket.send(message)
            except zmq.Again as error:
                raise GroupFailure(f"tensor-parallel rank {rank} took no command in time") from error

    def check(self) -> None:
        """Raises `GroupFailure` if a rank has exited."""
        for rank, process in enumerate(self.processes, start=1):
            code = process.poll()
            if code is not None:
                raise GroupFailure(f"tensor-parallel rank {rank} exited with code {code}")

    def stop(self) -> None:
        """Asks the ranks to leave; kills those that do not (a hung one, a stopped one)."""
        for socket in self.sockets:
            with contextlib.suppress(zmq.Again):  # a rank that never connected: killed below
                socket.send(STOP, zmq.NOBLOCK)
        for process in self.processes:
            try:
                process.wait(timeout=FOLLOWER_EXIT_S)
            except subprocess.TimeoutExpired:
                process.kill()
        self.kill()

    def kill(self) -> None:
        """Ends every rank at once (the group failed: a collective may never return) and cleans up."""
        for process in self.processes:
            if process.poll() is None:
                process.kill()
            process.wait()
        for socket in self.sockets:
            socket.close(linger=0)
        self.sockets = []
        shutil.rmtree(self.directory, ignore_errors=True)


def inherited_path(fd: int) -> str:
    """A path through which a process opens its descriptor `fd` (a child's inherited one alike)."""
    return f"/proc/self/fd/{fd}"


def command_address(directory: str, rank: int) -> str:
    return f"ipc://{directory}/rank-{rank}.sock"


def command_socket(rendezvous: str, rank: int) -> zmq.Socket:
    """A rank's end of rank 0's commands, connected as soon as the rank starts (rank 0's sends wait for it)."""
    socket = zmq.Context.instance().socket(zmq.PULL)
    socket.setsockopt(zmq.LINGER, 0)
    socket.connect(command_address(str(Path(rendezvous).parent), rank))
    return socket


def follow(engine: Engine, socket: zmq.Socket) -> None:
    """A rank other than 0: runs what rank 0 relays on `socket` until told to stop. Errors are rank
    0's to report (every rank meets the same ones); a `GroupFailure` ends the process."""
    if engine.graph_runner is not None:
        engine.graph_runner.capture_all()
    tp = engine.tp
    while True:
        message = socket.recv()
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
