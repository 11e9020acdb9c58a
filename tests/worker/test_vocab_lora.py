"""LoRA on embed_tokens and lm_head, batched with plain LoRA adapters and base requests, against PEFT."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig

import worker.lora.slots
from settings.config import EngineConfig
from tests import model_factory as factory
from tests.conftest import VOCAB_ADAPTERS, VOCAB_MODELS
from tests.driver import (Driver, Request, forward_paths, make_engine, make_resident, serve_alone,
                          shared_host_memory_file)
from tests.model_factory import AdapterSpec, build_adapter, build_tiny_model
from tests.oracle import PeftOracle
from tests.tp_group import run_group
from tests.worker.test_equivalence import LOGIT_ATOL, assert_matches_oracle, prompt
from worker.engine import Engine
from worker.errors import AdapterShapeError, UnsupportedAdapterError
from worker.lora.slots import LoraSlots
from worker.model.config import load_model_config
from worker.tensor_parallel import TensorParallel

ALL7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SLOTS = {name: slot for slot, name in enumerate(VOCAB_ADAPTERS)}
LANDING = "both"  # loaded without blocking, slowly, while the batch runs
HALF_ATOL = 0.05  # bfloat16 against the float32 reference, as tests/worker/test_equivalence.py


def slow_layers(name: str, slot: int, layer: int) -> None:
    time.sleep(0.02)


def requests_for(adapters, slots: dict[str, int] = SLOTS) -> list[Request]:
    requests = [Request("base", prompt(60, 9), max_new_tokens=5)]
    return requests + [Request(name, prompt(61 + slot, 6 + 3 * slot), adapter_slot=slot, max_new_tokens=4 + slot)
                       for name, slot in slots.items() if name in adapters]


def run_mixed_batch(model_dir, adapters, *, static: bool, slots: dict[str, int] = SLOTS, landing: str = LANDING,
                    **settings) -> tuple[Engine, list[Request]]:
    """Every adapter and the base model in one batch; `landing` still loading (from disk, layer by
    layer) as it starts, so the forwards wait on its per-layer events: the embedding's (LoRA or
    table) on layer 0's, the LM head's on the last layer's."""
    engine = make_engine(model_dir, static_decode=static, **settings)
    engine.copier.hook = slow_layers
    for name, path in adapters.items():
        engine.register_adapter(name, path)
    for name, slot in slots.items():
        if name != landing:
            make_resident(engine, name, slot)
    engine.load_adapter(landing, slots[landing])
    assert slots[landing] in engine.pending
    requests = requests_for(adapters, slots)
    Driver(engine, chunk=5).run(requests)
    while engine.busy_loading:
        engine.poll()
    return engine, requests


def check_against_peft(model_dir, adapters, requests: list[Request], *, atol: float = LOGIT_ATOL) -> None:
    oracle = PeftOracle(model_dir, adapters)
    for request in requests:
        adapter = None if request.request_id == "base" else request.request_id
        if atol == LOGIT_ATOL:
            assert_matches_oracle(oracle, request, adapter)
            continue
        expected = oracle.logits(request.tokens[:-1], adapter)
        torch.testing.assert_close(request.all_logits(), expected, atol=atol, rtol=atol)
        oracle.assert_teacher_forced(request.prompt, request.generated, adapter, atol=atol)


@pytest.mark.parametrize("static", [False, True], ids=["eager", "static"])
@pytest.mark.parametrize("model", sorted(VOCAB_MODELS))
def test_vocab_lora_batch_matches_peft(model, static, vocab_models, vocab_adapters):
    engine, requests = run_mixed_batch(vocab_models[model], vocab_adapters[model], static=static)
    check_against_peft(vocab_models[model], vocab_adapters[model], requests)
    paths = forward_paths(engine)
    assert "static-waiting" in paths if static else set(paths) == {"eager"}, paths
    engine.close()


def test_the_adapters_change_the_logits(vocab_models, vocab_adapters):
    """The comparisons above are not trivial: each vocabulary LoRA moves the logits well past the tolerance."""
    model_dir, adapters = vocab_models["llama"], vocab_adapters["llama"]
    oracle = PeftOracle(model_dir, adapters)
    tokens = prompt(70, 12)
    base = oracle.logits(tokens, None)
    for name in ("embed", "head", "both"):
        assert (oracle.logits(tokens, name) - base).abs().max() > 100 * LOGIT_ATOL, name


