"""`loraserve bench` and the timeline against a running three-process server."""

from __future__ import annotations

import json
from collections import Counter

from loraserve.bench import Record, summarize
from loraserve.cli import main as cli
from tests.integration.conftest import running_server
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
    assert cli(["timeline", str(trace_file), "-o", str(picture)]) == 0
    assert picture.stat().st_size > 10_000
    assert cli(["timeline", str(trace_file), "-o", str(picture), "--last", "0.5"]) == 0
