"""Tiny random-weight HF models, a tokenizer and PEFT LoRA adapters, written as real files.

Everything is built locally (no hub access) and seeded, so the same arguments give the same
bytes. The models are small enough for CPU tests yet use the features a server must get
right: GQA, rope variants, sliding windows, q/k/v bias, q/k norm, tied embeddings, shards,
Gemma's soft-capping, sandwich norms, scales and per-layer-type ropes, and Phi-3's fused
projections and LongRoPE.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    PretrainedConfig,
    Qwen2Config,
    Qwen3Config,
)

from loraserve.demo import BOS_ID, EOS_ID, PAD_ID, UNK_ID, build_tokenizer  # noqa: F401 (re-exported for tests)

ARCHITECTURES = ("llama", "llama3", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3")

VOCAB_SIZE = 256
MAX_POSITIONS = 256
SLIDING_WINDOW = 16  # far below MAX_POSITIONS so longer test sequences cross it
OTHER_BASE_HIDDEN_SIZE = 96  # for adapters whose tensors must not fit the 64-wide models

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Llama 3 rope with rope_theta 10000 and head_dim 16: the 8 frequencies have wavelengths
# from 6 to ~4000 positions, so the high (< 32/4), smoothed and low (> 32/1) bands are all
# used. With Llama 3's theta of 500000 the smoothed band would be empty.
_LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 10000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}

# Gemma ties its embeddings. A larger init than the others' 0.02 makes attention scores and
# logits reach the soft caps (scores up to ~+-5 against a cap of 4, logits ~+-7 against 3),
# and a query_pre_attn_scalar other than head_dim makes the attention scale matter.
_GEMMA_COMMON: dict[str, object] = {"tie_word_embeddings": True, "initializer_range": 0.15,
                                    "sliding_window": SLIDING_WINDOW}
_GEMMA_CONFIGS: dict[str, tuple[type[PretrainedConfig], dict[str, object]]] = {
    # Layers alternate sliding, full (Gemma 2's own default).
    "gemma2": (Gemma2Config, {"head_dim": 16, "query_pre_attn_scalar": 24, "attn_logit_softcapping": 4.0,
                              "final_logit_softcapping": 3.0}),
    # Full, then sliding; local layers keep base 10000, global ones a linearly scaled 1e6 (as
    # Gemma 3 4B); q/k norms; non-square q/o; no attention soft-capping (Gemma 3's default).
    "gemma3": (Gemma3TextConfig, {
        "head_dim": 32, "query_pre_attn_scalar": 20, "final_logit_softcapping": 3.0,
        "layer_types": ["full_attention", "sliding_attention"],
        "rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}},
    }),
}


def longrope(original_max_positions: int) -> dict[str, object]:
    """Phi-3's LongRoPE for head_dim 16 (8 frequencies): short factors (those served) far from 1 so a
    server that ignores them rotates differently, and long factors unlike them."""
    return {"rope_type": "longrope", "rope_theta": 10000.0,
            "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.6, 3.3, 4.0],
            "long_factor": [1.0, 2.0, 4.0, 8.0, 12.0, 16.0, 24.0, 32.0],
            "original_max_position_embeddings": original_max_positions}


# Phi-3 with LongRoPE whose original_max_position_embeddings is the whole (served) context, so
# the short factors serve every position; and a sliding window (Phi-3 mini has one of 2047).
_PHI3 = {"rope_parameters": longrope(MAX_POSITIONS), "original_max_position_embeddings": MAX_POSITIONS,
         "sliding_window": SLIDING_WINDOW}

_ARCH_CONFIGS: dict[str, tuple[type[PretrainedConfig], dict[str, object]]] = {
    "llama": (LlamaConfig, {}),
    "llama3": (LlamaConfig, {"rope_parameters": _LLAMA3_ROPE}),
    "mistral": (MistralConfig, {"sliding_window": SLIDING_WINDOW}),
    "qwen2": (Qwen2Config, {}),
    # head_dim * heads = 128 != hidden 64, so q/o projections are not square.
    "qwen3": (Qwen3Config, {"head_dim": 32}),
    **{arch: (config_class, {**_GEMMA_COMMON, **extra}) for arch, (config_class, extra) in _GEMMA_CONFIGS.items()},
    "phi3": (Phi3Config, _PHI3),
}
# Phi-3's fused modules -> the Llama-family modules they hold: its adapters name the fused ones.
_FUSED_NAMES = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj",
                "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj"}

# Default init leaves biases at 0 and norm weights at 1; perturb them so a server that
# drops a bias or a norm weight produces different logits.
_BIAS_STD = 0.1
_NORM_WEIGHT_STD = 0.1

# Per-element std of the scaled LoRA delta (scaling * B @ A), half the base weights' 0.02:
# large enough to change greedy tokens, small enough to keep the model's behaviour.
_LORA_DELTA_STD = 0.01
# Relative std of DoRA's magnitude around the adapted weight's row norms (where PEFT starts
# it), so that its rescaling is far from the identity without swamping the model.
_DORA_MAGNITUDE_STD = 0.2


def build_tiny_model(
    out_dir: Path,
    arch: str,
    *,
    dtype: str = "float32",
    tie_word_embeddings: bool | None = None,
    shard: bool = False,
    seed: int = 0,
    **config_overrides: object,
) -> Path:
    """Write a random-weight `arch` model plus tokenizer and generation config to `out_dir`
    (`tie_word_embeddings` None: as the architecture usually does, i.e. only Gemma ties;
    `config_overrides`: config fields to set besides the architecture's)."""
    config = _config(arch, tie_word_embeddings, config_overrides)
    _write_model(out_dir, config, dtype=dtype, shard=shard, seed=seed)
    build_tokenizer(out_dir, max_length=MAX_POSITIONS)
    return out_dir


def _config(arch: str, tie_word_embeddings: bool | None, overrides: dict[str, object]) -> PretrainedConfig:
    if arch not in _ARCH_CONFIGS:
        raise ValueError(f"unknown architecture {arch!r}; expected one of {ARCHITECTURES}")
    config_class, extra = _ARCH_CONFIGS[arch]
    settings = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=MAX_POSITIONS,
        initializer_range=0.02,
        tie_word_embeddings=False,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
    )
    settings.update(extra)
    settings.update(overrides)
    if tie_word_embeddings is not None:
        settings["tie_word_embeddings"] = tie_word_embeddings
    return config_class(**settings)


