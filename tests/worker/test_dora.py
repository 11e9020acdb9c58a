"""DoRA adapters batched beside plain LoRA adapters and base requests, against PEFT."""

from __future__ import annotations

import time

import pytest
import torch

import worker.lora.slots
from settings.config import EngineConfig
from tests.conftest import DORA_ARCHS
from tests.driver import Driver, Request, forward_paths, make_engine, make_resident, shared_host_memory_file
from tests.oracle import PeftOracle
from tests.worker.test_equivalence import assert_matches_oracle, prompt
from worker.engine import Engine
from worker.errors import UnsupportedAdapterError
from worker.lora.adapter import read_adapter_manifest
from worker.lora.dora import dora_scale_and_shift
from worker.model.config import load_model_config
from worker.tensor_parallel import TensorParallel

SLOTS = {"dora_qv": 0, "plain": 1, "dora_rslora": 2, "dora_mixed": 3}  # every adapter of DORA_MIX_ADAPTERS
LANDING = "dora_rslora"  # loaded without blocking, slowly, while the batch runs


def slow_layers(name: str, slot: int, layer: int) -> None:
    time.sleep(0.02)


def run_mixed_batch(model_dir, adapters, *, static: bool, **settings) -> tuple[Engine, list[Request]]:
    """Every adapter and the base model in one batch; `LANDING` still loading as it starts."""
    engine = make_engine(model_dir, static_decode=static, **settings)
    engine.copier.hook = slow_layers
    for name, path in adapters.items():
        engine.register_adapter(name, path)
    for name, slot in SLOTS.items():
        if name != LANDING:
            make_resident(engine, name, slot)
    engine.load_adapter(LANDING, SLOTS[LANDING])  # not staged yet: read from disk as it lands
    assert SLOTS[LANDING] in engine.pending  # the forwards wait for it layer by layer
    requests = [Request("base", prompt(30, 9), max_new_tokens=5)]
    requests += [Request(name, prompt(31 + slot, 7 + 3 * slot), adapter_slot=slot, max_new_tokens=4 + slot)
                 for name, slot in SLOTS.items()]
    Driver(engine, chunk=5).run(requests)
    while engine.busy_loading:
        engine.poll()
    return engine, requests


def check_against_peft(model_dir, adapters, requests: list[Request]) -> None:
    oracle = PeftOracle(model_dir, adapters)
    for request in requests:
        assert_matches_oracle(oracle, request, None if request.request_id == "base" else request.request_id)


@pytest.mark.parametrize("static", [False, True], ids=["eager", "static"])
@pytest.mark.parametrize("arch", DORA_ARCHS)
def test_dora_and_lora_batch_matches_peft(arch, static, model_dirs, dora_adapter_dirs):
    engine, requests = run_mixed_batch(model_dirs[arch], dora_adapter_dirs[arch], static=static)
    check_against_peft(model_dirs[arch], dora_adapter_dirs[arch], requests)
    paths = set(forward_paths(engine))
    assert ("eager" not in paths) if static else (paths == {"eager"}), paths
    engine.close()


def _without_bias_correction(weight, bias, a, b_t, magnitude):
    """The bias rescaled with the rest of the output."""
    return dora_scale_and_shift(weight, None, a, b_t, magnitude)


def _without_magnitude(weight, bias, a, b_t, magnitude):
    """g = 1: DoRA served as plain LoRA."""
    norms = torch.linalg.vector_norm(weight.float() + b_t.float().t() @ a.float(), dim=1)
    return dora_scale_and_shift(weight, bias, a, b_t, norms)


@pytest.mark.parametrize("arch, mutation", [("qwen2", _without_bias_correction), ("llama", _without_magnitude)],
                         ids=["bias-rescaled-too", "magnitude-ignored"])
def test_a_wrong_dora_scale_fails_the_comparison(arch, mutation, model_dirs, dora_adapter_dirs, monkeypatch):
    """The comparison above is sharp enough to catch a plausible mistake in g or the bias."""
    monkeypatch.setattr(worker.lora.slots, "dora_scale_and_shift", mutation)
    engine, requests = run_mixed_batch(model_dirs[arch], dora_adapter_dirs[arch], static=False)
    engine.close()
    with pytest.raises(AssertionError):
        check_against_peft(model_dirs[arch], dora_adapter_dirs[arch], requests)


@pytest.mark.parametrize("second", ["plain", "dora_mixed"])
def test_a_slot_reused_after_dora_keeps_none_of_its_scales(second, model_dirs, dora_adapter_dirs):
    """An adapter loaded where a DoRA one (of every module) was must not keep its scales:
    neither a plain one, nor a DoRA one of fewer modules; a DoRA adapter in another slot makes
    the batch read every slot's scales."""
    model_dir, adapters = model_dirs["qwen2"], dora_adapter_dirs["qwen2"]
    engine = make_engine(model_dir, max_loras_per_batch=2)
    for name in ("dora_rslora", "dora_qv", second):
        engine.register_adapter(name, adapters[name])
    make_resident(engine, "dora_rslora", 0)
    engine.evict_slot(0)
    make_resident(engine, second, 0)
    make_resident(engine, "dora_qv", 1)
    requests = [Request(second, prompt(50, 6), adapter_slot=0, max_new_tokens=3),
                Request("dora_qv", prompt(51, 5), adapter_slot=1, max_new_tokens=3)]
    Driver(engine).run(requests)
    engine.close()
    check_against_peft(model_dir, {name: adapters[name] for name in (second, "dora_qv")}, requests)


def test_dora_bytes_include_the_magnitudes(model_dirs, dora_adapter_dirs):
    model = load_model_config(model_dirs["llama"])
    manifest = read_adapter_manifest(dora_adapter_dirs["llama"]["dora_qv"], model, 32)
    shapes = model.module_shapes()
    expected = sum(8 * sum(shapes[m]) + shapes[m][1] for m in ("q_proj", "v_proj")) * model.num_layers * 4
    assert manifest.dora and manifest.nbytes(model, 4) == expected


def test_dora_is_refused_with_tensor_parallelism(model_dirs, dora_adapter_dirs, tmp_path):
    config = EngineConfig(model_path=str(model_dirs["llama"]), dtype="float32", device="cpu", page_size=4,
                          num_kv_pages=16, max_lora_rank=32, host_cache_bytes=1 << 20)
    host_memory = shared_host_memory_file(tmp_path / "host-memory", config, ranks=2)
    engine = Engine(config, tp=TensorParallel(rank=0, size=2, host_memory=host_memory))
    engine.register_adapter("plain", dora_adapter_dirs["llama"]["plain"])
    with pytest.raises(UnsupportedAdapterError, match="DoRA.*tensor parallelism"):
        engine.register_adapter("dora", dora_adapter_dirs["llama"]["dora_qv"])
    engine.close()
