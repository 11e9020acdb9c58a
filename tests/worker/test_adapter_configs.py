"""Every adapter_config.json field and weight-key layout PEFT and trainers write: served like PEFT,
or refused with an error naming the field.

Each variant is a real PEFT adapter (tests/model_factory.py) whose config and/or tensor keys are
then rewritten. A served variant must give PEFT's logits: PEFT loading the variant itself where
it can, else PEFT loading the adapter before the rewrite (e.g. renamed keys PEFT does not read).
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.driver import Driver, Request, make_engine, make_resident
from tests.model_factory import AdapterSpec, build_adapter, build_tiny_model
from tests.oracle import PeftOracle
from tests.worker.test_equivalence import assert_matches_oracle, prompt
from worker.errors import (
    AdapterConfigMismatchError,
    CorruptAdapterError,
    InvalidAdapterError,
    UnsupportedAdapterError,
)

ARCH = "llama"
BASE = AdapterSpec(seed=1)  # q_proj and v_proj, r 8, alpha 16
DORA = AdapterSpec(use_dora=True, seed=24)
ALL7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
Tensors = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Variant:
    spec: AdapterSpec = BASE
    config: dict = field(default_factory=dict)  # fields to set in adapter_config.json
    drop: tuple[str, ...] = ()  # fields to delete from adapter_config.json
    tensors: Callable[[Tensors], Tensors] | None = None  # rewrites the saved tensors
    peft_loads: bool = True  # False: compare with PEFT on the adapter before the rewrite


def rename_keys(rename: Callable[[str], str]) -> Callable[[Tensors], Tensors]:
    return lambda tensors: {rename(key): value for key, value in tensors.items()}


def with_default(key: str) -> str:
    return key.replace(".weight", ".default.weight")


def without_prefix(key: str) -> str:
    return key.removeprefix("base_model.model.")


def with_default_dora(key: str) -> str:
    """A/B as `with_default`; the magnitude as it is named in PEFT's in-memory state dict."""
    return key + ".default.weight" if key.endswith(".lora_magnitude_vector") else with_default(key)


def both_layouts(tensors: Tensors) -> Tensors:
    return {**tensors, **{without_prefix(key): value.clone() for key, value in tensors.items()}}


