"""PEFT's modules_to_save of embed_tokens and lm_head (whole tables per adapter), batched with plain
LoRA adapters and base requests, against PEFT; eviction, refusals, tensor parallelism."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig

import worker.lora.slots
from protos.loraserve.v1 import internal_pb2 as pb
from scheduler.adapter_tier import AdapterTier
from scheduler.metrics import SchedulerMetrics
from settings.config import EngineConfig
from tests.conftest import SAVED_MODULE_ADAPTERS, SAVED_MODULE_MODELS
from tests import model_factory as factory
from tests.driver import (Driver, Request, forward_paths, make_engine, make_resident, serve_alone,
                          shared_host_memory_file)
from tests.model_factory import AdapterSpec, build_saving_adapter, build_tiny_model
from tests.oracle import PeftOracle
from tests.tp_group import run_group
from tests.worker.test_equivalence import LOGIT_ATOL, prompt
from tests.worker import test_vocab_lora as vocab_lora
from tests.worker.test_vocab_lora import HALF_ATOL, check_against_peft
from worker.engine import Engine
from worker.errors import AdapterConfigMismatchError, AdapterShapeError, UnsupportedAdapterError
from worker.service import execute_command
from worker.tensor_parallel import TensorParallel

ALL7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MODELS = SAVED_MODULE_MODELS
SAVED_SLOTS = 3
SLOTS = {"save-embed": 0, "save-head": 1, "save-both": 2, "plain": 3}  # the saved-module slots first
LANDING = "save-both"  # loaded without blocking, slowly, while the batch runs


def run_mixed_batch(model_dir, adapters, *, static: bool, **settings) -> tuple[Engine, list[Request]]:
    """test_vocab_lora's batch over these adapters, the one with both tables still landing."""
    return vocab_lora.run_mixed_batch(model_dir, adapters, static=static, slots=SLOTS, landing=LANDING,
                                      saved_module_slots=SAVED_SLOTS, **settings)


@pytest.mark.parametrize("static", [False, True], ids=["eager", "static"])
@pytest.mark.parametrize("model", sorted(MODELS))
def test_saved_modules_batch_matches_peft(model, static, mts_models, mts_adapters):
    engine, requests = run_mixed_batch(mts_models[model], mts_adapters[model], static=static)
    check_against_peft(mts_models[model], mts_adapters[model], requests)
    # Steps with a replaced table run eager, also where the static path is on; the others as before.
    forwards = [event["args"] for event in engine.timeline.chrome_trace() if event.get("name") == "forward"]
    assert all(f["path"] == "eager" for f in forwards if set(f["adapters"]) - {"plain"}), forwards
    assert ("static" in forward_paths(engine)) == static
    engine.close()


def test_the_tables_change_the_logits(mts_models, mts_adapters):
    """The comparisons above are not trivial: each replaced table moves the logits well past the tolerance,
    on the tied model too (PEFT keeps the two tables apart: replacing the embedding leaves the LM head)."""
    for model in MODELS:
        oracle = PeftOracle(mts_models[model], mts_adapters[model])
        tokens = prompt(70, 12)
        base = oracle.logits(tokens, None)
        for name in ("save-embed", "save-head", "save-both"):
            assert (oracle.logits(tokens, name) - base).abs().max() > 100 * LOGIT_ATOL, (model, name)


def _skip(*args) -> None:
    """A replacement left out: the base table's rows stay."""


@pytest.mark.parametrize("method", ["saved_embeddings", "saved_logits"])
def test_a_missing_replacement_fails_the_comparison(method, mts_models, mts_adapters, monkeypatch):
    monkeypatch.setattr(worker.lora.slots.LoraSlots, method, _skip)
    engine, requests = run_mixed_batch(mts_models["llama"], mts_adapters["llama"], static=False)
    engine.close()
    with pytest.raises(AssertionError):
        check_against_peft(mts_models["llama"], mts_adapters["llama"], requests)


def test_bfloat16_serving_follows_the_reference(artifacts):
    model_dir = build_tiny_model(artifacts / "mts-bf16", "qwen2", dtype="bfloat16", tie_word_embeddings=True, seed=7)
    adapters = {name: build_saving_adapter(model_dir, artifacts / f"mts-bf16-{name}",
                                           AdapterSpec(**{**spec.__dict__, "dtype": "bfloat16"}))
                for name, spec in SAVED_MODULE_ADAPTERS.items()}
    engine, requests = run_mixed_batch(model_dir, adapters, static=False, dtype="auto")
    assert engine.dtype == torch.bfloat16
    engine.close()
    check_against_peft(model_dir, adapters, requests, atol=HALF_ATOL)


