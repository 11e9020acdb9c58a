"""PEFT-format adapters with random weights for any model config, written without PEFT.

Used where building the base model with transformers would be too large (GPU tests and
benchmarks on dummy 8B-class weights).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from safetensors.torch import save_file

# The Llama-3.1-8B configuration (as its config.json), for dummy-weight benchmarks.
LLAMA31_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "vocab_size": 128256, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "torch_dtype": "bfloat16", "tie_word_embeddings": False, "eos_token_id": 128001,
}

# The Llama-3.1-70B configuration: a shape for tensor-parallel runs over several GPUs.
LLAMA31_70B = {**LLAMA31_8B, "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
               "num_attention_heads": 64, "num_key_value_heads": 8}

PARENT_MODULE = {  # each targetable projection's parent in a decoder layer
    "q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
    "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


class AdapterShapes(Protocol):
    """What an adapter's tensors depend on; the worker's `ModelConfig` is one."""

    num_layers: int

    def module_shapes(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each LoRA-targetable linear module."""


@dataclass(frozen=True)
class LayerShapes:
    num_layers: int
    shapes: dict[str, tuple[int, int]]

    def module_shapes(self) -> dict[str, tuple[int, int]]:
        return self.shapes


def write_model_config(model_dir: Path, config: dict = LLAMA31_8B) -> Path:
    """A model directory holding only config.json: enough for `load_format="dummy"`."""
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "config.json").write_text(json.dumps(config))
    return model_dir


def write_random_adapter(
    out_dir: Path,
    model: AdapterShapes,
    *,
    rank: int,
    alpha: float,
    modules: Sequence[str],
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
    std: float = 0.02,
) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    shapes = model.module_shapes()
    tensors = {}
    for layer in range(model.num_layers):
        for module in modules:
            in_features, out_features = shapes[module]
            prefix = f"base_model.model.model.layers.{layer}.{PARENT_MODULE[module]}.{module}"
            tensors[f"{prefix}.lora_A.weight"] = (torch.randn(rank, in_features, generator=generator) * std).to(dtype)
            tensors[f"{prefix}.lora_B.weight"] = (torch.randn(out_features, rank, generator=generator) * std).to(dtype)
    save_file(tensors, out_dir / "adapter_model.safetensors", metadata={"format": "pt"})
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": alpha, "target_modules": list(modules),
              "bias": "none", "use_rslora": False, "use_dora": False, "modules_to_save": None}
    (out_dir / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return out_dir
