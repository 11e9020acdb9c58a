"""The settings: one declaration per setting, generated flags that round-trip, the README's table,
and the import rule that keeps `settings/` and `loraserve/` free of the process packages."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import math
from pathlib import Path

import pytest

from settings.config import PARTS, EngineConfig, FrontendConfig, SchedulerConfig, ServeConfig, spec_of
from tests.driver import make_engine
from tests.model_factory import MAX_POSITIONS, build_tiny_model
from worker.errors import ModelLoadError
from worker.service import context_length
from settings.flags import (
    add_arguments,
    add_serve_arguments,
    config_from_args,
    markdown_table,
    serve_config_from_args,
    to_argv,
)

ROOT = Path(__file__).resolve().parent.parent
PROCESS_PACKAGES = ("frontend", "scheduler", "worker")

# A value off its default for every field of every part (a new field must be added here).
NON_DEFAULTS = {
    "model_path": "/models/m", "load_format": "dummy", "device": "cpu", "dtype": "float16", "context_length": 512,
    "tensor_parallel_size": 4, "tp_timeout_s": 5.0,
    "page_size": 8,
    "num_kv_pages": 99, "max_loras_per_batch": 3, "saved_module_slots": 2, "max_loaded_loras": 5, "max_lora_rank": 16,
    "lora_fold": True, "lora_target_modules": ("gate_proj", "up_proj", "down_proj"), "host_cache_bytes": 12345, "seed": 7, "static_decode": False,
    "cuda_graphs": False, "max_decode_batch": 64, "static_mixed": False,
    "host": "0.0.0.0", "port": 0, "tokenizer_path": "/tok", "model_name": "served", "http_port": 8000,
    "metrics_port": 9400, "max_message_bytes": 1024, "grace_seconds": 30.5, "admin_timeout_s": 1.25,
    "load_adapter_timeout_s": 60.0, "readiness_retry_s": 0.05, "readiness_probe_timeout_s": 0.5,
    "stop_ack_timeout_s": 2.0, "metrics_timeout_s": 0.1, "liveness_silence_s": 0.3, "liveness_ping_timeout_s": 0.2,
    "liveness_check_interval_s": 0.05, "auth_token_file": "/a", "admin_token_file": "/b", "tls_cert": "/c",
    "tls_key": "/k", "tls_client_ca": "/ca", "replica_addresses": ("tcp://10.0.0.2:5555",),
    "replica_state_interval_s": 0.02, "routing_load_bound": 1.5, "routing_min_bound": 4,
    "routing_requests_per_replica": 3, "routing_spread_interval_s": 0.5, "routing_policy": "round-robin",
    "initial_adapters": {"a": "/x", "b": "/y=z"}, "overlap_loading": False, "pipelined_loads": True, "admit_landing_loads": False,
    "pause_tokens_ratio": math.inf, "max_pauses_per_request": 0, "max_forwards_in_flight": 1, "prefetch": False,
    "max_batch_tokens": 64, "max_running_requests": 4, "max_queued_requests": 0, "max_draining_slots": 2,
    "drain_after_s": 0.0, "adapter_root": "/adapters", "registry_file": "/r.json",
    "log_level": "debug", "log_format": "json",
    "replicas": 2, "log_file": "/l.log", "startup_timeout_s": 10.0, "max_restarts": 0, "restart_window_s": 1.0,
}
ALL_FIELDS = [(part, field) for part in PARTS.values() for field in dataclasses.fields(part)]


def parser_of(config_type: type, *, serve: bool = False) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(exit_on_error=False)
    add_arguments(parser, config_type, serve=serve)
    return parser


def test_every_field_has_a_non_default_value_here_and_a_unique_flag():
    assert sorted(NON_DEFAULTS) == sorted(field.name for _, field in ALL_FIELDS)
    parser = argparse.ArgumentParser()
    for part in PARTS.values():
        add_arguments(parser, part)  # argparse refuses a flag declared twice


# What a field needs beside it: a required field, or a check between fields.
COMPANIONS = {"tls_cert": {"tls_key": "/k"}, "tls_key": {"tls_cert": "/c"},
              "tls_client_ca": {"tls_cert": "/c", "tls_key": "/k"}, "lora_fold": {"max_lora_rank": 16}}


def required_of(config_type: type) -> dict:
    return {"model_path": "/m"} if config_type is EngineConfig else {}


@pytest.mark.parametrize("config_type", PARTS.values(), ids=lambda part: part.__name__)
def test_the_generated_flags_round_trip_every_field(config_type):
    parser = parser_of(config_type)
    every_field = config_type(**{field.name: NON_DEFAULTS[field.name] for field in dataclasses.fields(config_type)})
    assert config_from_args(parser, config_type, parser.parse_args(to_argv(every_field))) == every_field
    for field in dataclasses.fields(config_type):  # each flag alone rebuilds its field
        alone = config_type(**required_of(config_type) | COMPANIONS.get(field.name, {})
                            | {field.name: NON_DEFAULTS[field.name]})
        assert config_from_args(parser, config_type, parser.parse_args(to_argv(alone))) == alone


def test_a_default_is_left_out_of_the_argv():
    assert to_argv(EngineConfig(model_path="/m")) == ["--model-path", "/m"]
    assert to_argv(SchedulerConfig()) == to_argv(FrontendConfig()) == []


def test_loraserve_serve_flags_round_trip_every_setting_it_has():
    config = ServeConfig.of(**{name: value for name, value in NON_DEFAULTS.items() if name != "registry_file"})
    argv = [word for part in PARTS for word in to_argv(getattr(config, part))]
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    assert serve_config_from_args(parser, parser.parse_args(argv)) == config


def test_only_launcher_set_fields_are_left_out_of_loraserve_serve():
    assert [field.name for _, field in ALL_FIELDS if not spec_of(field).serve] == ["registry_file"]


def test_every_boolean_has_a_switch_for_its_non_default_value():
    for _, field in ALL_FIELDS:
        if isinstance(field.default, bool):
            assert any(switch.value is not field.default for switch in spec_of(field).switches.values()), field.name


def test_flags_kept_from_before_the_settings_package():
    serve = argparse.ArgumentParser()
    add_serve_arguments(serve)
    config = serve_config_from_args(serve, serve.parse_args([
        "--model-path", "/m", "--host-cache-gb", "0.5", "--load-format", "auto", "--disable-overlap-schedule",
        "--disable-lora-overlap-loading", "--disable-mixed-graphs", "--served-model-name", "x", "--no-prefetch"]))
    assert config.engine.host_cache_bytes == 512 << 20 and config.engine.load_format == "safetensors"
    assert not config.engine.static_mixed and config.frontend.model_name == "x"
    assert config.scheduler.max_forwards_in_flight == 1 and not config.scheduler.overlap_loading
    assert not config.scheduler.prefetch
    frontend = parser_of(FrontendConfig)
    assert config_from_args(frontend, FrontendConfig, frontend.parse_args(["--model-name", "y"])).model_name == "y"


def test_every_serve_flag_shows_help_and_its_default():
    serve = argparse.ArgumentParser()
    add_serve_arguments(serve)
    undocumented = [action.option_strings[0] for action in serve._actions
                    if action.dest != "help" and "(default: " not in (action.help or "")]
    assert undocumented == []


def test_max_model_len_is_the_context_length():
    serve = argparse.ArgumentParser()
    add_serve_arguments(serve)
    config = serve_config_from_args(serve, serve.parse_args(["--model-path", "/m", "--max-model-len", "512"]))
    assert config.engine.context_length == 512
    assert context_length(config.engine, model_positions=4096) == 512
    assert context_length(dataclasses.replace(config.engine, context_length=None), model_positions=4096) == 4096


def test_a_context_length_beyond_the_models_is_refused(tmp_path):
    model = build_tiny_model(tmp_path / "model", "llama3", seed=1)
    with pytest.raises(ModelLoadError, match=f"--context-length {MAX_POSITIONS + 1} exceeds"):
        make_engine(model, context_length=MAX_POSITIONS + 1)
    assert make_engine(model, context_length=MAX_POSITIONS).config.context_length == MAX_POSITIONS


@pytest.mark.parametrize("config_type, argv, message", [
    (EngineConfig, ["--model-path", "/m", "--page-size", "0"], "page_size must be 1 or more"),
    (EngineConfig, ["--model-path", "/m", "--device", "tpu"], "invalid choice"),
    (SchedulerConfig, ["--pause-tokens-ratio", "nan"], "pause_tokens_ratio must exceed 1"),
    (SchedulerConfig, ["--lora-paths", "a"], "expected NAME=VALUE"),
    (FrontendConfig, ["--tls-cert", "/c"], "--tls-key go together"),
])
def test_bad_values_are_argparse_errors(config_type, argv, message, capsys):
    parser = argparse.ArgumentParser()
    add_arguments(parser, config_type)
    with pytest.raises(SystemExit):
        config_from_args(parser, config_type, parser.parse_args(argv))
    assert message in capsys.readouterr().err


def test_the_readme_flag_table_is_the_generated_one():
    readme = (ROOT / "README.md").read_text()
    assert markdown_table() in readme, "run `python -m settings.flags --markdown` and paste it into README.md"


def test_serve_config_replace_finds_each_setting_in_its_part():
    config = ServeConfig.of(model_path="/m").replace(port=1, max_batch_tokens=2, page_size=4, max_restarts=0)
    assert (config.frontend.port, config.scheduler.max_batch_tokens, config.engine.page_size) == (1, 2, 4)
    assert config.deployment.max_restarts == 0
    with pytest.raises(TypeError, match="no such setting: slow_loads"):
        config.replace(slow_loads={"a": 1.0})


def imported_packages(path: Path) -> set[str]:
    """Top-level packages a module imports, at any depth of its code (lazy imports too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_settings_imports_no_process_package_nor_torch():
    for path in sorted((ROOT / "settings").glob("*.py")):
        assert not imported_packages(path) & {*PROCESS_PACKAGES, "torch"}, path.name


def test_only_the_launcher_and_cli_of_loraserve_import_process_packages():
    importers = {path.name for path in (ROOT / "loraserve").glob("*.py")
                 if imported_packages(path) & set(PROCESS_PACKAGES)}
    assert importers <= {"cli.py", "launcher.py"}