def _never(*args):
    raise AssertionError("a saved-module table was read for a step without such an adapter")


@pytest.mark.parametrize("static", [False, True], ids=["eager", "static"])
def test_steps_without_saved_modules_run_as_before(static, mts_models, mts_adapters, monkeypatch):
    """A batch of plain LoRA and base requests reads no table, and takes the static path when it is on,
    while a saved-module adapter is resident beside it."""
    monkeypatch.setattr(worker.lora.slots.LoraSlots, "saved_embeddings", _never)
    monkeypatch.setattr(worker.lora.slots.LoraSlots, "saved_logits", _never)
    model_dir, adapters = mts_models["llama"], mts_adapters["llama"]
    engine = make_engine(model_dir, static_decode=static, saved_module_slots=2)
    engine.register_adapter("plain", adapters["plain"])
    engine.register_adapter("save-both", adapters["save-both"])
    make_resident(engine, "save-both", 0)  # resident but not in the batch
    make_resident(engine, "plain", 2)
    requests = [Request("base", prompt(80, 7), max_new_tokens=3),
                Request("plain", prompt(81, 5), adapter_slot=2, max_new_tokens=3)]
    Driver(engine).run(requests)
    paths = set(forward_paths(engine))
    engine.close()
    assert paths == ({"static"} if static else {"eager"}), paths
    check_against_peft(model_dir, {"plain": adapters["plain"]}, requests)


def test_a_reloaded_saved_slot_serves_its_new_adapters_tables(mts_models, mts_adapters):
    """A saved-module slot evicted and reloaded: the next adapter there sees its own tables only,
    whether it replaces the same modules, others, or none."""
    model_dir, adapters = mts_models["qwen2-tied"], mts_adapters["qwen2-tied"]
    engine = make_engine(model_dir, saved_module_slots=1, max_loras_per_batch=2)
    for name in ("save-both", "save-embed", "save-head", "plain"):
        engine.register_adapter(name, adapters[name])
    served = []
    previous = "save-both"
    make_resident(engine, previous, 0)
    for name in ("save-head", "save-embed", "plain", "save-both"):
        engine.evict_slot(0)
        make_resident(engine, name, 0)
        request = Request(name, prompt(90 + len(served), 6), adapter_slot=0, max_new_tokens=3)
        Driver(engine).run([request])
        served.append(request)
    engine.close()
    check_against_peft(model_dir, {name: adapters[name] for name in ("save-head", "save-embed", "plain",
                                                                     "save-both")}, served)


# Key layouts, what is reported, refusals --------------------------------------------------------------


def test_tables_without_the_prefix_are_served(mts_models, mts_adapters, artifacts):
    model_dir, original = mts_models["llama"], mts_adapters["llama"]["save-both"]
    path = factory.rewrite_adapter(original, artifacts / "mts-no-prefix",
                                   rename=lambda k: k.removeprefix("base_model.model."))
    requests = serve_alone(model_dir, "save-both", path, prompt(95, 7), saved_module_slots=1)
    check_against_peft(model_dir, {"save-both": original}, requests)


def test_adapter_info_reports_the_extra_modules_and_their_bytes(mts_models, mts_adapters):
    model_dir = mts_models["llama"]
    engine = make_engine(model_dir, saved_module_slots=2)
    model = engine.model_config
    info = engine.register_adapter("save-both", mts_adapters["llama"]["save-both"])
    assert info.extra_modules == frozenset({"embed_tokens", "lm_head"})
    assert info.modules == frozenset(ALL7)
    shapes = model.module_shapes()
    linear = sum(16 * sum(shapes[m]) for m in ALL7) * model.num_layers
    tables = 2 * model.vocab_size * model.hidden_size
    assert info.nbytes == (linear + tables) * 4
    head = engine.register_adapter("save-head", mts_adapters["llama"]["save-head"])
    assert head.extra_modules == frozenset({"lm_head"})
    # Staged, the host entry holds the tables with the LoRA: the scheduler's byte figure is what it takes.
    engine.stage_adapter("save-both")
    entry = engine.host_cache.wait("save-both")
    assert entry.nbytes == info.nbytes
    assert torch.equal(entry.saved["lm_head"],
                       load_file(mts_adapters["llama"]["save-both"] / "adapter_model.safetensors")
                       ["base_model.model.lm_head.weight"])
    assert engine.slots.table_bytes() == tables * 4
    assert sum(t.numel() * 4 for t in engine.slots.saved.values()) == 2 * tables * 4
    engine.close()