def _write_model(out_dir: Path, config: PretrainedConfig, *, dtype: str, shard: bool, seed: int) -> None:
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {tuple(_DTYPES)}")
    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG stream alone
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
        _perturb_biases_and_norms(model)
    model.to(_DTYPES[dtype])
    # Without a small limit the whole model fits in one file.
    max_shard_size = "100KB" if shard else "10GB"
    model.save_pretrained(out_dir, safe_serialization=True, max_shard_size=max_shard_size)


@torch.no_grad()
def _perturb_biases_and_norms(model: torch.nn.Module) -> None:
    for name, param in model.named_parameters():
        if name.endswith(".bias"):
            param.normal_(0.0, _BIAS_STD)
        elif name.endswith("norm.weight"):  # around 1 (Llama), around 0 (Gemma's 1 + w)
            param.add_(_NORM_WEIGHT_STD * torch.randn_like(param))


@dataclass(frozen=True)
class AdapterSpec:
    """What `build_adapter` asks PEFT for; mirrors `peft.LoraConfig` fields."""

    rank: int = 8
    alpha: float = 16
    target_modules: list[str] | str = field(default_factory=lambda: ["q_proj", "v_proj"])
    use_rslora: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    fan_in_fan_out: bool = False
    use_dora: bool = False
    modules_to_save: list[str] | None = None
    exclude_modules: list[str] | str | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    dtype: str = "float32"  # dtype of the saved adapter tensors
    seed: int = 0