SERVED: dict[str, Variant] = {
    # Inert: training, initialisation and provenance fields.
    "inference_mode": Variant(config={"inference_mode": True}),
    "merge_weights_old": Variant(config={"merge_weights": False}),
    "fan_in_fan_out": Variant(config={"fan_in_fan_out": True}),
    "init_lora_weights": Variant(config={"init_lora_weights": "gaussian"}),
    "loftq_config": Variant(config={"loftq_config": {"loftq_bits": 4, "loftq_iter": 1}}),
    "megatron": Variant(config={"megatron_config": None, "megatron_core": "megatron.core"}),
    # PEFT imports megatron_core when megatron_config is set, so it cannot load this one here.
    "megatron_config_set": Variant(config={"megatron_config": {"tensor_model_parallel_size": 1}},
                                   peft_loads=False),
    "lora_dropout": Variant(config={"lora_dropout": 0.1}),
    "task_type": Variant(config={"task_type": None}),
    "revision": Variant(config={"revision": "main"}),
    "base_model_name_or_path": Variant(config={"base_model_name_or_path": "/elsewhere/llama"}),
    "auto_mapping": Variant(config={"auto_mapping": {"base_model_class": "LlamaForCausalLM",
                                                     "parent_library": "transformers.models.llama"}}),
    "runtime_config": Variant(config={"runtime_config": {"ephemeral_gpu_offload": False}}),
    "eva_config": Variant(config={"eva_config": {"rho": 2.0, "tau": 0.99}}),
    "corda_config": Variant(config={"corda_config": {"corda_method": "ipm"}}),
    "qalora": Variant(config={"use_qalora": True, "qalora_group_size": 16}),
    "peft_version": Variant(config={"peft_version": "0.4.0"}),
    "features_off": Variant(config={
        "use_dora": False, "modules_to_save": [], "bias": "none", "lora_bias": False, "layer_replication": None,
        "trainable_token_indices": None, "target_parameters": None, "enable_lora": None,
        "alora_invocation_tokens": None,
    }),
    "oldest_config": Variant(drop=("use_rslora", "rank_pattern", "alpha_pattern", "use_dora", "lora_bias",
                                   "layer_replication", "exclude_modules", "megatron_config", "megatron_core",
                                   "loftq_config", "runtime_config", "target_parameters",
                                   "trainable_token_indices", "eva_config", "corda_config", "use_qalora",
                                   "qalora_group_size", "peft_version", "auto_mapping", "layers_pattern",
                                   "layers_to_transform", "init_lora_weights", "alora_invocation_tokens",
                                   "lora_ga_config", "velora_config", "monteclora_config", "use_bdlora",
                                   "arrow_config", "kasa_config", "ensure_weight_tying")),
    "unknown_field": Variant(config={"a_field_from_the_future": {"x": 1}}),
    # Applied: fields that change the math, built by PEFT itself.
    "r_alpha": Variant(AdapterSpec(rank=4, alpha=32, seed=11)),
    "rslora": Variant(AdapterSpec(rank=4, alpha=8, use_rslora=True, target_modules=["q_proj", "down_proj"], seed=12)),
    "rank_alpha_regex": Variant(AdapterSpec(
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        rank_pattern={r"layers\.1\.self_attn\.(q|k)_proj": 4, "v_proj": 2},
        alpha_pattern={r"model\.layers\.0\.self_attn\..*": 32, "o_proj": 4},
        seed=13,
    )),
    "target_list": Variant(AdapterSpec(target_modules=["k_proj", "up_proj"], seed=14)),
    "target_regex": Variant(AdapterSpec(target_modules=r"model\.layers\.\d+\.mlp\.(gate|down)_proj", seed=15)),
    "target_all_linear": Variant(AdapterSpec(target_modules="all-linear", seed=16)),
    "target_full_path": Variant(AdapterSpec(target_modules=["model.layers.1.self_attn.o_proj"], seed=17)),
    "target_default": Variant(config={"target_modules": None}),
    "exclude_list": Variant(AdapterSpec(target_modules=["q_proj", "v_proj", "down_proj"],
                                        exclude_modules=["model.layers.0.mlp.down_proj", "k_proj"], seed=18)),
    "exclude_regex": Variant(AdapterSpec(target_modules=ALL7, exclude_modules=r".*\.1\.(self_attn|mlp)\.\w+", seed=19)),
    "layers_to_transform_int": Variant(AdapterSpec(layers_to_transform=1, seed=20)),
    "layers_to_transform_list": Variant(AdapterSpec(target_modules=["o_proj", "up_proj"], layers_to_transform=[0],
                                                    seed=21)),
    "layers_pattern": Variant(AdapterSpec(layers_to_transform=[1], layers_pattern="layers", seed=22)),
    "layers_pattern_list": Variant(AdapterSpec(layers_to_transform=[0], layers_pattern=["h", "layers"], seed=23)),
    "use_dora": Variant(DORA),
    # Weight-key layouts trainers write, which PEFT itself does not read.
    "keys_default": Variant(tensors=rename_keys(with_default), peft_loads=False),
    "keys_without_prefix": Variant(tensors=rename_keys(without_prefix), peft_loads=False),
    "keys_without_prefix_default": Variant(tensors=rename_keys(lambda k: with_default(without_prefix(k))),
                                           peft_loads=False),
    "keys_default_dora": Variant(DORA, tensors=rename_keys(with_default_dora), peft_loads=False),
}

