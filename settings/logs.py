"""Structured logs for the three processes: one line per record, logfmt or JSON.

Fields passed with `extra=` (request_id, adapter, ...) become keys of the line, so a
request can be followed across processes by its id:

    ts=2026-01-01T12:00:00.123Z level=info process=frontend logger=loraserve.frontend msg="request finished" request_id=abc
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import datetime, timezone
from typing import Any

LOG_FORMATS = ("logfmt", "json")
_STANDARD_ATTRIBUTES = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


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


def configure_logging(level: str, process: str, log_format: str = "logfmt") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(StructuredFormatter(process, log_format))
    logging.basicConfig(level=getattr(logging, level.upper()), handlers=[handler], force=True)
