"""Phi-3: fused qkv_proj/gate_up_proj checkpoints and adapters, LongRoPE, against transformers + PEFT.

The parameterised tests over `ARCHITECTURES` (equivalence, static decode, GPU) cover the Phi-3 model
with the mixed adapters; these add adapters of mixed ranks on every fused module in one batch in
float32 and bfloat16, every standard adapter spec in Phi-3's names, a LongRoPE whose attention
factor is not 1, tied and sharded checkpoints, and the refusals."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.driver import Driver, Request, make_engine, make_resident
from tests.model_factory import STANDARD_ADAPTER_SPECS, AdapterSpec, build_adapter, build_tiny_model, longrope, spec_for
from tests.oracle import PeftOracle
from tests.worker.test_equivalence import assert_matches_oracle, prompt
from worker.errors import InvalidAdapterError, ModelLoadError, UnsupportedAdapterError

FUSED = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
# Different ranks, scalings and modules in one batch; rank/alpha patterns keyed by fused names.
ADAPTERS = {
    "all_r8": AdapterSpec(rank=8, alpha=16, target_modules=FUSED, seed=41),
    "qkv_gate_up_r4_rslora": AdapterSpec(rank=4, alpha=8, target_modules=["qkv_proj", "gate_up_proj"],
                                         use_rslora=True, seed=42),
    "patterns_r16": AdapterSpec(rank=16, alpha=8, target_modules="all-linear",
                                rank_pattern={"model.layers.1.self_attn.qkv_proj": 2, "gate_up_proj": 12},
                                alpha_pattern={"down_proj": 32, "qkv_proj": 4}, seed=43),
}
# bfloat16 weights served in bfloat16 against the float32 reference on the same (rounded) weights.
HALF_ATOL = 0.05
LONG_CONTEXT_POSITIONS = 512  # the LongRoPE model's max_position_embeddings
ORIGINAL_POSITIONS = 256  # and its original_max_position_embeddings


def run_batch(engine, adapters: dict[str, Path]) -> list[Request]:
    """Every adapter and the base model in one batch of prompts of different lengths."""
    for slot, (name, path) in enumerate(adapters.items()):
        engine.register_adapter(name, path)
        make_resident(engine, name, slot)
    requests = [Request("base", prompt(50, 13), max_new_tokens=5)]
    requests += [Request(name, prompt(51 + slot, 6 + 7 * slot), adapter_slot=slot, max_new_tokens=4 + slot)
                 for slot, name in enumerate(adapters)]
    Driver(engine, chunk=5).run(requests)
    return requests


def adapter_name(request: Request) -> str | None:
    return None if request.request_id == "base" else request.request_id


@pytest.fixture(scope="module")
def phi3_bf16(artifacts) -> tuple[Path, dict[str, Path]]:
    model_dir = build_tiny_model(artifacts / "phi3-bf16", "phi3", dtype="bfloat16", seed=7)
    return model_dir, {name: build_adapter(model_dir, artifacts / f"phi3-bf16-{name}", spec)
                       for name, spec in ADAPTERS.items()}


@pytest.fixture(scope="module")
def phi3_adapters(artifacts, model_dirs) -> dict[str, Path]:
    return {name: build_adapter(model_dirs["phi3"], artifacts / f"phi3-{name}", spec)
            for name, spec in ADAPTERS.items()}


def test_fused_module_adapters_of_mixed_ranks_match_peft_in_float32(model_dirs, phi3_adapters):
    engine = make_engine(model_dirs["phi3"])
    requests = run_batch(engine, phi3_adapters)
    oracle = PeftOracle(model_dirs["phi3"], phi3_adapters)
    for request in requests:
        assert_matches_oracle(oracle, request, adapter_name(request))
    engine.close()


def test_fused_module_adapters_of_mixed_ranks_follow_peft_in_bfloat16(phi3_bf16):
    model_dir, adapters = phi3_bf16
    engine = make_engine(model_dir, dtype="auto")
    assert engine.dtype == torch.bfloat16
    requests = run_batch(engine, adapters)
    oracle = PeftOracle(model_dir, adapters)
    for request in requests:
        expected = oracle.logits(request.tokens[:-1], adapter_name(request))
        torch.testing.assert_close(request.all_logits(), expected, atol=HALF_ATOL, rtol=HALF_ATOL)
        oracle.assert_teacher_forced(request.prompt, request.generated, adapter_name(request), atol=HALF_ATOL)
    engine.close()


@pytest.mark.parametrize("spec_name", sorted(STANDARD_ADAPTER_SPECS))
def test_standard_adapter_specs_in_fused_names_match_peft(spec_name, model_dirs, artifacts):
    """Regex and all-linear targets, full paths, rank/alpha patterns, layers_to_transform, on fused modules."""
    model_dir = model_dirs["phi3"]
    spec = spec_for("phi3", STANDARD_ADAPTER_SPECS[spec_name])
    adapter_dir = build_adapter(model_dir, artifacts / f"phi3-spec-{spec_name}", spec)
    engine = make_engine(model_dir)
    engine.register_adapter(spec_name, adapter_dir)
    make_resident(engine, spec_name, slot=0)
    requests = [Request("r", prompt(57, 11), adapter_slot=0, max_new_tokens=3)]
    Driver(engine, chunk=4).run(requests)
    assert_matches_oracle(PeftOracle(model_dir, {spec_name: adapter_dir}), requests[0], spec_name)
    engine.close()


def test_the_api_reports_the_fused_modules_and_the_slots_hold_their_parts(model_dirs, phi3_adapters):
    engine = make_engine(model_dirs["phi3"])
    info = engine.register_adapter("all_linear", phi3_adapters["patterns_r16"])
    assert info.modules == frozenset(FUSED)
    assert engine.adapters["all_linear"].modules == frozenset(
        ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
    assert info.ranks == [2, 12, 16]
    engine.close()


def rewrite_config(adapter_dir: Path, **fields: object) -> None:
    path = adapter_dir / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(fields)
    path.write_text(json.dumps(config))


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], ["qkv_proj", "model.layers.0.mlp.gate_proj"]])
def test_llama_module_names_are_refused_naming_the_field(targets, model_dirs, artifacts):
    adapter_dir = build_adapter(model_dirs["phi3"], artifacts / f"phi3-llama-names-{len(targets)}",
                                AdapterSpec(target_modules=["qkv_proj"], seed=44))
    rewrite_config(adapter_dir, target_modules=targets)
    engine = make_engine(model_dirs["phi3"])
    with pytest.raises(UnsupportedAdapterError, match="target_modules") as refused:
        engine.register_adapter("llama_names", adapter_dir)
    assert isinstance(refused.value, InvalidAdapterError)  # INVALID_ARGUMENT
    assert "Phi3ForCausalLM does not have" in str(refused.value)
    assert "qkv_proj, o_proj, gate_up_proj, down_proj" in str(refused.value)
    engine.close()


def test_unset_target_modules_are_refused_as_peft_has_no_phi3_default(model_dirs, artifacts):
    adapter_dir = build_adapter(model_dirs["phi3"], artifacts / "phi3-no-targets",
                                AdapterSpec(target_modules=["qkv_proj"], seed=45))
    rewrite_config(adapter_dir, target_modules=None)
    engine = make_engine(model_dirs["phi3"])
    with pytest.raises(UnsupportedAdapterError, match="target_modules is unset"):
        engine.register_adapter("no_targets", adapter_dir)
    engine.close()


def test_fused_names_are_refused_on_a_llama_model(model_dirs, artifacts):
    """The mirror case: an adapter naming Phi-3's modules is for another model."""
    adapter_dir = build_adapter(model_dirs["llama"], artifacts / "llama-fused-names", AdapterSpec(seed=46))
    rewrite_config(adapter_dir, target_modules=["qkv_proj"])
    engine = make_engine(model_dirs["llama"])
    with pytest.raises(UnsupportedAdapterError, match=r"target_modules \['qkv_proj'\] name modules LlamaForCausalLM"):
        engine.register_adapter("fused_names", adapter_dir)
    engine.close()


