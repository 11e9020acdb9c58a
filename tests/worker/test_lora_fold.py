"""LoRA folded into the base GEMMs (`--lora-fold`, `worker.lora.folded`) against transformers + PEFT,
in float32 on CPU: the torch readers add `FoldedDeltas.dense()`, the kernels' reference."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests import tp_group
from tests.driver import Driver, Request, forward_paths, make_engine, make_resident
from tests.model_factory import (
    ARCHITECTURES,
    STANDARD_ADAPTER_SPECS,
    build_adapter,
    build_dora_adapter,
    build_tiny_model,
)
from tests.oracle import PeftOracle
from tests.worker import test_tensor_parallel as tensor_parallel
from tests.worker.test_equivalence import assert_matches_oracle, prompt, serve_mixed_batch_as_peft
from worker.errors import UnsupportedAdapterError
from worker.kernels.staged_deltas import FoldedDeltas


def folded_engine(model_dir, **overrides):
    return make_engine(model_dir, lora_fold=True, max_lora_rank=16, **overrides)


# Every family on the static path (what a server runs), the eager one on families that differ in
# the layer: Qwen2's q/k/v biases (zeros past the base rows) and Gemma 2's sandwich norms.
CASES = [(arch, "static") for arch in ARCHITECTURES] + [(arch, "eager") for arch in ("llama3", "qwen2", "gemma2")]


@pytest.mark.parametrize("arch,path", CASES)
def test_folded_mixed_adapter_batch_matches_peft(arch, path, model_dirs, mixed_adapter_dirs):
    """A rank-8 adapter of q and v (its other rows zero-padded to the fold's rank 16) and a rank-16
    adapter of every module, beside the base model: prompts and decodes."""
    engine = folded_engine(model_dirs[arch], static_decode=path == "static")
    serve_mixed_batch_as_peft(engine, model_dirs[arch], mixed_adapter_dirs[arch])
    assert set(forward_paths(engine)) == {path}
    engine.close()


def test_folded_slots_hold_a_in_the_base_weights(model_dirs):
    """The slots' A of a folded module is the rows below its fused weight: no second copy."""
    engine = folded_engine(model_dirs["llama3"])
    layer = engine.model.weights.layers[1]
    q_rows = engine.model_config.num_heads * engine.model_config.head_dim
    folded_qkv = engine.slots.folded_operands(1, ("q_proj", "k_proj", "v_proj"))[0]
    assert folded_qkv.data_ptr() == layer.qkv.data_ptr()
    assert folded_qkv.shape[0] == layer.qkv.shape[0] + 3 * 4 * 16  # q, k, v x 4 slots x rank 16
    first_a_row = folded_qkv[layer.qkv.shape[0]]
    assert engine.slots.a["q_proj"][1, 0, 0].data_ptr() == first_a_row.data_ptr()
    assert engine.slots.a["k_proj"][1, 0, 0].data_ptr() == folded_qkv[layer.qkv.shape[0] + 4 * 16].data_ptr()
    assert layer.qkv.shape[0] > q_rows
    engine.close()


def test_lora_fold_refuses_what_it_cannot_serve(model_dirs, artifacts):
    model_dir = model_dirs["llama3"]
    with pytest.raises(ValueError, match="--lora-fold serves adapters up to rank 16"):
        make_engine(model_dir, lora_fold=True, max_lora_rank=32)
    with pytest.raises(ValueError, match="folds whole module groups .* give all of q_proj, k_proj, v_proj"):
        folded_engine(model_dir, lora_target_modules=("q_proj", "v_proj"))
    engine = folded_engine(model_dir)
    with pytest.raises(UnsupportedAdapterError, match=r"DoRA adapter \(use_dora\), which --lora-fold does not serve"):
        engine.register_adapter("dora", build_dora_adapter(model_dir, artifacts / "fold-dora"))
    engine.close()


def test_only_steps_with_a_prompt_and_adapters_fold(model_dirs, mixed_adapter_dirs, monkeypatch):
    """A base-model step's GEMMs take W's own rows (the fold costs it nothing), and so do decode
    steps, whose LoRA kernels cost less than folding (docs/performance.md)."""
    engine = folded_engine(model_dirs["llama3"])
    engine.register_adapter("a1", mixed_adapter_dirs["llama3"]["a1"])
    make_resident(engine, "a1", slot=0)
    weights = []
    linear = torch.nn.functional.linear
    monkeypatch.setattr(torch.nn.functional, "linear",
                        lambda x, w, b=None: weights.append((w.data_ptr(), w.shape)) or linear(x, w, b))
    Driver(engine, chunk=8).run([Request("base", prompt(8, 5), adapter_slot=-1, max_new_tokens=2)])
    folded = {(w.data_ptr(), w.shape) for w, _ in (engine.slots.folded_operands(layer, group)
                                                     for layer in range(engine.model_config.num_layers)
                                                     for group in engine.slots.folded.groups)}
    assert weights and not folded & set(weights)
    weights.clear()
    Driver(engine, chunk=8).run([Request("a1", prompt(9, 5), adapter_slot=0, max_new_tokens=4)])
    assert folded <= set(weights)
    # Only the step carrying the prompt folds: the decode steps after it run the LoRA kernels.
    assert sum(w in folded for w in weights) == len(folded)
    engine.close()


@pytest.fixture(scope="module")
def tp_fold_models(artifacts) -> dict[str, Path]:
    return {arch: build_tiny_model(artifacts / f"fold-tp-{arch}", arch) for arch in ("llama3", "qwen2", "gemma3")}


@pytest.mark.parametrize("arch", ["llama3", "qwen2", "gemma3"])
def test_folded_tensor_parallel_matches_one_rank_and_peft(arch, tp_fold_models, artifacts, tmp_path):
    """TP=2 on gloo: o and down's shrunk columns are partial sums that their output's all-reduce
    sums too; the tensor-parallel test's workload (ranks 2 to 16, a load while others decode)."""
    model_dir = tp_fold_models[arch]
    adapters = {name: build_adapter(model_dir, artifacts / f"fold-tp-{arch}-{name}", STANDARD_ADAPTER_SPECS[name])
                for name in (*tensor_parallel.ADAPTERS, tensor_parallel.LATE_ADAPTER)}
    settings = {**tensor_parallel.ENGINE_SETTINGS, "lora_fold": True, "max_lora_rank": 16}
    reference = tp_group.run_group(1, model_dir, adapters, tmp_path, settings, tensor_parallel.workload)
    sharded = tp_group.run_group(2, model_dir, adapters, tmp_path, settings, tensor_parallel.workload)
    assert sharded.keys() == reference.keys()
    oracle = PeftOracle(model_dir, adapters)
    for request_id, request in sharded.items():
        assert request.generated == reference[request_id].generated, request_id
        assert_matches_oracle(oracle, request, tensor_parallel.adapter_of(request_id))


def test_a_row_reads_only_its_own_slots_shrunk_columns():
    """Another slot's columns may hold anything (its A copied during the GEMM): no NaN reaches a row."""
    shrunk = torch.full((3, 2 * 16), float("nan"))
    shrunk[0, :16] = 1.0  # row 0: slot 0
    shrunk[1, 16:] = 2.0  # row 1: slot 1
    b_t = torch.ones(2, 16, 4)
    deltas = FoldedDeltas(shrunk, (b_t,), torch.zeros(1, 4, dtype=torch.long), 16, torch.tensor([0, 1, -1]))
    torch.testing.assert_close(deltas.dense(), torch.tensor([[16.0] * 4, [32.0] * 4, [0.0] * 4]))
