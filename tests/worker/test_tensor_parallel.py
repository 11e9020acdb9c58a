"""Tensor-parallel engines on CPU (gloo): TP=2 and TP=4 against TP=1 and transformers + PEFT.

Each rank is a process that runs the same engine calls (as a worker group's ranks do); rank 0
writes the logits it saw. The tiny models have 4 attention heads and 2 KV heads, so TP=4
replicates KV heads. Phi-3's fused qkv_proj/gate_up_proj (weights and adapters) are split at load,
so each part shards as Llama's."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from tests import tp_group
from tests.driver import Driver, Request, make_resident
from tests.model_factory import STANDARD_ADAPTER_SPECS, build_adapter, build_tiny_model, spec_for
from tests.oracle import PeftOracle
from tests.worker.test_equivalence import LOGIT_ATOL, assert_matches_oracle, prompt
from worker.engine import Engine
from worker.errors import ModelLoadError
from worker.model.config import load_model_config
from worker.tensor_parallel import TensorParallel

ADAPTERS = ("all7_r16_a8", "qv_r8", "rank_alpha_pattern", "rslora_r4")
LATE_ADAPTER = "layer1_only"  # loaded while the others decode, into an evicted slot
ENGINE_SETTINGS = dict(dtype="float32", device="cpu", page_size=4, num_kv_pages=256, max_loras_per_batch=4,
                       max_lora_rank=32, host_cache_bytes=16 << 20)
CASES = [("llama", 2), ("llama3", 2), ("mistral", 2), ("qwen2", 2), ("qwen2-tied", 2), ("qwen3", 2),
         ("gemma2", 2), ("gemma3", 2), ("phi3", 2), ("llama3", 4), ("qwen3", 4), ("gemma3", 4), ("phi3", 4)]


@pytest.fixture(scope="module")
def tp_models(artifacts) -> dict[str, Path]:
    """The architectures, and Qwen2 with tied embeddings (its LM head is the split embedding, as Gemma's)."""
    models = {arch: build_tiny_model(artifacts / f"tp-{arch}", arch) for arch in ("llama", "llama3", "mistral",
                                                                                 "qwen2", "qwen3", "gemma2", "gemma3",
                                                                                 "phi3")}
    models["qwen2-tied"] = build_tiny_model(artifacts / "tp-qwen2-tied", "qwen2", tie_word_embeddings=True)
    return models


@pytest.fixture(scope="module")
def tp_adapters(artifacts, tp_models) -> dict[str, dict[str, Path]]:
    return {model: {name: build_adapter(path, artifacts / f"tp-{model}-{name}",
                                        spec_for(model, STANDARD_ADAPTER_SPECS[name]))
                    for name in (*ADAPTERS, LATE_ADAPTER)}
            for model, path in tp_models.items()}


def workload(engine: Engine, adapters: dict[str, Path]) -> list[Request]:
    """Four adapters of different ranks, targets and scalings with base requests in one batch; then
    one adapter evicted and another loaded (not blocking) into its slot while the rest decode."""
    for name, path in adapters.items():
        engine.register_adapter(name, path)
    for slot, name in enumerate(ADAPTERS):
        make_resident(engine, name, slot)
    first = [Request("base", prompt(3, 17), max_new_tokens=5)]
    first += [Request(name, prompt(10 + slot, 6 + 5 * slot), adapter_slot=slot, max_new_tokens=4 + slot)
              for slot, name in enumerate(ADAPTERS)]
    Driver(engine, chunk=5).run(first)

    engine.evict_slot(3)
    engine.stage_adapter(LATE_ADAPTER)
    engine.load_adapter(LATE_ADAPTER, 3)
    driver = Driver(engine, chunk=4)
    driver._next_page = 128  # clear of the first batch's pages
    decoding = [Request("qv-during-load", prompt(30, 9), adapter_slot=1, max_new_tokens=6)]
    while not any(name == LATE_ADAPTER for name, _ in engine.poll().loaded):
        driver.step(decoding)
        time.sleep(0.01)
    late = [Request(LATE_ADAPTER, prompt(31, 11), adapter_slot=3, max_new_tokens=5)]
    driver.run(decoding + late)
    return first + decoding + late


def run_group(size: int, model_dir: Path, adapters: dict[str, Path], directory: Path) -> dict[str, Request]:
    """The workload's requests as rank 0 of a group of `size` saw them."""
    return tp_group.run_group(size, model_dir, adapters, directory, ENGINE_SETTINGS, workload)


def adapter_of(request_id: str) -> str | None:
    return {"base": None, "qv-during-load": "qv_r8"}.get(request_id, request_id)


@pytest.mark.parametrize(("model", "size"), CASES)
def test_tensor_parallel_matches_one_rank_and_peft(model, size, tp_models, tp_adapters, tmp_path):
    adapters = tp_adapters[model]
    reference = run_group(1, tp_models[model], adapters, tmp_path)
    sharded = run_group(size, tp_models[model], adapters, tmp_path)
    assert sharded.keys() == reference.keys()
    oracle = PeftOracle(tp_models[model], adapters)
    for request_id, request in sharded.items():
        assert request.generated == reference[request_id].generated, request_id
        torch.testing.assert_close(request.all_logits(), reference[request_id].all_logits(), atol=LOGIT_ATOL, rtol=0)
        assert_matches_oracle(oracle, request, adapter_of(request_id))


def test_a_group_size_that_does_not_divide_the_heads_is_refused(tp_models):
    with pytest.raises(ModelLoadError, match="--tensor-parallel-size 3 cannot split 4 attention heads"):
        TensorParallel(rank=0, size=3).check(load_model_config(tp_models["llama"]))