def test_the_registration_reaches_the_adapter_api(mts_models, mts_adapters):
    """Worker to scheduler: the registered adapter's extra modules and bytes, as the API reports them."""
    engine = make_engine(mts_models["llama"], saved_module_slots=1)
    result = pb.CommandResult()
    command = pb.WorkerCommand(register_adapter=pb.RegisterAdapter(name="save-head",
                                                                  path=str(mts_adapters["llama"]["save-head"])))
    execute_command(engine, command, result)
    info = engine.adapter_info("save-head")
    engine.close()
    assert list(result.adapter.extra_modules) == ["lm_head"] and result.adapter.size_bytes == info.nbytes
    tier = AdapterTier(2, 1 << 30, 4, blocking_loads=True, metrics=SchedulerMetrics(), saved_module_slots=1)
    api = tier.register(result.adapter, "/adapters/save-head").info()
    assert list(api.extra_modules) == ["lm_head"] and api.gpu_bytes == info.nbytes and api.host_bytes >= info.nbytes
    assert api.target_modules == ["v_proj"]


def _refused(model_dir, path, error, match, **settings) -> None:
    engine = make_engine(model_dir, **{"saved_module_slots": 1, **settings})
    with pytest.raises(error, match=match):
        engine.register_adapter("refused", path)
    assert "refused" not in engine.adapters
    engine.close()


def test_other_module_names_are_refused(mts_models, mts_adapters, artifacts):
    model_dir = mts_models["llama"]
    path = factory.rewrite_adapter(mts_adapters["llama"]["save-embed"], artifacts / "mts-score",
                                   config=lambda c: {**c, "modules_to_save": ["embed_tokens", "score"]})
    _refused(model_dir, path, UnsupportedAdapterError, r"modules_to_save names 'score'.*embed_tokens and lm_head")


def test_a_module_both_replaced_and_adapted_is_refused(mts_models, mts_adapters, artifacts):
    model_dir = mts_models["llama"]
    path = factory.rewrite_adapter(mts_adapters["llama"]["save-embed"], artifacts / "mts-both-ways",
                                   config=lambda c: {**c, "target_modules": ["q_proj", "embed_tokens"]})
    _refused(model_dir, path, UnsupportedAdapterError, r"modules_to_save and target_modules both reach \['embed_tokens'\]")


def test_ensure_weight_tying_on_tied_embeddings_is_refused(mts_models, mts_adapters, artifacts):
    path = factory.rewrite_adapter(mts_adapters["qwen2-tied"]["save-embed"], artifacts / "mts-tying",
                                   config=lambda c: {**c, "ensure_weight_tying": True})
    _refused(mts_models["qwen2-tied"], path, UnsupportedAdapterError,
             r"ensure_weight_tying=true with modules_to_save \['embed_tokens'\] on a model with tied embeddings")


def test_a_resized_table_is_refused(mts_models, mts_adapters, artifacts):
    model_dir = mts_models["llama"]
    source = mts_adapters["llama"]["save-embed"]
    path = artifacts / "mts-resized"
    shutil.copytree(source, path)
    weights = path / "adapter_model.safetensors"
    tensors = load_file(weights)
    key = "base_model.model.model.embed_tokens.weight"
    tensors[key] = torch.cat([tensors[key], tensors[key][:16]])
    save_file(tensors, weights)
    _refused(model_dir, path, AdapterShapeError, r"embed_tokens table.*272 tokens.*256.*resized vocabulary")


@pytest.mark.parametrize("case, match", [
    ("unlisted", r"holds a full lm_head table, but the config's modules_to_save does not list it"),
    ("missing", r"modules_to_save lists embed_tokens, but .* holds no embed_tokens table"),
])
def test_tables_and_config_must_agree(case, match, mts_models, mts_adapters, artifacts):
    model_dir = mts_models["llama"]
    source = mts_adapters["llama"]["save-both"]
    if case == "unlisted":
        path = factory.rewrite_adapter(source, artifacts / f"mts-{case}",
                                       config=lambda c: {**c, "modules_to_save": ["embed_tokens"]})
    else:
        path = factory.rewrite_adapter(source, artifacts / f"mts-{case}",
                                       drop=lambda k: k.endswith("model.embed_tokens.weight"))
    _refused(model_dir, path, AdapterConfigMismatchError, match)


