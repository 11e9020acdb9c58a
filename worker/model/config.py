"""What the worker needs to know about a checkpoint, read from config.json: the Llama family,
and Gemma 2/3 as knobs on it (norm offset, GeGLU, softcaps, embedding and attention scales,
sandwich norms, a rope per layer type)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch
from transformers import AutoConfig, GenerationConfig, PretrainedConfig

from worker.errors import ModelLoadError
from worker.kernels.elementwise import ACTIVATIONS

SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "Gemma2ForCausalLM",
    "Gemma3ForCausalLM",
)
GEMMA_ARCHITECTURES = ("Gemma2ForCausalLM", "Gemma3ForCausalLM")
# Rope types whose frequencies do not depend on the sequence length.
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool
    tie_word_embeddings: bool
    max_position_embeddings: int
    sliding_windows: tuple[int | None, ...]  # per layer; None means full attention
    # Per layer, its key in hf_config.rope_parameters where ropes differ by layer type
    # (Gemma 3: local layers have their own base); None where one rope serves every layer.
    layer_ropes: tuple[str | None, ...]
    attention_scale: float  # of q.k: head_dim ** -0.5, Gemma's query_pre_attn_scalar ** -0.5
    eos_token_ids: tuple[int, ...]
    hf_config: PretrainedConfig  # kept for the rope initialisers of transformers
    # Gemma's knobs; the defaults are the Llama family's.
    activation: str = "silu"  # of the gated MLP, by HF's name, one of elementwise.ACTIVATIONS
    norm_weight_offset: float = 0.0  # Gemma's RMSNorms scale by (1 + weight), in float32
    sandwich_norms: bool = False  # Gemma's norms after attention and around the MLP
    embed_scale: float | None = None  # Gemma multiplies embeddings by sqrt(hidden_size)
    attn_logit_softcap: float = 0.0  # scores -> cap * tanh(scores / cap); 0: none
    final_logit_softcap: float = 0.0  # likewise for the logits

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def rope_parameters(self, layer_rope: str | None) -> dict:
        """The rope of layers keyed `layer_rope` in `layer_ropes` (None: the model's one rope)."""
        return _rope_parameters(self.hf_config, layer_rope)

    def rope_type(self, layer_rope: str | None) -> str:
        return self.rope_parameters(layer_rope).get("rope_type", "default")

    def module_shapes(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each LoRA-targetable linear module."""
        h, i = self.hidden_size, self.intermediate_size
        return {
            "q_proj": (h, self.q_size),
            "k_proj": (h, self.kv_size),
            "v_proj": (h, self.kv_size),
            "o_proj": (self.q_size, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }


def load_model_config(model_dir: str | Path) -> ModelConfig:
    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path} has no config.json: give a Hugging Face model directory (config.json and safetensors weights)")
    hf = AutoConfig.from_pretrained(path, local_files_only=True)
    config = model_config_from_hf(hf)
    generation_eos = _generation_eos_token_ids(path)
    if generation_eos:
        config = replace(config, eos_token_ids=tuple(dict.fromkeys(config.eos_token_ids + generation_eos)))
    return config


def model_config_from_hf(hf: PretrainedConfig) -> ModelConfig:
    architecture = _architecture(hf)
    is_gemma = architecture in GEMMA_ARCHITECTURES
    # Gemma's configs name the activation hidden_activation (and its modeling reads only that).
    activation = hf.hidden_activation if is_gemma else getattr(hf, "hidden_act", "silu")
    if activation not in ACTIVATIONS:
        raise ModelLoadError(f"activation {activation!r} is not supported ({', '.join(ACTIVATIONS)})")
    layer_ropes = _layer_ropes(hf)
    for layer_rope in sorted(set(layer_ropes), key=str):
        rope_type = _rope_parameters(hf, layer_rope).get("rope_type", "default")
        if rope_type not in STATIC_ROPE_TYPES:
            raise ModelLoadError(f"rope type {rope_type!r} is not supported ({', '.join(STATIC_ROPE_TYPES)})")
    is_qwen2 = architecture == "Qwen2ForCausalLM"
    attention_bias = bool(getattr(hf, "attention_bias", False))
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    return ModelConfig(
        architecture=architecture,
        vocab_size=hf.vocab_size,
        hidden_size=hf.hidden_size,
        intermediate_size=hf.intermediate_size,
        num_layers=hf.num_hidden_layers,
        num_heads=hf.num_attention_heads,
        num_kv_heads=getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads,
        head_dim=head_dim,
        rms_norm_eps=hf.rms_norm_eps,
        qkv_bias=is_qwen2 or attention_bias,
        o_bias=attention_bias and not is_qwen2,
        mlp_bias=bool(getattr(hf, "mlp_bias", False)),
        qk_norm=architecture in ("Qwen3ForCausalLM", "Gemma3ForCausalLM"),
        tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
        max_position_embeddings=hf.max_position_embeddings,
        sliding_windows=_sliding_windows(hf),
        layer_ropes=layer_ropes,
        attention_scale=hf.query_pre_attn_scalar**-0.5 if is_gemma else head_dim**-0.5,
        eos_token_ids=_eos_token_ids(hf),
        hf_config=hf,
        activation=activation,
        **(_gemma_knobs(hf) if is_gemma else {}),
    )


def _gemma_knobs(hf: PretrainedConfig) -> dict[str, object]:
    if getattr(hf, "use_bidirectional_attention", None):
        raise ModelLoadError("use_bidirectional_attention (Gemma embedding models) is not supported")
    return {
        "norm_weight_offset": 1.0,
        "sandwich_norms": True,
        "embed_scale": hf.hidden_size**0.5,
        "attn_logit_softcap": float(hf.attn_logit_softcapping or 0.0),
        "final_logit_softcap": float(hf.final_logit_softcapping or 0.0),
    }


def _layer_ropes(hf: PretrainedConfig) -> tuple[str | None, ...]:
    """Each layer's key in rope_parameters where they are keyed by layer type (Gemma 3), else None."""
    layer_types = getattr(hf, "layer_types", None)
    if layer_types is not None and set(layer_types) <= set(hf.rope_parameters):
        return tuple(layer_types)
    return (None,) * hf.num_hidden_layers


def _architecture(hf: PretrainedConfig) -> str:
    architectures = getattr(hf, "architectures", None) or []
    supported = [a for a in architectures if a in SUPPORTED_ARCHITECTURES]
    if not supported:
        raise ModelLoadError(
            f"architectures {architectures} not supported; expected one of {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return supported[0]


def _rope_parameters(hf: PretrainedConfig, layer_rope: str | None) -> dict:
    return hf.rope_parameters if layer_rope is None else hf.rope_parameters[layer_rope]


def _sliding_windows(hf: PretrainedConfig) -> tuple[int | None, ...]:
    window = getattr(hf, "sliding_window", None)
    layer_types = getattr(hf, "layer_types", None)
    if layer_types is not None:
        return tuple(window if kind == "sliding_attention" else None for kind in layer_types)
    if getattr(hf, "use_sliding_window", True) is False:
        window = None
    return (window,) * hf.num_hidden_layers


def _eos_token_ids(hf: PretrainedConfig) -> tuple[int, ...]:
    eos = getattr(hf, "eos_token_id", None)
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, list | tuple) else (eos,)


def _generation_eos_token_ids(model_dir: Path) -> tuple[int, ...]:
    """generation_config.json may name more end tokens than config.json (Llama 3 does)."""
    if not (model_dir / "generation_config.json").is_file():
        return ()
    return _eos_token_ids(GenerationConfig.from_pretrained(model_dir, local_files_only=True))
