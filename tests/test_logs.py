"""settings/logs.py: whatever a process writes once its logging is configured is one record a line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

RECORD_KEYS = {"ts", "level", "process", "logger", "msg"}

NOISY_PROCESS = textwrap.dedent("""
    import logging, sys, threading, warnings
    from settings.logs import announce, configure_logging

    configure_logging("info", "test", sys.argv[1])
    announce(logging.getLogger("loraserve.test"), "listening on 127.0.0.1:1", port=1)
    warnings.warn("a library's warning")
    from transformers.utils import logging as transformers_logging
    transformers_logging.get_logger("transformers.models").warning("a transformers warning")
    transformers_logging.tqdm(range(3), desc="a progress bar").__iter__().__next__()
    logging.getLogger("huggingface_hub.file_download").warning("a hub warning")
    thread = threading.Thread(target=lambda: 1 / 0, name="helper")
    thread.start()
    thread.join()
    raise RuntimeError("uncaught")
""")


def run_noisy_process(log_format: str) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_DISABLE_PROGRESS_BARS", "CI")}
    return subprocess.run([sys.executable, "-c", NOISY_PROCESS, log_format], capture_output=True, text=True,
                          timeout=120, env=environment)


def test_warnings_library_logs_and_uncaught_exceptions_are_json_records():
    result = run_noisy_process("json")
    assert result.returncode == 1
    logged = [json.loads(line) for line in result.stderr.splitlines()]
    assert all(RECORD_KEYS <= set(record) and record["process"] == "test" for record in logged)
    messages = [record["msg"] for record in logged]
    assert any("a library's warning" in message for message in messages)
    assert "a transformers warning" in messages and "a hub warning" in messages
    assert {"uncaught exception", "uncaught exception in thread helper"} <= set(messages)
    uncaught = next(record for record in logged if record["msg"] == "uncaught exception")
    assert uncaught["level"] == "critical" and "RuntimeError: uncaught" in uncaught["exception"]
    printed, = (json.loads(line) for line in result.stdout.splitlines())
    assert printed["msg"] == "listening on 127.0.0.1:1" and printed["port"] == 1 and printed["level"] == "info"


def test_logfmt_lines_are_records_too():
    result = run_noisy_process("logfmt")
    for line in result.stderr.splitlines() + result.stdout.splitlines():
        assert line.startswith("ts=") and " process=test " in line, line


@pytest.mark.parametrize("preset, expected", [({}, "NONE"), ({"GRPC_VERBOSITY": "ERROR"}, "ERROR"),
                                              ({"GRPC_TRACE": "api"}, "unset")])
def test_grpc_core_is_silenced_for_the_processes_started_unless_the_user_chose(preset, expected):
    environment = {k: v for k, v in os.environ.items() if k not in ("GRPC_VERBOSITY", "GRPC_TRACE")} | preset
    code = ("import subprocess, sys; from settings.logs import configure_logging; "
            "configure_logging('info', 'test', hugging_face=False); "
            "subprocess.run([sys.executable, '-c', 'import os; print(os.environ.get(\"GRPC_VERBOSITY\", \"unset\"))'])")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=environment)
    assert result.stdout.strip() == expected
