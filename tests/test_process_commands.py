"""`loraserve serve` flags reach the processes that act on them."""

from __future__ import annotations

import math

import pytest

from loraserve.launcher import Addresses, RuntimeFiles, ServeConfig, process_commands
from scheduler.__main__ import parse_args as scheduler_args
from scheduler.config import SchedulerConfig
from worker.__main__ import parse_args as worker_args


def commands(**settings):
    config = ServeConfig(model_path="/models/m", tokenizer_path=None, **settings)
    files = RuntimeFiles(ready="/tmp/r/ready", registry="/tmp/r/registry.json")
    return process_commands(config, Addresses(frontend="ipc:///tmp/f", worker="ipc:///tmp/w"), files)


def test_engine_speed_flags_reach_the_worker_and_scheduler():
    chosen = commands(cuda_graphs=False, mixed_graphs=False, pipelined_loads=True, overlap_schedule=False)
    worker = worker_args(chosen["worker"][3:])
    assert worker.disable_cuda_graphs and worker.disable_mixed_graphs
    scheduler = scheduler_args(chosen["scheduler"][3:])
    assert scheduler.pipelined_loads and scheduler.disable_overlap_schedule


@pytest.mark.parametrize("ratio", [1.5, math.inf])
def test_the_pause_tokens_ratio_reaches_the_scheduler(ratio):
    assert scheduler_args(commands(pause_tokens_ratio=ratio)["scheduler"][3:]).pause_tokens_ratio == ratio
    assert scheduler_args(commands()["scheduler"][3:]).pause_tokens_ratio == SchedulerConfig.pause_tokens_ratio


def test_a_pause_tokens_ratio_of_one_or_less_is_refused_on_the_command_line(capsys):
    with pytest.raises(SystemExit):
        scheduler_args(["--frontend-address", "ipc:///tmp/f", "--worker-address", "ipc:///tmp/w",
                        "--pause-tokens-ratio", "1"])
    assert "pause_tokens_ratio must exceed 1" in capsys.readouterr().err


def test_defaults_keep_graphs_on_and_pipelined_loads_off():
    default = commands()
    worker = worker_args(default["worker"][3:])
    assert not worker.disable_cuda_graphs and not worker.disable_mixed_graphs
    assert not scheduler_args(default["scheduler"][3:]).pipelined_loads
    assert not scheduler_args(default["scheduler"][3:]).disable_overlap_schedule
