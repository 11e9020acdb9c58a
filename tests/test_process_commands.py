"""`loraserve serve` flags reach the processes that act on them, each process's part whole."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest

from frontend.__main__ import parse_args as frontend_args
from loraserve.launcher import ProcessModules, Replica, process_commands, replica_count, replicas_in
from scheduler.__main__ import parse_args as scheduler_args
from settings.config import ServeConfig
from worker.__main__ import parse_args as worker_args

REPLICA = Replica(scheduler="scheduler", worker="worker", frontend_address="ipc:///tmp/f", worker_address="ipc:///tmp/w",
                  worker_ready="/tmp/r/worker.ready", registry="/tmp/r/registry.json")
READY = "/tmp/r/ready"


def commands(**settings):
    config = ServeConfig.of(model_path="/models/m", **settings)
    return process_commands(config, [REPLICA], READY)


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
    chosen = process_commands(config, [REPLICA], READY)
    worker = worker_args(chosen["worker"][3:])
    scheduler = scheduler_args(chosen["scheduler"][3:])
    frontend = frontend_args(chosen["frontend"][3:])
    assert worker.engine == config.engine
    assert scheduler.scheduler == replace(config.scheduler, registry_file=REPLICA.registry)
    assert frontend.frontend == config.frontend
    assert worker.logging == scheduler.logging == frontend.logging == config.logging
    assert (worker.scheduler_address, scheduler.worker_address) == ("ipc:///tmp/w", "ipc:///tmp/w")
    assert (frontend.scheduler_addresses, scheduler.frontend_address) == (["ipc:///tmp/f"], "ipc:///tmp/f")
    assert frontend.ready_file == READY


def test_the_frontend_is_told_the_model_directory_name_by_default():
    assert frontend_args(commands()["frontend"][3:]).frontend.model_name == "m"


def test_a_test_can_run_another_module_for_a_process():
    config = ServeConfig.of(model_path="/models/m")
    modules = ProcessModules(worker=("tests.slow_worker", "--slow-load", "a=1.0"))
    chosen = process_commands(config, [REPLICA], READY, modules)
    assert chosen["worker"][1:5] == ["-m", "tests.slow_worker", "--slow-load", "a=1.0"]
    assert chosen["scheduler"][1:3] == ["-m", "scheduler"] and chosen["frontend"][1:3] == ["-m", "frontend"]


def test_each_replica_gets_its_own_pair_and_the_frontend_every_scheduler(tmp_path):
    config = ServeConfig.of(model_path="/models/m", replicas=3, replica_addresses=("tcp://10.0.0.2:5555",))
    replicas = replicas_in(tmp_path, replica_count(config, gpus=["0", "1"]), gpus=["0", "1"])
    chosen = process_commands(config, replicas, READY)
    assert sorted(chosen) == ["frontend", "scheduler", "scheduler-1", "scheduler-2", "worker", "worker-1", "worker-2"]
    assert [r.gpu for r in replicas] == ["0", "1", "0"], "round robin over the GPUs there are"
    frontend = frontend_args(chosen["frontend"][3:])
    assert frontend.scheduler_addresses == [r.frontend_address for r in replicas] + ["tcp://10.0.0.2:5555"]
    for replica in replicas:
        scheduler = scheduler_args(chosen[replica.scheduler][3:])
        worker = worker_args(chosen[replica.worker][3:])
        assert scheduler.worker_address == worker.scheduler_address == replica.worker_address
        assert scheduler.scheduler.registry_file == replica.registry and worker.ready_file == replica.worker_ready
    assert len({r.frontend_address for r in replicas}) == 3


def test_one_replica_per_gpu_by_default_and_one_on_cpu():
    assert replica_count(ServeConfig.of(model_path="/m"), gpus=["0", "1", "2"]) == 3
    assert replica_count(ServeConfig.of(model_path="/m", device="cpu"), gpus=["0", "1"]) == 1
    assert replica_count(ServeConfig.of(model_path="/m"), gpus=["0"]) == 1
    assert replica_count(ServeConfig.of(model_path="/m", replicas=2), gpus=[]) == 2
    assert replicas_in(Path("/r"), 1, ["0", "1"])[0].gpu is None, "one replica keeps the launcher's devices"


def test_a_tensor_parallel_replica_gets_a_group_of_gpus():
    config = ServeConfig.of(model_path="/m", tensor_parallel_size=2)
    gpus = ["0", "1", "2", "3"]
    assert replica_count(config, gpus) == 2, "one replica per two GPUs"
    assert [r.gpu for r in replicas_in(Path("/r"), 2, gpus, 2)] == ["0,1", "2,3"]
    assert replica_count(config, ["0", "1"]) == 1
    worker = worker_args(process_commands(config, replicas_in(Path("/r"), 1, gpus, 2), READY)["worker"][3:])
    assert worker.engine.tensor_parallel_size == 2
