"""Session-wide tiny models and adapters, built once as real files (no hub access)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tests.model_factory import (  # noqa: E402
    ARCHITECTURES,
    AdapterSpec,
    build_adapter,
    build_saving_adapter,
    build_tiny_model,
    spec_for,
)

MIXED_ADAPTERS = {
    "a0": AdapterSpec(rank=8, alpha=16, target_modules=["q_proj", "v_proj"], seed=1),
    "a1": AdapterSpec(rank=16, alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                        "gate_proj", "up_proj", "down_proj"], seed=2),
}
_ALL_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# DoRA adapters of different ranks, modules and scalings, and a plain LoRA adapter of every
# module (so it shares each DoRA module's batched product).
DORA_MIX_ADAPTERS = {
    "dora_qv": AdapterSpec(rank=8, alpha=16, target_modules=["q_proj", "v_proj"], use_dora=True, seed=21),
    "dora_rslora": AdapterSpec(rank=4, alpha=8, target_modules=_ALL_MODULES, use_rslora=True, use_dora=True,
                               seed=22),
    "dora_mixed": AdapterSpec(rank=16, alpha=8, target_modules=["k_proj", "o_proj", "gate_proj", "down_proj"],
                              use_dora=True, seed=23),
    "plain": AdapterSpec(rank=8, alpha=16, target_modules=_ALL_MODULES, seed=24),
}
# qwen2's q/k/v biases are outside DoRA's rescaling; Phi-3's DoRA is on its fused modules (PEFT's
# norm per row of the fused weight, which the server takes per row of each part).
DORA_ARCHS = ("llama", "qwen2", "phi3")
# LoRA on the vocabulary modules: different ranks, scalings and module mixes; "plain" has none.
VOCAB_ADAPTERS = {
    "embed": AdapterSpec(rank=8, alpha=16, target_modules=["q_proj", "embed_tokens"], seed=41),
    "head": AdapterSpec(rank=4, alpha=8, target_modules=["v_proj", "lm_head"], use_rslora=True, seed=42),
    "both": AdapterSpec(rank=16, alpha=8, target_modules=["embed_tokens", "lm_head", *_ALL_MODULES],
                        rank_pattern={"lm_head": 6}, alpha_pattern={"embed_tokens": 24}, seed=43),
    "plain": AdapterSpec(rank=8, alpha=16, target_modules=_ALL_MODULES, seed=44),
}
# name -> (architecture, tie_word_embeddings). llama unties its embeddings; qwen2 built tied (its LM
# head is the embedding); gemma2 ties them and scales embeddings, which PEFT applies to the
# embedding's LoRA delta too.
VOCAB_MODELS = {"llama": ("llama", None), "qwen2-tied": ("qwen2", True), "gemma2": ("gemma2", None),
                "gemma3": ("gemma3", None), "phi3": ("phi3", None)}

# modules_to_save of the vocabulary modules (whole tables per adapter, the path names included), with
# LoRA on linear modules beside them; "plain" replaces nothing. The tied models show that PEFT keeps the
# two tables apart (replacing the embedding leaves the LM head the base one); gemma2 scales the replaced
# embedding and soft-caps the replaced LM head's logits.
SAVED_MODULE_ADAPTERS = {
    "save-embed": AdapterSpec(rank=8, alpha=16, target_modules=["q_proj"], modules_to_save=["embed_tokens"],
                              seed=51),
    "save-head": AdapterSpec(rank=4, alpha=8, target_modules=["v_proj"], modules_to_save=["lm_head"], seed=52),
    "save-both": AdapterSpec(rank=16, alpha=8, target_modules=_ALL_MODULES,
                             modules_to_save=["model.embed_tokens", "lm_head"], seed=53),
    "plain": AdapterSpec(rank=8, alpha=16, target_modules=_ALL_MODULES, seed=44),
}
SAVED_MODULE_MODELS = {"llama": ("llama", None), "qwen2-tied": ("qwen2", True), "gemma2": ("gemma2", None)}

@pytest.fixture(scope="session")
def artifacts(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("artifacts")


@pytest.fixture(scope="session")
def model_dirs(artifacts) -> dict[str, Path]:
    """One tiny float32 model per supported architecture."""
    return {arch: build_tiny_model(artifacts / arch, arch) for arch in ARCHITECTURES}


@pytest.fixture(scope="session")
def dora_adapter_dirs(artifacts, model_dirs) -> dict[str, dict[str, Path]]:
    """arch -> adapter name -> directory, for the DoRA mixed-batch tests."""
    return {arch: {name: build_adapter(model_dirs[arch], artifacts / f"dora-{arch}-{name}", spec_for(arch, spec))
                   for name, spec in DORA_MIX_ADAPTERS.items()}
            for arch in DORA_ARCHS}


@pytest.fixture(scope="session")
def mixed_adapter_dirs(artifacts, model_dirs) -> dict[str, dict[str, Path]]:
    """arch -> adapter name -> directory, for the two adapters of the mixed-batch tests (Phi-3's on its
    fused modules: a0 on qkv_proj, a1 on all four)."""
    return {
        arch: {name: build_adapter(model_dir, artifacts / f"{arch}-{name}", spec_for(arch, spec))
               for name, spec in MIXED_ADAPTERS.items()}
        for arch, model_dir in model_dirs.items()
    }


@pytest.fixture(scope="session")
def vocab_models(artifacts) -> dict[str, Path]:
    return {name: build_tiny_model(artifacts / f"vocab-{name}", arch, tie_word_embeddings=tied)
            for name, (arch, tied) in VOCAB_MODELS.items()}


@pytest.fixture(scope="session")
def vocab_adapters(artifacts, vocab_models) -> dict[str, dict[str, Path]]:
    """model -> adapter name -> directory, for the vocabulary LoRA tests."""
    return {model: {name: build_adapter(path, artifacts / f"vocab-{model}-{name}",
                                        spec_for(VOCAB_MODELS[model][0], spec))
                    for name, spec in VOCAB_ADAPTERS.items()}
            for model, path in vocab_models.items()}


@pytest.fixture(scope="session")
def mts_models(artifacts) -> dict[str, Path]:
    return {name: build_tiny_model(artifacts / f"mts-{name}", arch, tie_word_embeddings=tied)
            for name, (arch, tied) in SAVED_MODULE_MODELS.items()}


@pytest.fixture(scope="session")
def mts_adapters(artifacts, mts_models) -> dict[str, dict[str, Path]]:
    """model -> adapter name -> directory, for the modules_to_save tests."""
    return {model: {name: build_saving_adapter(path, artifacts / f"mts-{model}-{name}", spec)
                    for name, spec in SAVED_MODULE_ADAPTERS.items()}
            for model, path in mts_models.items()}
