"""`loraserve bench` and the timeline against a running three-process server."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter

import pytest

from benchmarks.request_phases import groups, request_phases
from loraserve.bench import Record, summarize
from loraserve.cli import main as cli
from tests.integration.conftest import free_port, running_server
from tests.slow_worker import slow_worker_modules


def test_bench_records_summary_and_timeline(base_config, tmp_path):
    with running_server(base_config, slow_worker_modules(slow_loads={"a3": 1.5})) as (launcher, client):
        out = tmp_path / "bench.json"
        args = ["bench", "--address", launcher.address, "--num-prompts", "12", "--random-input-len", "24",
                "--random-output-len", "8", "--request-rate", "40", "--seed", "3", "--lora-name", "a0", "a1",
                "a2", "a3", "--lora-request-distribution", "distinct", "--output-file", str(out),
                "--disable-progress"]
        assert cli(args) == 0
        trace_file, picture = tmp_path / "trace.json", tmp_path / "timeline.png"
        assert cli(["trace", "--address", launcher.address, "-o", str(trace_file)]) == 0
    result = json.loads(out.read_text())
    records = [Record(**{k: v for k, v in r.items()}) for r in result["records"]]
    assert len(records) == 12 and all(r.success for r in records)
    assert [r.adapter for r in records] == ["a0", "a1", "a2", "a3"] * 3
    assert all(r.output_tokens == r.output_len and len(r.itl_ms) <= r.output_tokens - 1 for r in records)
    recomputed = summarize(records, result["summary"]["duration_s"])
    assert recomputed == result["summary"]

    trace = json.loads(trace_file.read_text())["traceEvents"]
    loads = [e for e in trace if e["tid"] == "pcie" and e["name"] == "a3"]
    forwards = [e for e in trace if e["tid"] == "compute"]
    assert loads and all(load["dur"] >= 1.0e6 for load in loads)
    assert {e["args"]["device"] for e in trace if e["pid"] == "worker"} == {"cpu"}
    for load in loads:
        during = [f for f in forwards if load["ts"] < f["ts"] and f["ts"] + f["dur"] < load["ts"] + load["dur"]]
        assert during, "other requests' forwards should run while a3 loads"
        assert all("a3" not in f["args"]["adapters"] for f in during)
    assert Counter(e["name"] for e in trace if e["pid"] == "scheduler")["running"] >= 12
    slow = [p for p in request_phases({"traceEvents": trace}) if p.adapter == "a3"]
    assert len(slow) == 3 and all(p.copied_after_arrival for p in slow)
    for p in slow:  # each waited for the slow copy, was admitted on hearing of it, then prefilled
        assert p.copy_end - p.copy_start >= 1500
        assert p.copy_end <= p.adapter_ready <= p.admitted <= p.forward_start < p.forward_end <= p.first_token
        assert p.first_token < p.finished and p.output_tokens > 0
    copied_count, _ = groups(request_phases({"traceEvents": trace}))["adapter copied after arrival"]
    assert copied_count >= 3
    assert cli(["timeline", str(trace_file), "-o", str(picture)]) == 0
    assert picture.stat().st_size > 10_000
    assert cli(["timeline", str(trace_file), "-o", str(picture), "--last", "0.5"]) == 0


ONE_LINE_FAILURES = [  # (argv, exit code, words the line must have)
    (["bench", "--address", "{closed}", "--disable-progress"], 1, ["UNAVAILABLE", "--address"]),
    (["trace", "--address", "{closed}"], 1, ["UNAVAILABLE", "--address"]),
    (["timeline", "missing.json"], 2, ["no such file: missing.json"]),
    (["bench", "compare", "missing.json"], 2, ["no such file: missing.json"]),
    (["serve", "--lora-paths", "justapath"], 2, ["--lora-paths", "NAME=VALUE", "justapath"]),
]


@pytest.mark.parametrize("argv, code, words", ONE_LINE_FAILURES)
def test_the_command_fails_in_one_line_without_a_traceback(tmp_path, argv, code, words):
    """The installed `loraserve` command, as a user runs it."""
    argv = [word.format(closed=f"127.0.0.1:{free_port()}") for word in argv]
    done = subprocess.run([sys.executable, "-c", "import sys; from loraserve.cli import main; sys.exit(main())",
                           *argv], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == code
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr
    assert all(word in done.stderr for word in words), done.stderr