STANDARD_ADAPTER_SPECS: dict[str, AdapterSpec] = {
    "qv_r8": AdapterSpec(seed=1),
    "all7_r16_a8": AdapterSpec(
        rank=16,
        alpha=8,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        seed=2,
    ),
    "rslora_r4": AdapterSpec(rank=4, use_rslora=True, target_modules=["o_proj", "gate_proj", "down_proj"], seed=3),
    "regex_q_up": AdapterSpec(target_modules=r".*\.(q_proj|up_proj)", seed=4),
    "all_linear": AdapterSpec(target_modules="all-linear", seed=5),
    # The form PEFT itself saves for "all-linear": full module paths rather than suffixes.
    "full_paths": AdapterSpec(
        target_modules=["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"], seed=6
    ),
    "rank_alpha_pattern": AdapterSpec(
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        rank_pattern={"k_proj": 2, "model.layers.1.self_attn.q_proj": 12},
        alpha_pattern={"o_proj": 4, "model.layers.0.self_attn.v_proj": 32},
        seed=7,
    ),
    "fan_in_fan_out": AdapterSpec(fan_in_fan_out=True, seed=8),
    "layer1_only": AdapterSpec(target_modules=["q_proj", "v_proj", "down_proj"], layers_to_transform=[1], seed=9),
    "bf16_qv": AdapterSpec(dtype="bfloat16", seed=10),
}


def spec_for(arch: str, spec: AdapterSpec) -> AdapterSpec:
    """`spec` in `arch`'s module names: for Phi-3, q/k/v and gate/up become its fused qkv_proj and
    gate_up_proj (in target_modules, exclude_modules and the pattern keys)."""
    if arch != "phi3":
        return spec

    def fused(names: str) -> str:
        return re.sub(r"\b(q|k|v|gate|up)_proj\b", lambda m: _FUSED_NAMES[m[0]], names)

    def fused_list(names: list[str] | str | None) -> list[str] | str | None:
        if isinstance(names, list):
            return list(dict.fromkeys(fused(n) for n in names))
        return names if names is None else fused(names)

    def fused_pattern(pattern: dict[str, float]) -> dict[str, float]:
        # Fused names can make keys overlap (k_proj and a layer's q_proj both become qkv_proj), where
        # the first matching key wins: keep the key order of the adapter_config.json written (sorted),
        # so PEFT builds the adapter by the order it and the server read back.
        return dict(sorted((fused(key), value) for key, value in pattern.items()))

    return replace(spec, target_modules=fused_list(spec.target_modules), exclude_modules=fused_list(spec.exclude_modules),
                   rank_pattern=fused_pattern(spec.rank_pattern), alpha_pattern=fused_pattern(spec.alpha_pattern))


