"""Rotary position embeddings, with the frequency initialisers of transformers.

LongRoPE's initialiser, called without a sequence length, gives the short factors and its
attention factor: what transformers uses up to original_max_position_embeddings, past which the
engine refuses to serve (`ModelConfig.check_served_context`)."""

from __future__ import annotations

import torch
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from worker.model.config import ModelConfig


class RotaryEmbedding:
    """Computes cos/sin for arbitrary positions (`worker.kernels.elementwise.rope_and_cache_kv` rotates q and k with them)."""

    def __init__(self, config: ModelConfig, device: torch.device, layer_rope: str | None = None) -> None:
        """`layer_rope`: the layers' key in `config.layer_ropes` (None: the model's one rope)."""
        self.inv_freq, self.attention_scaling = _inv_freq(config, device, layer_rope)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """[T] positions -> cos, sin of shape [T, 1, head_dim], computed in float32 like HF."""
        freqs = positions.to(torch.float32)[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = (emb.cos() * self.attention_scaling).to(dtype)
        sin = (emb.sin() * self.attention_scaling).to(dtype)
        return cos[:, None, :], sin[:, None, :]


def _inv_freq(config: ModelConfig, device: torch.device, layer_rope: str | None) -> tuple[torch.Tensor, float]:
    rope_type = config.rope_type(layer_rope)
    if rope_type == "default":
        base = config.rope_parameters(layer_rope)["rope_theta"]
        dim = config.head_dim
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float32) / dim))
        return inv_freq.to(device), 1.0
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config.hf_config, device, layer_type=layer_rope)
    return inv_freq.to(device=device, dtype=torch.float32), float(scaling)