def _no_embedding_delta(self, ids, inside, token_slots):
    return torch.zeros(ids.shape[0], self.vocab_b_t["embed_tokens"].shape[-1], dtype=self.vocab_a["embed_tokens"].dtype)


_LM_HEAD_DELTA = LoraSlots.lm_head_delta


def _lm_head_delta_doubled(self, hidden, row_slots):
    return 2 * _LM_HEAD_DELTA(self, hidden, row_slots)


@pytest.mark.parametrize("method, mutation", [("embedding_delta", _no_embedding_delta),
                                              ("lm_head_delta", _lm_head_delta_doubled)],
                         ids=["embedding-delta-dropped", "lm-head-delta-doubled"])
def test_a_wrong_vocab_delta_fails_the_comparison(method, mutation, vocab_models, vocab_adapters, monkeypatch):
    monkeypatch.setattr(worker.lora.slots.LoraSlots, method, mutation)
    engine, requests = run_mixed_batch(vocab_models["llama"], vocab_adapters["llama"], static=False)
    engine.close()
    with pytest.raises(AssertionError):
        check_against_peft(vocab_models["llama"], vocab_adapters["llama"], requests)


@pytest.mark.parametrize("static", [False, True], ids=["eager", "static"])
def test_steps_without_vocab_adapters_skip_their_deltas(static, vocab_models, vocab_adapters, monkeypatch):
    """A batch of plain LoRA and base requests computes no vocabulary delta at all."""
    def never(*args):
        raise AssertionError("a vocabulary delta was computed for a step without a vocabulary adapter")
    monkeypatch.setattr(worker.lora.slots.LoraSlots, "embedding_delta", never)
    monkeypatch.setattr(worker.lora.slots.LoraSlots, "lm_head_delta", never)
    model_dir, adapters = vocab_models["llama"], vocab_adapters["llama"]
    engine = make_engine(model_dir, static_decode=static)
    engine.register_adapter("plain", adapters["plain"])
    engine.register_adapter("embed", adapters["embed"])
    make_resident(engine, "plain", 0)
    make_resident(engine, "embed", 1)  # resident but not in the batch
    requests = [Request("base", prompt(80, 7), max_new_tokens=3),
                Request("plain", prompt(81, 5), adapter_slot=0, max_new_tokens=3)]
    Driver(engine).run(requests)
    engine.close()
    check_against_peft(model_dir, {"plain": adapters["plain"]}, requests)


@pytest.mark.parametrize("second", ["plain", "head", "embed"])
def test_a_slot_reused_after_a_vocab_adapter_keeps_none_of_it(second, vocab_models, vocab_adapters):
    """An adapter loaded where one of both vocabulary modules (rank 16) was must not keep its A: neither
    one without them, nor one of lower rank or fewer modules; another slot's vocabulary adapter
    makes the batch read every slot's."""
    model_dir, adapters = vocab_models["qwen2-tied"], vocab_adapters["qwen2-tied"]
    engine = make_engine(model_dir, max_loras_per_batch=2)
    other = "embed" if second != "embed" else "head"
    for name in {"both", second, other}:
        engine.register_adapter(name, adapters[name])
    make_resident(engine, "both", 0)
    engine.evict_slot(0)
    make_resident(engine, second, 0)
    make_resident(engine, other, 1)
    requests = [Request(second, prompt(90, 6), adapter_slot=0, max_new_tokens=3),
                Request(other, prompt(91, 5), adapter_slot=1, max_new_tokens=3)]
    Driver(engine).run(requests)
    engine.close()
    check_against_peft(model_dir, {name: adapters[name] for name in (second, other)}, requests)


def test_bfloat16_serving_follows_the_reference(artifacts):
    """A bfloat16 model and adapters, served in bfloat16, against the float32 reference."""
    model_dir = build_tiny_model(artifacts / "vocab-bf16", "qwen2", dtype="bfloat16", tie_word_embeddings=True,
                                 seed=7)
    adapters = {name: build_adapter(model_dir, artifacts / f"vocab-bf16-{name}",
                                    AdapterSpec(**{**spec.__dict__, "dtype": "bfloat16"}))
                for name, spec in VOCAB_ADAPTERS.items()}
    for static in (False, True):
        engine, requests = run_mixed_batch(model_dir, adapters, static=static, dtype="auto")
        assert engine.dtype == torch.bfloat16
        engine.close()
        check_against_peft(model_dir, adapters, requests, atol=HALF_ATOL)


