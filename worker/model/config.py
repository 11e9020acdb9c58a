"""What the worker needs to know about a checkpoint, read from config.json: the Llama family,
Gemma 2/3 as knobs on it (norm offset, GeGLU, softcaps, embedding and attention scales,
sandwich norms, a rope per layer type), and Phi-3 (fused q/k/v and gate/up projections,
LongRoPE)."""

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
    "Phi3ForCausalLM",
)
GEMMA_ARCHITECTURES = ("Gemma2ForCausalLM", "Gemma3ForCausalLM")
# Rope types whose frequencies do not depend on the sequence length.
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
# LongRoPE's frequencies depend on the sequence length only past original_max_position_embeddings
# (see `ModelConfig.check_served_context`).
LONGROPE = "longrope"
# Phi-3's fused projections (in its checkpoint and adapters) -> the engine's modules they hold, in row order.
FUSED_MODULES = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj")

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
    # Phi-3: the checkpoint and adapters hold qkv_proj and gate_up_proj, split at load into the
    # engine's q/k/v and gate/up (see `module_parts`).
    fused_projections: bool = False

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

    def checkpoint_modules(self) -> tuple[str, ...]:
        """The linear modules by the HF model's names, which checkpoints and adapters use."""
        if self.fused_projections:
            return ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
        return tuple(self.module_shapes())

    def module_parts(self, module: str) -> tuple[tuple[str, slice], ...]:
        """A checkpoint module's engine modules, each with its rows of the module's output."""
        shapes = self.module_shapes()
        parts = FUSED_MODULES[module] if self.fused_projections and module in FUSED_MODULES else (module,)
        rows, start = [], 0
        for part in parts:
            rows.append((part, slice(start, start + shapes[part][1])))
            start += shapes[part][1]
        return tuple(rows)

    def checkpoint_module_shape(self, module: str) -> tuple[int, int]:
        """(in_features, out_features) of a checkpoint module (a fused one's rows are its parts')."""
        parts = self.module_parts(module)
        return self.module_shapes()[parts[0][0]][0], parts[-1][1].stop

    def check_served_context(self, context: int) -> None:
        """Refuses a LongRoPE model served past original_max_position_embeddings: transformers then
        switches every position of the sequence to the long factors, rotating the keys already in
        the cache anew, which a paged KV cache (keys rotated once, when written) cannot follow."""
        for layer_rope in sorted(set(self.layer_ropes), key=str):
            parameters = self.rope_parameters(layer_rope)
            if parameters.get("rope_type") != LONGROPE:
                continue
            original = parameters["original_max_position_embeddings"]
            if context > original:
                raise ModelLoadError(
                    f"the served context ({context} tokens: --context-length, else max_position_embeddings) exceeds "
                    f"the LongRoPE original_max_position_embeddings ({original}); past it transformers re-rotates the "
                    f"whole sequence with the long factors, which a paged KV cache cannot do: give "
                    f"--context-length {original} or less"
                )


def module_parent(module: str) -> str:
    """The submodule of a decoder layer that holds a linear module."""
    return "self_attn" if module in ATTENTION_MODULES else "mlp"


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
        _check_rope(_rope_parameters(hf, layer_rope))
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
        fused_projections=architecture == "Phi3ForCausalLM",
        **(_gemma_knobs(hf) if is_gemma else {}),
    )


def _check_rope(parameters: dict) -> None:
    rope_type = parameters.get("rope_type", "default")
    if rope_type not in (*STATIC_ROPE_TYPES, LONGROPE):
        raise ModelLoadError(f"rope type {rope_type!r} is not supported ({', '.join(STATIC_ROPE_TYPES + (LONGROPE,))})")
    # The rope kernel rotates all of head_dim; a partial rope leaves the rest of each head unrotated.
    partial = parameters.get("partial_rotary_factor", 1.0)
    if partial != 1.0:
        raise ModelLoadError(f"partial_rotary_factor {partial} is not supported: the rope rotates whole heads (1.0)")


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