@pytest.fixture(scope="module")
def long_context_phi3(artifacts) -> Path:
    """Phi-3 128k's shape: max_position_embeddings twice original_max_position_embeddings, so
    transformers' LongRoPE attention factor is sqrt(1 + ln 2 / ln 256), not 1."""
    return build_tiny_model(artifacts / "phi3-long", "phi3", seed=8, max_position_embeddings=LONG_CONTEXT_POSITIONS,
                            original_max_position_embeddings=ORIGINAL_POSITIONS,
                            rope_parameters=longrope(ORIGINAL_POSITIONS))


def test_longrope_within_the_original_context_matches_transformers(long_context_phi3, artifacts):
    adapter_dir = build_adapter(long_context_phi3, artifacts / "phi3-long-adapter",
                                AdapterSpec(target_modules=FUSED, seed=47))
    engine = make_engine(long_context_phi3, context_length=ORIGINAL_POSITIONS)
    expected_factor = math.sqrt(1 + math.log(LONG_CONTEXT_POSITIONS / ORIGINAL_POSITIONS) / math.log(ORIGINAL_POSITIONS))
    assert engine.model.ropes[None].attention_scaling == pytest.approx(expected_factor)
    requests = run_batch(engine, {"fused": adapter_dir})
    oracle = PeftOracle(long_context_phi3, {"fused": adapter_dir})
    for request in requests:
        assert_matches_oracle(oracle, request, adapter_name(request))
    engine.close()


