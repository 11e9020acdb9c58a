"""`benchmarks.folded_reader_sweep` runs every reader in every launch shape it lists and records them.

On a GPU machine at the benchmark's own sizes would take minutes: here the model is shrunk and
the graph timing replaced by one call, so that the check runs in Triton's interpreter too
(`TRITON_INTERPRET=1`, CPU tensors, float32).
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.benchmark_scripts import load_benchmark
from tests.gpu.test_gpu_elementwise import DEVICES

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not DEVICES, reason="needs a CUDA GPU (or TRITON_INTERPRET=1)")]


def test_the_sweep_times_each_reader_in_each_shape_and_writes_the_best(monkeypatch, tmp_path, capsys):
    bench = load_benchmark("folded_reader_sweep")
    small = {"LAYERS": 2, "HIDDEN": 64, "INTERMEDIATE": 96, "HEADS": 2, "KV_HEADS": 1, "HEAD_DIM": 32,
             "ROWS": (16, 32), "COLUMNS": (64,), "WARPS": (4,), "WALKING_ROWS": (2, 16), "WALKING_COLUMNS": (32,),
             "WALKING_WARPS": (4,), "DTYPE": torch.float32, "DEVICE": DEVICES[0]}
    for name, value in small.items():
        monkeypatch.setattr(bench, name, value)
    calls = []

    def one_call(call, repeats):
        call()
        calls.append(call)
        return float(len(calls))

    monkeypatch.setattr(bench, "graph_microseconds", one_call)
    out = tmp_path / "sweep.json"
    monkeypatch.setattr("sys.argv", ["folded_reader_sweep", "--prompt", "40", "--out", str(out)])
    bench.main()
    results = json.loads(out.read_text())["results"]
    assert list(results) == ["act_mul", "add_rms_norm", "add_rms_norm 1 kernel", "add_rms_norm rows",
                             "rope_and_cache_kv"]
    act = results["act_mul"]
    # The default (16 rows, 128 columns) first, then the grid's two shapes.
    assert [(r["rows"], r["columns"]) for r in act["all"]] == [(16, 128), (16, 64), (32, 64)]
    assert act["default_us"] == act["all"][0]["us"] and act["best"] == act["all"][0]
    assert [(r["rows"], r["columns"]) for r in results["add_rms_norm rows"]["all"]] == [(2, 2048), (2, 32), (16, 32)]
    assert [r["rows"] for r in results["rope_and_cache_kv"]["all"]] == [16, 32]
    assert "best" in capsys.readouterr().out