REFUSED: dict[str, tuple[Variant, type[InvalidAdapterError], str]] = {
    # Only embed_tokens and lm_head may be replaced (tests/worker/test_modules_to_save.py serves them).
    "modules_to_save_other": (Variant(config={"modules_to_save": ["score"]}), UnsupportedAdapterError,
                              "modules_to_save names 'score'"),
    "modules_to_save_without_table": (Variant(config={"modules_to_save": ["lm_head"]}), AdapterConfigMismatchError,
                                      "modules_to_save lists lm_head, but .* holds no lm_head table"),
    "bias_all": (Variant(config={"bias": "all"}), UnsupportedAdapterError, "bias"),
    "bias_lora_only": (Variant(config={"bias": "lora_only"}), UnsupportedAdapterError, "bias"),
    "lora_bias": (Variant(config={"lora_bias": True}), UnsupportedAdapterError, "lora_bias"),
    "layer_replication": (Variant(config={"layer_replication": [[0, 2], [0, 2]]}), UnsupportedAdapterError,
                          "layer_replication"),
    "trainable_token_indices": (Variant(config={"trainable_token_indices": [3, 4]}), UnsupportedAdapterError,
                                "trainable_token_indices"),
    "target_parameters": (Variant(config={"target_parameters": ["mlp.experts.down_proj"]}), UnsupportedAdapterError,
                          "target_parameters"),
    "enable_lora": (Variant(config={"enable_lora": [True, False, True]}), UnsupportedAdapterError, "enable_lora"),
    "alora": (Variant(config={"alora_invocation_tokens": [5, 6]}), UnsupportedAdapterError,
              "alora_invocation_tokens"),
    "use_bdlora": (Variant(config={"use_bdlora": {"nblocks": 2}}), UnsupportedAdapterError, "use_bdlora"),
    "arrow_config": (Variant(config={"arrow_config": {"top_k": 2}}), UnsupportedAdapterError, "arrow_config"),
    "kasa_config": (Variant(config={"kasa_config": {}}), UnsupportedAdapterError, "kasa_config"),
    "peft_type": (Variant(config={"peft_type": "IA3"}), UnsupportedAdapterError, "peft_type"),
    "target_lm_head_regex": (Variant(config={"target_modules": r".*(q_proj|v_proj|lm_head)"}),
                             AdapterConfigMismatchError, "target_modules select lm_head, but the weights hold no"),
    # The config and the tensors disagree: the first mismatch is named.
    "tensors_not_targeted": (Variant(config={"target_modules": ["q_proj"]}), AdapterConfigMismatchError,
                             r"model\.layers\.0\.self_attn\.v_proj.*target_modules"),
    "target_without_tensors": (Variant(config={"target_modules": ["q_proj", "k_proj", "v_proj"]}),
                               AdapterConfigMismatchError, r"target_modules select model\.layers\.0\.self_attn\.k_proj"),
    "layers_to_transform_mismatch": (Variant(config={"layers_to_transform": [0]}), AdapterConfigMismatchError,
                                     r"model\.layers\.1\.self_attn\.q_proj.*layers_to_transform"),
    "layers_pattern_mismatch": (Variant(config={"layers_to_transform": [0, 1], "layers_pattern": "h"}),
                                AdapterConfigMismatchError, "layers_pattern"),
    "exclude_mismatch": (Variant(config={"exclude_modules": ["v_proj"]}), AdapterConfigMismatchError,
                         r"v_proj.*exclude_modules"),
    "r_mismatch": (Variant(config={"r": 4}), AdapterConfigMismatchError, "rank 8 in the weights but 4 from the config's r$"),
    "rank_pattern_mismatch": (Variant(config={"rank_pattern": {"q_proj": 4}}), AdapterConfigMismatchError,
                              "rank_pattern"),
    "invalid_regex": (Variant(config={"target_modules": "(q_proj"}), CorruptAdapterError, "target_modules"),
    "r_not_int": (Variant(config={"r": "eight"}), CorruptAdapterError, "field r must"),
    "duplicate_keys": (Variant(tensors=both_layouts), CorruptAdapterError, "twice"),
    "use_dora_without_magnitudes": (Variant(config={"use_dora": True}), AdapterConfigMismatchError,
                                    r"q_proj lacks the lora_magnitude_vector, but the config's use_dora is True"),
    "magnitudes_without_use_dora": (Variant(DORA, config={"use_dora": False}), AdapterConfigMismatchError,
                                    r"q_proj holds a lora_magnitude_vector, but the config's use_dora is False"),
    "use_dora_not_bool": (Variant(config={"use_dora": "yes"}), CorruptAdapterError, "field use_dora must"),
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("model"), ARCH)


@pytest.fixture(scope="module")
def engine(model_dir):
    engine = make_engine(model_dir, max_lora_rank=16)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def build(model_dir, tmp_path_factory) -> Callable[[str, Variant], tuple[Path, Path]]:
    """name, variant -> (the adapter as PEFT wrote it, the rewritten variant)."""
    root = tmp_path_factory.mktemp("adapter-configs")
    originals: dict[str, Path] = {}  # by repr(spec): specs hold lists, so they do not hash

    def build_variant(name: str, variant: Variant) -> tuple[Path, Path]:
        key = repr(variant.spec)
        if key not in originals:
            originals[key] = build_adapter(model_dir, root / f"original-{len(originals)}", variant.spec)
        original = originals[key]
        rewritten = root / name
        shutil.copytree(original, rewritten)
        rewrite_config(rewritten / "adapter_config.json", variant)
        if variant.tensors is not None:
            weights = rewritten / "adapter_model.safetensors"
            save_file(variant.tensors(load_file(weights)), weights)
        return original, rewritten

    return build_variant


def rewrite_config(path: Path, variant: Variant) -> None:
    config = json.loads(path.read_text())
    config.update(variant.config)
    for name in variant.drop:
        config.pop(name, None)
    path.write_text(json.dumps(config))


@pytest.mark.parametrize("case", sorted(SERVED))
def test_variant_is_served_like_peft(case, engine, model_dir, build, caplog):
    variant = SERVED[case]
    original, rewritten = build(case, variant)
    with caplog.at_level(logging.WARNING, logger="loraserve.worker"):
        engine.register_adapter(case, rewritten)
    unknown_field_warnings = [r for r in caplog.records if "a_field_from_the_future" in r.getMessage()]
    assert len(unknown_field_warnings) == (case == "unknown_field")
    make_resident(engine, case, slot=0)
    request = Request("r", prompt(31, 9), adapter_slot=0, max_new_tokens=3)
    Driver(engine, chunk=5).run([request])
    engine.evict_slot(0)
    engine.unregister_adapter(case)
    oracle = PeftOracle(model_dir, {case: rewritten if variant.peft_loads else original})
    assert_matches_oracle(oracle, request, case)


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_variant_is_refused_naming_the_field(case, engine, build):
    variant, error_type, message = REFUSED[case]
    _, rewritten = build(case, variant)
    with pytest.raises(error_type, match=message):
        engine.register_adapter(case, rewritten)
    assert case not in engine.adapters