def test_without_saved_module_slots_registering_is_refused(mts_models, mts_adapters):
    model_dir = mts_models["llama"]
    engine = make_engine(model_dir)
    config = engine.model_config
    table_bytes = 2 * config.vocab_size * config.hidden_size * 4
    with pytest.raises(UnsupportedAdapterError,
                       match=rf"replaces \['lm_head'\].*--saved-module-slots N.*{table_bytes} bytes"):
        engine.register_adapter("save-head", mts_adapters["llama"]["save-head"])
    engine.close()


def test_loading_into_another_slot_is_refused(mts_models, mts_adapters):
    engine = make_engine(mts_models["llama"], saved_module_slots=1)
    engine.register_adapter("save-embed", mts_adapters["llama"]["save-embed"])
    engine.stage_adapter("save-embed")
    engine.wait_staged("save-embed")
    with pytest.raises(UnsupportedAdapterError, match=r"must load into a saved-module slot \(0 to 0\), not slot 2"):
        engine.load_adapter("save-embed", 2, blocking=True)
    assert engine.slots.occupants[2] is None and not engine.pending
    make_resident(engine, "save-embed", 0)
    engine.close()


def test_more_saved_module_slots_than_slots_is_refused():
    with pytest.raises(ValueError, match="saved_module_slots .5. must be at most max_loras_per_batch .4."):
        EngineConfig(model_path="/m", max_loras_per_batch=4, saved_module_slots=5)


# Tensor parallelism (gloo on CPU, as tests/worker/test_vocab_lora.py) -----------------------------------

TP_SETTINGS = dict(dtype="float32", device="cpu", page_size=4, num_kv_pages=256, max_loras_per_batch=4,
                   max_lora_rank=32, host_cache_bytes=16 << 20, saved_module_slots=SAVED_SLOTS)


def _tp_workload(engine: Engine, adapters: dict[str, Path]) -> list[Request]:
    for name, path in adapters.items():
        engine.register_adapter(name, path)
    for name, slot in SLOTS.items():
        if name != LANDING:
            make_resident(engine, name, slot)
    engine.load_adapter(LANDING, SLOTS[LANDING])  # lands while the first forwards run
    requests = vocab_lora.requests_for(adapters, SLOTS)
    Driver(engine, chunk=5).run(requests)
    while engine.busy_loading:
        engine.poll()
    return requests


@pytest.mark.parametrize("model", ["llama", "qwen2-tied"])
def test_tensor_parallel_saved_modules_match_one_rank_and_peft(model, mts_models, mts_adapters, tmp_path):
    adapters = mts_adapters[model]
    reference = run_group(1, mts_models[model], adapters, tmp_path, TP_SETTINGS, _tp_workload)
    sharded = run_group(2, mts_models[model], adapters, tmp_path, TP_SETTINGS, _tp_workload)
    assert sharded.keys() == reference.keys()
    check_against_peft(mts_models[model], adapters, list(sharded.values()))
    for request_id, request in sharded.items():
        assert request.generated == reference[request_id].generated, request_id
        torch.testing.assert_close(request.all_logits(), reference[request_id].all_logits(), atol=LOGIT_ATOL, rtol=0)


def test_tensor_parallel_refuses_tables_of_a_vocabulary_it_cannot_split_evenly(artifacts, tmp_path):
    """As for vocabulary LoRA: a rank's part of a padded vocabulary is longer than the file's slice."""
    model_dir = artifacts / "mts-odd"
    config = AutoConfig.from_pretrained(build_tiny_model(artifacts / "mts-odd-source", "llama"))
    config.vocab_size = 257
    factory._write_model(model_dir, config, dtype="float32", shard=False, seed=0)
    path = build_saving_adapter(model_dir, artifacts / "mts-odd-head", SAVED_MODULE_ADAPTERS["save-head"])
    config = EngineConfig(model_path=str(model_dir), **TP_SETTINGS)
    host_memory = shared_host_memory_file(tmp_path / "host-memory", config, ranks=2)
    engine = Engine(config, tp=TensorParallel(rank=0, size=2, host_memory=host_memory))
    with pytest.raises(UnsupportedAdapterError, match=r"\['lm_head'\].*tensor-parallel-size 2.*257 tokens"):
        engine.register_adapter("save-head", path)
    engine.close()