# Key layouts and what is reported ---------------------------------------------------------------


@pytest.mark.parametrize("layout", ["without-prefix", "default-name", "without-base-layers"])
def test_vocab_key_layouts_are_served(layout, vocab_models, vocab_adapters, artifacts):
    """Trainers' layouts (no `base_model.model.` prefix, the adapter name `default` in the key) and
    an adapter saved without the base embedding and LM head (save_embedding_layers=False)."""
    model_dir, original = vocab_models["llama"], vocab_adapters["llama"]["both"]
    rewrites = {
        "without-prefix": dict(rename=lambda key: key.removeprefix("base_model.model.")),
        "default-name": dict(rename=lambda key: key.replace("lora_embedding_A", "lora_embedding_A.default")
                             .replace("lora_embedding_B", "lora_embedding_B.default")
                             .replace("lm_head.lora_A.weight", "lm_head.lora_A.default.weight")),
        "without-base-layers": dict(drop=lambda key: ".base_layer." in key),
    }
    path = factory.rewrite_adapter(original, artifacts / f"vocab-layout-{layout}", **rewrites[layout])
    requests = serve_alone(model_dir, "both", path, prompt(95, 7))
    check_against_peft(model_dir, {"both": original}, requests)


def test_adapter_info_reports_the_vocab_modules_and_their_bytes(vocab_models, vocab_adapters):
    model_dir = vocab_models["llama"]
    engine = make_engine(model_dir)
    model = engine.model_config
    info = engine.register_adapter("both", vocab_adapters["llama"]["both"])
    assert info.modules == frozenset({"embed_tokens", "lm_head", *ALL7})
    assert info.ranks == [6, 16]
    shapes = model.module_shapes()
    linear = sum(16 * sum(shapes[m]) for m in ALL7) * model.num_layers
    vocab = 16 * (model.vocab_size + model.hidden_size) + 6 * (model.hidden_size + model.vocab_size)
    assert info.nbytes == (linear + vocab) * 4
    # The slots hold both modules' A and B.T at the max rank for every slot and the zero row.
    slots = engine.slots
    vocab_slot_bytes = 2 * (slots.num_slots + 1) * slots.max_rank * (model.vocab_size + model.hidden_size) * 4
    assert sum(t.numel() * 4 for t in (*slots.vocab_a.values(), *slots.vocab_b_t.values())) == vocab_slot_bytes
    engine.close()


# Refusals -----------------------------------------------------------------------------------------


def test_a_resized_vocabulary_is_refused(vocab_models, artifacts):
    """As saved (the resized base embedding and LM head beside the LoRA), and without those base
    weights (the LoRA's own shapes give it away)."""
    model_dir = vocab_models["llama"]
    path = factory.build_resized_vocab_adapter(model_dir, artifacts / "vocab-resized")
    engine = make_engine(model_dir)
    with pytest.raises(AdapterShapeError, match="base_layer.*272.*resized vocabulary"):
        engine.register_adapter("resized", path)
    weights = path / "adapter_model.safetensors"
    save_file({k: v for k, v in load_file(weights).items() if ".base_layer." not in k}, weights)
    with pytest.raises(AdapterShapeError, match="embed_tokens.*272 tokens.*256.*resized vocabulary"):
        engine.register_adapter("resized", path)
    assert "resized" not in engine.adapters
    engine.close()


def test_dora_on_a_vocab_module_is_refused(vocab_models, artifacts):
    model_dir = vocab_models["llama"]
    path = build_adapter(model_dir, artifacts / "vocab-dora",
                         AdapterSpec(target_modules=["q_proj", "embed_tokens"], use_dora=True, seed=45))
    engine = make_engine(model_dir)
    with pytest.raises(UnsupportedAdapterError, match=r"use_dora=true with target_modules reaching \['embed_tokens'\]"):
        engine.register_adapter("dora", path)
    engine.close()


