"""Command-line helpers shared by the three processes."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Callable


def name_value_pairs(values: list[str] | None, flag: str) -> dict[str, str]:
    """["a=/x", "b=/y"] -> {"a": "/x", "b": "/y"}, with a clear error for a bad item."""
    pairs: dict[str, str] = {}
    for item in values or []:
        name, sep, value = item.partition("=")
        if not sep or not name or not value:
            raise argparse.ArgumentTypeError(f"{flag} expects NAME=VALUE, got {item!r}")
        pairs[name] = value
    return pairs


def configure_logging(level: str, process: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format=f"%(asctime)s {process} %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def on_termination(stop: Callable[[], None]) -> None:
    """Calls `stop` on SIGTERM or SIGINT (the process then leaves its loop and exits)."""
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop())
