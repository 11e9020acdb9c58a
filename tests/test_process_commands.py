"""`loraserve serve` flags reach the processes that act on them, each process's part whole."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from frontend.__main__ import parse_args as frontend_args
from loraserve.launcher import Addresses, ProcessModules, RuntimeFiles, process_commands
from scheduler.__main__ import parse_args as scheduler_args
from settings.config import ServeConfig
from worker.__main__ import parse_args as worker_args

FILES = RuntimeFiles(ready="/tmp/r/ready", worker_ready="/tmp/r/worker.ready", registry="/tmp/r/registry.json")


def commands(**settings):
    config = ServeConfig.of(model_path="/models/m", **settings)
    return process_commands(config, Addresses(frontend="ipc:///tmp/f", worker="ipc:///tmp/w"), FILES)


def test_engine_speed_flags_reach_the_worker_and_scheduler():
    chosen = commands(cuda_graphs=False, static_mixed=False, pipelined_loads=True, max_forwards_in_flight=1)
    engine = worker_args(chosen["worker"][3:]).engine
    assert not engine.cuda_graphs and not engine.static_mixed
    scheduler = scheduler_args(chosen["scheduler"][3:]).scheduler
    assert scheduler.pipelined_loads and scheduler.max_forwards_in_flight == 1


@pytest.mark.parametrize("ratio", [1.5, 3.0, math.inf])
def test_the_pause_tokens_ratio_reaches_the_scheduler(ratio):
    assert scheduler_args(commands(pause_tokens_ratio=ratio)["scheduler"][3:]).scheduler.pause_tokens_ratio == ratio


def test_a_pause_tokens_ratio_of_one_or_less_is_refused_on_the_command_line(capsys):
    with pytest.raises(SystemExit):
        scheduler_args(["--frontend-address", "ipc:///tmp/f", "--worker-address", "ipc:///tmp/w",
                        "--pause-tokens-ratio", "1"])
    assert "pause_tokens_ratio must exceed 1" in capsys.readouterr().err


def test_defaults_keep_graphs_on_and_pipelined_loads_off():
    default = commands()
    engine = worker_args(default["worker"][3:]).engine
    assert engine.cuda_graphs and engine.static_mixed
    scheduler = scheduler_args(default["scheduler"][3:]).scheduler
    assert not scheduler.pipelined_loads and scheduler.max_forwards_in_flight == 2 and scheduler.prefetch


def test_every_part_reaches_its_process_whole():
    config = ServeConfig.of(
        model_path="/models/m", device="cpu", dtype="bfloat16", load_format="dummy", host_cache_bytes=3 << 20,
        lora_target_modules=("q_proj", "v_proj"), static_decode=False, initial_adapters={"a": "/x", "b": "/y=z"},
        overlap_loading=False, prefetch=False, drain_after_s=0.25, adapter_root="/adapters", port=0,
        tokenizer_path="/tok", model_name="served", http_port=8000, auth_token_file="/t", tls_cert="/c",
        tls_key="/k", liveness_silence_s=2.5, log_level="debug", log_format="json")
    chosen = process_commands(config, Addresses(frontend="ipc:///tmp/f", worker="ipc:///tmp/w"), FILES)
    worker = worker_args(chosen["worker"][3:])
    scheduler = scheduler_args(chosen["scheduler"][3:])
    frontend = frontend_args(chosen["frontend"][3:])
    assert worker.engine == config.engine
    assert scheduler.scheduler == replace(config.scheduler, registry_file=FILES.registry)
    assert frontend.frontend == config.frontend
    assert worker.logging == scheduler.logging == frontend.logging == config.logging
    assert (worker.scheduler_address, scheduler.worker_address) == ("ipc:///tmp/w", "ipc:///tmp/w")
    assert (frontend.scheduler_address, scheduler.frontend_address) == ("ipc:///tmp/f", "ipc:///tmp/f")
    assert frontend.ready_file == FILES.ready


def test_the_frontend_is_told_the_model_directory_name_by_default():
    assert frontend_args(commands()["frontend"][3:]).frontend.model_name == "m"


def test_a_test_can_run_another_module_for_a_process():
    config = ServeConfig.of(model_path="/models/m")
    modules = ProcessModules(worker=("tests.slow_worker", "--slow-load", "a=1.0"))
    chosen = process_commands(config, Addresses(frontend="ipc:///tmp/f", worker="ipc:///tmp/w"), FILES, modules)
    assert chosen["worker"][1:5] == ["-m", "tests.slow_worker", "--slow-load", "a=1.0"]
    assert chosen["scheduler"][1:3] == ["-m", "scheduler"] and chosen["frontend"][1:3] == ["-m", "frontend"]