def build_adapter(model_dir: Path, out_dir: Path, spec: AdapterSpec) -> Path:
    """Write a PEFT LoRA adapter for the model in `model_dir` with random non-zero A and B."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        peft_model = get_peft_model(model, _lora_config(spec))
        _randomise_lora(peft_model)
    peft_model.to(_DTYPES[spec.dtype]).save_pretrained(out_dir, safe_serialization=True)
    _restore_spec_fields(out_dir, spec)
    return out_dir


def _lora_config(spec: AdapterSpec) -> LoraConfig:
    return LoraConfig(
        task_type="CAUSAL_LM",
        r=spec.rank,
        lora_alpha=spec.alpha,
        target_modules=spec.target_modules,
        use_rslora=spec.use_rslora,
        rank_pattern=dict(spec.rank_pattern),
        alpha_pattern=dict(spec.alpha_pattern),
        fan_in_fan_out=spec.fan_in_fan_out,
        use_dora=spec.use_dora,
        modules_to_save=spec.modules_to_save,
        exclude_modules=spec.exclude_modules,
        layers_to_transform=spec.layers_to_transform,
        layers_pattern=spec.layers_pattern,
        lora_dropout=0.0,
        init_lora_weights=False,
    )


@torch.no_grad()
def _randomise_lora(model: PeftModel) -> None:
    """Draw A and B so that scaling * B @ A has per-element std _LORA_DELTA_STD.

    init_lora_weights=False keeps nn.Linear's default init, B ~ U(+-1/sqrt(r)), whose delta
    dwarfs the base weights. Normalising by each layer's own scaling keeps every adapter's
    effect comparable whatever its rank, alpha, rslora or rank/alpha pattern, while a server
    that gets the scaling wrong still produces a delta of the wrong size.

    DoRA's magnitude, which PEFT initialises to the row norms of W + scaling * B @ A before A
    and B are redrawn here, becomes those norms for the new A and B times 1 +- _DORA_MAGNITUDE_STD.
    An embedding's LoRA (PEFT draws both from randn) gets a delta of the same std per element.
    """
    for module in model.modules():
        if not isinstance(module, LoraLayer):
            continue
        for name, embedding_a in module.lora_embedding_A.items():  # A [r, vocab] is looked up, B [hidden, r]
            embedding_a.normal_(0.0, 1.0)
            rank = embedding_a.shape[0]
            module.lora_embedding_B[name].normal_(0.0, _LORA_DELTA_STD / (module.scaling[name] * rank**0.5))
        for name, lora_a in module.lora_A.items():  # empty for LoRA on embeddings
            rank, fan_in = lora_a.weight.shape
            lora_a.weight.normal_(0.0, fan_in**-0.5)
            b_std = _LORA_DELTA_STD * fan_in**0.5 / (module.scaling[name] * rank**0.5)
            module.lora_B[name].weight.normal_(0.0, b_std)
            if name in module.lora_magnitude_vector:
                magnitude = module.lora_magnitude_vector[name].weight
                norms = torch.linalg.vector_norm(module.get_base_layer().weight + module.get_delta_weight(name), dim=1)
                magnitude.copy_(norms * (1 + _DORA_MAGNITUDE_STD * torch.randn_like(norms)))


def _restore_spec_fields(out_dir: Path, spec: AdapterSpec) -> None:
    """Make adapter_config.json state the spec's target_modules and fan_in_fan_out.

    PEFT rewrites both before saving: "all-linear" becomes the matched module paths (and lists
    come back in set order), and fan_in_fan_out is reset to False for nn.Linear. PEFT reloads
    the original values to the same model, so the server must accept them too.
    """
    path = out_dir / "adapter_config.json"
    config = json.loads(path.read_text())
    config["target_modules"] = spec.target_modules
    config["fan_in_fan_out"] = spec.fan_in_fan_out
    path.write_text(json.dumps(config, indent=2, sort_keys=True))


def rewrite_adapter(source: Path, path: Path, *, config: Callable[[dict], dict] | None = None,
                    rename: Callable[[str], str] | None = None, drop: Callable[[str], bool] | None = None) -> Path:
    """A copy of an adapter at `path`, its config mapped by `config`, its weight keys renamed by
    `rename` and those `drop` selects left out (the layouts and fields other trainers write)."""
    shutil.copytree(source, path)
    if config is not None:
        config_path = path / "adapter_config.json"
        config_path.write_text(json.dumps(config(json.loads(config_path.read_text()))))
    weights = path / "adapter_model.safetensors"
    tensors = load_file(weights)
    save_file({(rename(k) if rename else k): v for k, v in tensors.items() if not (drop and drop(k))}, weights)
    return path


def build_dora_adapter(model_dir: Path, out_dir: Path) -> Path:
    """DoRA: adds `lora_magnitude_vector` tensors and `use_dora: true`."""
    return build_adapter(model_dir, out_dir, AdapterSpec(use_dora=True))


# --- Adapters the server must refuse -------------------------------------------------------


def build_pickle_only_adapter(model_dir: Path, out_dir: Path) -> Path:
    """A valid adapter whose weights exist only as a torch.save pickle (adapter_model.bin)."""
    build_adapter(model_dir, out_dir, AdapterSpec())
    safetensors_path = out_dir / "adapter_model.safetensors"
    torch.save(load_file(safetensors_path), out_dir / "adapter_model.bin")
    safetensors_path.unlink()
    return out_dir


def build_truncated_adapter(model_dir: Path, out_dir: Path) -> Path:
    """A valid adapter whose safetensors file lost its second half (header intact)."""
    build_adapter(model_dir, out_dir, AdapterSpec())
    path = out_dir / "adapter_model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return out_dir


def build_corrupt_adapter(model_dir: Path, out_dir: Path) -> Path:
    """A valid adapter_config.json next to an adapter_model.safetensors of random bytes."""
    build_adapter(model_dir, out_dir, AdapterSpec())
    path = out_dir / "adapter_model.safetensors"
    path.write_bytes(random.Random(0).randbytes(path.stat().st_size))
    return out_dir


def build_embedding_adapter(model_dir: Path, out_dir: Path, *, target: str = "embed_tokens") -> Path:
    """LoRA on `target` ("embed_tokens" or "lm_head") besides q_proj.

    For embed_tokens PEFT saves `lora_embedding_A`/`lora_embedding_B` (no `.weight`) and the
    full base embedding as `...embed_tokens.base_layer.weight`.
    """
    return build_adapter(model_dir, out_dir, AdapterSpec(target_modules=["q_proj", target]))


def build_resized_vocab_adapter(model_dir: Path, out_dir: Path, *, extra_tokens: int = 16) -> Path:
    """LoRA on embed_tokens and lm_head of the same model with `extra_tokens` more tokens, as a
    trainer that added tokens (resize_token_embeddings) saves it."""
    config = AutoConfig.from_pretrained(model_dir)
    config.vocab_size += extra_tokens
    with tempfile.TemporaryDirectory() as other_base:
        _write_model(Path(other_base), config, dtype="float32", shard=False, seed=0)
        return build_adapter(Path(other_base), out_dir, AdapterSpec(target_modules=["q_proj", "embed_tokens",
                                                                                    "lm_head"]))


def build_modules_to_save_adapter(model_dir: Path, out_dir: Path) -> Path:
    """modules_to_save=["lm_head"]: the adapter carries a full `base_model.model.lm_head.weight`."""
    return build_adapter(model_dir, out_dir, AdapterSpec(modules_to_save=["lm_head"]))


def build_saving_adapter(model_dir: Path, out_dir: Path, spec: AdapterSpec) -> Path:
    """An adapter with `spec.modules_to_save` tables of its own: PEFT saves copies of the base
    tables, which would make its output the base model's; each is redrawn at the base table's std."""
    path = build_adapter(model_dir, out_dir, spec)
    weights = path / "adapter_model.safetensors"
    tensors = load_file(weights)
    generator = torch.Generator().manual_seed(spec.seed)
    for key, value in tensors.items():
        if "lora" not in key and key.endswith(("embed_tokens.weight", "lm_head.weight")):
            noise = torch.randn(value.shape, generator=generator, dtype=torch.float32)
            tensors[key] = (noise * value.float().std()).to(value.dtype)
    save_file(tensors, weights)
    return path


def build_adapter_for_other_base(model_dir: Path, out_dir: Path) -> Path:
    """An adapter for the same architecture with hidden size 96, so lora_A shapes do not fit."""
    config = AutoConfig.from_pretrained(model_dir)
    config.hidden_size = OTHER_BASE_HIDDEN_SIZE
    with tempfile.TemporaryDirectory() as other_base:
        _write_model(Path(other_base), config, dtype="float32", shard=False, seed=0)
        return build_adapter(Path(other_base), out_dir, AdapterSpec())


def build_high_rank_adapter(model_dir: Path, out_dir: Path, rank: int) -> Path:
    """Rank `rank` on q/v with alpha = rank (scaling 1), e.g. to exceed max_lora_rank."""
    return build_adapter(model_dir, out_dir, AdapterSpec(rank=rank, alpha=rank))
