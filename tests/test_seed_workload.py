"""The seed workload's plumbing, which only the GPU runs end to end: its client flags and modes."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.seed_workload import MODES, bench_args
from loraserve.bench import run_bench
from loraserve.command_line import connection_from_args
from settings.config import ServeConfig


def test_the_client_is_loraserve_bench_with_the_seeds_workload(tmp_path):
    args = bench_args("127.0.0.1:50123", ["a", "b"], 4.0, 100, tmp_path / "out.json")
    assert args.run is run_bench
    assert (args.random_input_len, args.random_output_len, args.random_range_ratio) == (512, 512, 0.0)
    assert (args.request_rate, args.num_prompts, args.lora_name) == (4.0, 100, ["a", "b"])
    assert args.lora_request_distribution == "distinct" and args.output_file == Path(tmp_path / "out.json")
    assert connection_from_args(args.parser, args).address == "127.0.0.1:50123"


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_is_a_server_configuration(mode):
    config = ServeConfig.of(model_path="/m").replace(**MODES[mode])
    assert config.scheduler.overlap_loading == (mode != "off")
