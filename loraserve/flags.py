"""Command-line helpers shared by the three processes."""

from __future__ import annotations

import argparse
import ctypes
import os
import signal
import sys
from collections.abc import Callable

from loraserve.logs import LOG_FORMATS
from scheduler.config import SchedulerConfig


def name_value_pairs(values: list[str] | None, flag: str) -> dict[str, str]:
    """["a=/x", "b=/y"] -> {"a": "/x", "b": "/y"}, with a clear error for a bad item."""
    pairs: dict[str, str] = {}
    for item in values or []:
        name, sep, value = item.partition("=")
        if not sep or not name or not value:
            raise argparse.ArgumentTypeError(f"{flag} expects NAME=VALUE, got {item!r}")
        pairs[name] = value
    return pairs


def pause_tokens_ratio(value: str) -> float:
    """--pause-tokens-ratio, checked as SchedulerConfig checks it."""
    try:
        return SchedulerConfig(pause_tokens_ratio=float(value)).pause_tokens_ratio
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


PAUSE_TOKENS_RATIO_HELP = ("slot preemption: a request finding every slot busy pauses a running one alone on its "
                           "slot with this many times its tokens left (inf: never)")


def add_logging_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    parser.add_argument("--log-format", default="logfmt", choices=LOG_FORMATS,
                        help="one line per record: key=value pairs (logfmt) or a JSON object")


PARENT_PID_VARIABLE = "LORASERVE_PARENT_PID"
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
