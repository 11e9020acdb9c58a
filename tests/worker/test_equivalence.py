"""The engine against transformers (+ PEFT) on the same files, in float32 on CPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.driver import Driver, Request, make_engine, make_resident
from tests.model_factory import ARCHITECTURES, STANDARD_ADAPTER_SPECS, build_adapter, build_tiny_model
from tests.oracle import PeftOracle
from worker.engine import Engine

LOGIT_ATOL = 2e-4  # float32; observed differences are around 1e-6


def prompt(seed: int, length: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, 200, (length,), generator=generator).tolist()


def assert_matches_oracle(oracle: PeftOracle, request: Request, adapter: str | None) -> None:
    fed = request.tokens[:-1]  # the last sampled token is never fed back
    expected = oracle.logits(fed, adapter)
    torch.testing.assert_close(request.all_logits(), expected, atol=LOGIT_ATOL, rtol=0)
    oracle.assert_teacher_forced(request.prompt, request.generated, adapter, atol=LOGIT_ATOL)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_base_model_matches_transformers(arch, model_dirs):
    engine = make_engine(model_dirs[arch])
    oracle = PeftOracle(model_dirs[arch], {})
    requests = [Request("long", prompt(1, 23), max_new_tokens=5), Request("short", prompt(2, 3), max_new_tokens=8)]
    Driver(engine, chunk=6).run(requests)
    for request in requests:
        assert_matches_oracle(oracle, request, None)
    engine.close()


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_mixed_adapter_batch_matches_peft(arch, model_dirs, mixed_adapter_dirs):
    engine = make_engine(model_dirs[arch])
    serve_mixed_batch_as_peft(engine, model_dirs[arch], mixed_adapter_dirs[arch])
    engine.close()


def serve_mixed_batch_as_peft(engine: Engine, model_dir: Path, adapters: dict[str, Path]) -> None:
    """[base, a0, a1, a0] with prompts of different lengths: prefill chunks and decodes mix; each
    request's logits are PEFT's."""
    for name, path in adapters.items():
        engine.register_adapter(name, path)
    make_resident(engine, "a0", slot=3)
    make_resident(engine, "a1", slot=1)
    slot_names = {3: "a0", 1: "a1", -1: None}
    requests = [
        Request("base", prompt(3, 17), adapter_slot=-1, max_new_tokens=6),
        Request("a0-long", prompt(4, 26), adapter_slot=3, max_new_tokens=4),
        Request("a1", prompt(5, 4), adapter_slot=1, max_new_tokens=9),
        Request("a0-short", prompt(6, 9), adapter_slot=3, max_new_tokens=7),
    ]
    Driver(engine, chunk=5).run(requests)
    oracle = PeftOracle(model_dir, adapters)
    for request in requests:
        assert_matches_oracle(oracle, request, slot_names[request.adapter_slot])


@pytest.mark.parametrize("spec_name", sorted(STANDARD_ADAPTER_SPECS))
def test_adapter_shapes_match_peft(spec_name, model_dirs, artifacts):
    """Ranks, alphas, rslora, regex/all-linear targets, rank/alpha patterns, fan_in_fan_out."""
    model_dir = model_dirs["llama3"]
    adapter_dir = build_adapter(model_dir, artifacts / f"spec-{spec_name}", STANDARD_ADAPTER_SPECS[spec_name])
    engine = make_engine(model_dir)
    engine.register_adapter(spec_name, adapter_dir)
    make_resident(engine, spec_name, slot=0)
    requests = [Request("r", prompt(7, 11), adapter_slot=0, max_new_tokens=3)]
    Driver(engine, chunk=4).run(requests)
    oracle = PeftOracle(model_dir, {spec_name: adapter_dir})
    assert_matches_oracle(oracle, requests[0], spec_name)
    engine.close()


@pytest.mark.parametrize("variant", ["tied", "sharded"])
def test_checkpoint_variants_match_transformers(variant, artifacts):
    model_dir = build_tiny_model(
        artifacts / f"variant-{variant}", "qwen2",
        tie_word_embeddings=variant == "tied", shard=variant == "sharded", seed=5,
    )
    engine = make_engine(model_dir)
    requests = [Request("r", prompt(8, 13), max_new_tokens=4)]
    Driver(engine, chunk=13).run(requests)
    assert_matches_oracle(PeftOracle(model_dir, {}), requests[0], None)
    engine.close()


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_serving_follows_the_reference(dtype, artifacts):
    """A half-precision checkpoint served in its dtype agrees with the float32 reference."""
    model_dir = build_tiny_model(artifacts / f"half-{dtype}", "llama", dtype=dtype, seed=6)
    engine = make_engine(model_dir, dtype="auto")
    assert engine.dtype == getattr(torch, dtype)
    requests = [Request("r", prompt(9, 15), max_new_tokens=6)]
    Driver(engine, chunk=7).run(requests)
    oracle = PeftOracle(model_dir, {})
    expected = oracle.logits(requests[0].tokens[:-1], None)
    torch.testing.assert_close(requests[0].all_logits(), expected, atol=0.05, rtol=0.05)
    oracle.assert_teacher_forced(requests[0].prompt, requests[0].generated, None, atol=0.05)
    engine.close()
