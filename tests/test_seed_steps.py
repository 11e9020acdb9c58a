"""benchmarks/seed_steps.py over a synthetic worker timeline."""

from __future__ import annotations

from tests.benchmark_scripts import load_benchmark


def forward(tokens: int, sequences: int, adapters: int, ms: float, path: str = "static") -> dict:
    return {"ph": "X", "name": "forward", "ts": 0.0, "dur": ms * 1e3, "pid": "worker", "tid": "compute",
            "args": {"tokens": tokens, "sequences": sequences, "adapters": [f"a{i}" for i in range(adapters)],
                     "path": path}}


def test_groups_decodes_by_batch_and_adapters_and_prompts_by_bucket_and_path():
    seed_steps = load_benchmark("seed_steps")
    trace = {"traceEvents": [
        forward(9, 9, 8, 7.5), forward(9, 9, 8, 7.7), forward(9, 9, 8, 7.6),
        forward(3, 3, 3, 6.0),
        forward(300, 4, 4, 15.0), forward(320, 2, 2, 16.0),  # both pad to 320
        forward(321, 2, 2, 19.0),  # pads to 384
        forward(100, 2, 1, 30.0, path="static-waiting"),
        forward(5000, 3, 3, 90.0, path="eager"),  # past the largest bucket
        {"ph": "X", "name": "_shrink_kernel", "ts": 0.0, "dur": 5.0, "args": {}},  # not a forward
    ]}
    groups = {g.name: g.durations_ms for g in seed_steps.step_groups(trace, buckets=(64, 128, 320, 384))}
    assert groups == {
        "decode, 9 sequences over 8 adapters": [7.5, 7.7, 7.6],
        "decode, 3 sequences over 3 adapters": [6.0],
        "prompt, bucket 320 tokens, static": [15.0, 16.0],
        "prompt, bucket 384 tokens, static": [19.0],
        "prompt, bucket 128 tokens, static-waiting": [30.0],
        "prompt, bucket over 384 tokens, eager": [90.0],
    }
    ordered = [g.total_ms for g in seed_steps.step_groups(trace, buckets=(64, 128, 320, 384))]
    assert ordered == sorted(ordered, reverse=True)