def _with_weight_tying(source: Path, path: Path) -> Path:
    return factory.rewrite_adapter(source, path, config=lambda config: {**config, "ensure_weight_tying": True})


def test_ensure_weight_tying_is_refused_only_where_it_ties(vocab_models, vocab_adapters, artifacts):
    """On tied embeddings PEFT would give the LM head the embedding's LoRA transposed: refused. On
    untied ones it does nothing: served as PEFT serves it."""
    tied = _with_weight_tying(vocab_adapters["qwen2-tied"]["embed"], artifacts / "vocab-tying-tied")
    engine = make_engine(vocab_models["qwen2-tied"])
    with pytest.raises(UnsupportedAdapterError, match="ensure_weight_tying.*tied embeddings"):
        engine.register_adapter("tied", tied)
    engine.close()

    model_dir = vocab_models["llama"]
    untied = _with_weight_tying(vocab_adapters["llama"]["embed"], artifacts / "vocab-tying-untied")
    requests = serve_alone(model_dir, "embed", untied, prompt(96, 6))
    check_against_peft(model_dir, {"embed": untied}, requests)


# Tensor parallelism (gloo on CPU, as tests/worker/test_tensor_parallel.py) -------------------------

TP_SETTINGS = dict(dtype="float32", device="cpu", page_size=4, num_kv_pages=256, max_loras_per_batch=4,
                   max_lora_rank=32, host_cache_bytes=16 << 20)


def _tp_workload(engine: Engine, adapters: dict[str, Path]) -> list[Request]:
    for name, path in adapters.items():
        engine.register_adapter(name, path)
    for name, slot in SLOTS.items():
        if name != LANDING:
            make_resident(engine, name, slot)
    engine.load_adapter(LANDING, SLOTS[LANDING])  # lands while the first forwards run
    requests = requests_for(adapters)
    Driver(engine, chunk=5).run(requests)
    while engine.busy_loading:
        engine.poll()
    return requests


def _tp_group(size: int, model_dir: Path, adapters: dict[str, Path], directory: Path) -> dict[str, Request]:
    return run_group(size, model_dir, adapters, directory, TP_SETTINGS, _tp_workload)


@pytest.mark.parametrize("model", ["llama", "qwen2-tied"])
def test_tensor_parallel_vocab_lora_matches_one_rank_and_peft(model, vocab_models, vocab_adapters, tmp_path):
    adapters = vocab_adapters[model]
    reference = _tp_group(1, vocab_models[model], adapters, tmp_path)
    sharded = _tp_group(2, vocab_models[model], adapters, tmp_path)
    assert sharded.keys() == reference.keys()
    oracle = PeftOracle(vocab_models[model], adapters)
    for request_id, request in sharded.items():
        assert request.generated == reference[request_id].generated, request_id
        torch.testing.assert_close(request.all_logits(), reference[request_id].all_logits(), atol=LOGIT_ATOL, rtol=0)
        assert_matches_oracle(oracle, request, None if request_id == "base" else request_id)


def test_tensor_parallel_refuses_a_vocabulary_it_cannot_split_evenly(artifacts, tmp_path):
    """A rank's vocabulary part is padded when the group size does not divide it; vocabulary LoRA is refused then."""
    model_dir = artifacts / "vocab-odd"
    config = AutoConfig.from_pretrained(build_tiny_model(artifacts / "vocab-odd-source", "llama"))
    config.vocab_size = 257
    factory._write_model(model_dir, config, dtype="float32", shard=False, seed=0)
    path = build_adapter(model_dir, artifacts / "vocab-odd-embed", VOCAB_ADAPTERS["embed"])
    plain = build_adapter(model_dir, artifacts / "vocab-odd-plain", VOCAB_ADAPTERS["plain"])
    assert load_model_config(model_dir).vocab_size == 257
    config = EngineConfig(model_path=str(model_dir), **TP_SETTINGS)
    host_memory = shared_host_memory_file(tmp_path / "host-memory", config, ranks=2)
    engine = Engine(config, tp=TensorParallel(rank=0, size=2, host_memory=host_memory))
    engine.register_adapter("plain", plain)
    with pytest.raises(UnsupportedAdapterError, match=r"\['embed_tokens'\].*tensor-parallel-size 2.*257 tokens"):
        engine.register_adapter("embed", path)
    engine.close()
