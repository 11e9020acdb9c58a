"""The seed workload's plumbing, which only the GPU runs end to end: its client flags and modes."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.seed_workload import (
    MODES,
    SHAPES,
    bench_args,
    overlap_against_off,
    parse_args,
    run_suffix,
    server_config,
)
from loraserve.bench import run_bench
from loraserve.command_line import connection_from_args
from loraserve.synthetic import write_model_config
from settings.config import ServeConfig
from worker.model.config import load_model_config
from worker.tensor_parallel import TensorParallel


def test_the_client_is_loraserve_bench_with_the_seeds_workload(tmp_path):
    args = bench_args("127.0.0.1:50123", ["a", "b"], 4.0, 100, tmp_path / "out.json")
    assert args.run is run_bench
    assert (args.random_input_len, args.random_output_len, args.random_range_ratio) == (512, 512, 0.0)
    assert (args.request_rate, args.num_prompts, args.lora_name) == (4.0, 100, ["a", "b"])
    assert args.lora_request_distribution == "distinct" and args.output_file == Path(tmp_path / "out.json")
    assert connection_from_args(args.parser, args).address == "127.0.0.1:50123"
    assert args.seed == 1  # the seed runs' request list
    assert bench_args("127.0.0.1:50123", ["a"], 4.0, 100, tmp_path / "out.json", workload_seed=3).seed == 3


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_is_a_server_configuration(mode):
    config = ServeConfig.of(model_path="/m").replace(**MODES[mode])
    assert config.scheduler.overlap_loading == (mode != "off")


def test_the_70b_shape_splits_over_4_and_8_gpus(tmp_path):
    config = load_model_config(write_model_config(tmp_path, SHAPES["llama-70b"]))
    assert (config.num_layers, config.hidden_size, config.num_kv_heads) == (80, 8192, 8)
    for size in (4, 8):
        TensorParallel(size=size).check(config)
        assert TensorParallel(size=size).local_config(config).num_kv_heads == 8 // size


def test_a_multi_gpu_run_is_a_server_configuration_and_names_its_result_file():
    argv = ["--out-dir", "/o", "--replicas", "4", "--scale-with-replicas", "--routing-policy", "round-robin",
            "--tp", "2", "--shape", "llama-70b"]
    args = parse_args(argv)
    config = server_config(args, Path("/m"))
    assert (config.frontend.routing_policy, config.engine.tensor_parallel_size, config.deployment.replicas) == (
        "round-robin", 2, 4)
    assert run_suffix(args) == "-replicas4-tp2-scaled-round-robin-llama-70b"
    assert run_suffix(parse_args(["--out-dir", "/o"])) == ""
    assert run_suffix(parse_args(["--out-dir", "/o", "--workload-seed", "2"])) == "-workload2"


def test_the_zipf_set_asks_for_skewed_requests_over_its_names(tmp_path):
    names = [f"adapter{i}" for i in range(1000)]
    args = bench_args("127.0.0.1:50123", names, 3.0, 100, tmp_path / "out.json", zipf=True)
    assert (args.lora_request_distribution, args.lora_zipf_alpha, len(args.lora_name)) == ("skewed", 1.1, 1000)


def run_with_ttfts(ttfts: list[float]) -> dict:
    ordered = sorted(ttfts)
    median = (ordered[len(ordered) // 2 - 1] + ordered[len(ordered) // 2]) / 2
    return {"summary": {"ttft_ms": {"median": median}}, "records": [{"ttft_ms": t} for t in ttfts]}


def test_overlap_is_judged_against_off_per_set_at_the_median_and_every_percentile():
    off = [float(t) for t in range(10, 210, 2)]  # 100 requests, 10 to 208 ms
    on = [t * 0.8 for t in off[:98]] + [500.0, 600.0]  # earlier, except the two slowest: later at P99
    results = {"large-off": run_with_ttfts(off), "large-on": run_with_ttfts(on),
               "large-resident": run_with_ttfts([5.0] * 100), "small-on": run_with_ttfts(on)}
    checks = overlap_against_off(results)
    assert set(checks) == {"large_median_ttft_on_vs_off", "large_ttft_percentiles_on_later_than_off"}
    assert checks["large_median_ttft_on_vs_off"] == pytest.approx(0.8)
    assert checks["large_ttft_percentiles_on_later_than_off"] == [99]