@pytest.mark.parametrize("context_length", [None, ORIGINAL_POSITIONS + 1])
def test_a_context_past_the_longrope_original_is_refused(context_length, long_context_phi3):
    served = LONG_CONTEXT_POSITIONS if context_length is None else context_length
    with pytest.raises(ModelLoadError) as refused:
        make_engine(long_context_phi3, context_length=context_length)
    message = str(refused.value)
    assert f"served context ({served} tokens" in message
    assert f"original_max_position_embeddings ({ORIGINAL_POSITIONS})" in message
    assert f"--context-length {ORIGINAL_POSITIONS} or less" in message


def test_a_partial_rotary_factor_is_refused(artifacts):
    model_dir = build_tiny_model(artifacts / "phi3-partial", "phi3", seed=9)
    config_path = model_dir / "config.json"
    config = json.loads(config_path.read_text())
    rope = config["rope_parameters"]
    # transformers wants a factor per rotated frequency pair: half of them at 0.5.
    rope.update(partial_rotary_factor=0.5, short_factor=rope["short_factor"][:4], long_factor=rope["long_factor"][:4])
    config_path.write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=r"partial_rotary_factor 0\.5 is not supported"):
        make_engine(model_dir)


@pytest.mark.parametrize("variant", ["tied", "sharded"])
def test_checkpoint_variants_match_transformers(variant, artifacts):
    """Sharded: the fused tensors are read by the index like any other."""
    model_dir = build_tiny_model(artifacts / f"phi3-{variant}", "phi3", tie_word_embeddings=variant == "tied",
                                 shard=variant == "sharded", seed=10)
    engine = make_engine(model_dir)
    requests = [Request("r", prompt(58, 13), max_new_tokens=4)]
    Driver(engine, chunk=13).run(requests)
    assert_matches_oracle(PeftOracle(model_dir, {}), requests[0], None)
    engine.close()


@pytest.mark.parametrize("damage", ["missing", "misshapen"])
def test_a_damaged_fused_tensor_is_refused_by_its_checkpoint_name(damage, artifacts):
    model_dir = build_tiny_model(artifacts / f"phi3-{damage}", "phi3", seed=11)
    path = model_dir / "model.safetensors"
    tensors = load_file(path)
    name = "model.layers.1.self_attn.qkv_proj.weight"
    if damage == "missing":
        del tensors[name]
    else:
        tensors[name] = tensors[name][:-16]
    save_file(tensors, path, metadata={"format": "pt"})
    expected = ("is missing 1 tensors, e.g. ['model.layers.1.self_attn.qkv_proj.weight']" if damage == "missing"
                else "has shape (112, 64), config expects (128, 64)")
    with pytest.raises(ModelLoadError) as refused:
        make_engine(model_dir)
    assert expected in str(refused.value)
