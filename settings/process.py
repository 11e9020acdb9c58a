"""Process helpers shared by the three processes: parent death and termination."""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Callable

PARENT_PID_VARIABLE = "LORASERVE_PARENT_PID"
# What rank 0 of a tensor-parallel worker group tells each worker process it starts.
TP_RANK_FLAG, TP_RENDEZVOUS_FLAG, TP_HOST_MEMORY_FLAG = "--tp-rank", "--tp-rendezvous", "--tp-host-memory"
PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Linux: under the launcher, get SIGTERM if it dies, even by SIGKILL.

    Set by the child itself at start-up: a `preexec_fn` would fork a process with live gRPC
    channels, which gRPC does not survive (grpc/grpc#43055).
    """
    parent = os.environ.get(PARENT_PID_VARIABLE)
    if parent is None:
        return
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        return
    if os.getppid() != int(parent):  # the launcher died before prctl took effect
        sys.exit(1)


def on_termination(stop: Callable[[], None]) -> None:
    """Calls `stop` on SIGTERM or SIGINT (the process then leaves its loop and exits)."""
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop())
