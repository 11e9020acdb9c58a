"""Structured logs for the processes: one line per record, logfmt or JSON.

Fields passed with `extra=` (request_id, adapter, ...) become keys of the line, so a
request can be followed across processes by its id:

    ts=2026-01-01T12:00:00.123Z level=info process=frontend logger=loraserve.frontend msg="request finished" request_id=abc

Every line a process writes is such a record. Python warnings, transformers' and
huggingface_hub's loggers (which would print through handlers of their own) and uncaught
exceptions (the traceback is a field) go through the same handler; progress bars are drawn
only when stderr is a terminal; what a process tells its user on stdout (where it listens)
is a record too (`announce`). gRPC's C core writes below Python, so it is silenced
(GRPC_VERBOSITY=NONE unless GRPC_VERBOSITY or GRPC_TRACE is set): it reads the variable when
grpc is first imported, so a process configures logging before importing grpc, and the
processes it starts inherit it.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import sys
import threading
from datetime import datetime, timezone
from types import TracebackType
from typing import Any

LOG_FORMATS = ("logfmt", "json")
_STANDARD_ATTRIBUTES = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}
GRPC_VERBOSITY = "GRPC_VERBOSITY"
GRPC_TRACE = "GRPC_TRACE"
HUB_PROGRESS_BARS_OFF = "HF_HUB_DISABLE_PROGRESS_BARS"  # transformers follows huggingface_hub's setting
TRUE_WORDS = frozenset({"1", "ON", "YES", "TRUE"})  # as huggingface_hub reads its variables


class StructuredFormatter(logging.Formatter):
    def __init__(self, process: str, log_format: str = "logfmt") -> None:
        super().__init__()
        if log_format not in LOG_FORMATS:
            raise ValueError(f"log format must be one of {LOG_FORMATS}, got {log_format!r}")
        self.process = process
        self.log_format = log_format

    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname.lower(), "process": self.process, "logger": record.name,
            "msg": record.getMessage(),
        }
        fields |= {key: value for key, value in vars(record).items() if key not in _STANDARD_ATTRIBUTES}
        if record.exc_info:
            fields["exception"] = self.formatException(record.exc_info)
        if self.log_format == "json":
            return json.dumps(fields, default=str)
        return " ".join(f"{key}={_logfmt_value(value)}" for key, value in fields.items())


def _logfmt_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    if text and not any(c in text for c in ' ="\n\t\\'):
        return text
    return json.dumps(text)


_announcements = logging.StreamHandler(sys.stdout)
_announcements.setFormatter(StructuredFormatter("loraserve"))


def configure_logging(level: str, process: str, log_format: str = "logfmt", *, hugging_face: bool = True) -> None:
    """Records of `level` and above on stderr; see the module's doc for what else is routed here.

    `hugging_face`: route transformers' and huggingface_hub's logs (imports them if installed;
    a process that never uses them, the scheduler, passes False).
    """
    formatter = StructuredFormatter(process, log_format)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    logging.basicConfig(level=getattr(logging, level.upper()), handlers=[handler], force=True)
    _announcements.setStream(sys.stdout)
    _announcements.setFormatter(formatter)
    logging.captureWarnings(True)
    sys.excepthook = _log_uncaught
    threading.excepthook = _log_uncaught_in_thread
    if GRPC_TRACE not in os.environ:  # whoever asks for gRPC's traces wants its plain lines
        os.environ.setdefault(GRPC_VERBOSITY, "NONE")
    if not sys.stderr.isatty():
        os.environ.setdefault(HUB_PROGRESS_BARS_OFF, "1")
    if hugging_face:
        _route_hugging_face_logs(progress_bars=os.environ.get(HUB_PROGRESS_BARS_OFF, "").upper() not in TRUE_WORDS)


def announce(logger: logging.Logger, message: str, **fields: Any) -> None:
    """An info record on stdout whatever the log level: what the process tells its user (where it
    listens), in the format of its logs."""
    _announcements.handle(logger.makeRecord(logger.name, logging.INFO, "(announce)", 0, message, (), None,
                                            extra=fields))


def _route_hugging_face_logs(progress_bars: bool) -> None:
    """Their records propagate to the root handler instead of printing through their own."""
    if importlib.util.find_spec("huggingface_hub") is not None:
        from huggingface_hub.utils import disable_progress_bars
        from huggingface_hub.utils import logging as hub_logging  # adds its handler when first imported

        hub_logger = hub_logging.get_logger()
        for own_handler in list(hub_logger.handlers):
            hub_logger.removeHandler(own_handler)
        if not progress_bars:
            disable_progress_bars()  # the environment is read only when huggingface_hub is first imported
    if importlib.util.find_spec("transformers") is not None:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_default_handler()
        transformers_logging.enable_propagation()
        if not progress_bars:
            transformers_logging.disable_progress_bar()


def _log_uncaught(kind: type[BaseException], error: BaseException, traceback: TracebackType | None) -> None:
    logging.getLogger("loraserve").critical("uncaught exception", exc_info=(kind, error, traceback))


def _log_uncaught_in_thread(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit:
        return
    logging.getLogger("loraserve").critical("uncaught exception in thread %s", getattr(args.thread, "name", "?"),
                                            exc_info=(args.exc_type, args.exc_value, args.exc_traceback))
