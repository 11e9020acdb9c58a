"""The Llama family (Llama 2/3, Mistral, Qwen2, Qwen3) over a ragged batch.

One forward takes every token of every sequence flattened into [T]; q/k/v and gate/up
are fused into one matrix each; LoRA deltas are added per module through a `LoraHook`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from worker.attention import attention_mask, padded_group_attention
from worker.kernels.elementwise import add_rms_norm, rope_and_cache_kv, silu_mul
from worker.kv_cache import PagedKVCache
from worker.model.config import ModelConfig
from worker.model.rope import RotaryEmbedding
from worker.step_inputs import EagerStepTensors
from worker.tensor_parallel import TensorParallel


# (layer index, rotated queries [T, heads, head_dim]) -> attention output of the same shape,
# over that layer's KV cache, which already holds this forward's keys and values.
Attend = Callable[[int, torch.Tensor], torch.Tensor]


QKV_MODULES = ("q_proj", "k_proj", "v_proj")
O_MODULES = ("o_proj",)
GATE_UP_MODULES = ("gate_proj", "up_proj")
DOWN_MODULES = ("down_proj",)
LORA_GROUPS = (QKV_MODULES, O_MODULES, GATE_UP_MODULES, DOWN_MODULES)  # modules that share an input


class LoraHook(Protocol):
    def before_layer(self, layer: int) -> None:
        """Called before a layer's first use of adapter weights (a load may still be landing)."""

    def start_deltas(self, x: torch.Tensor, layer: int, modules: Sequence[str]) -> None:
        """Called before the base product of `modules` (sharing the input x): the part of their
        deltas that needs x alone may start beside it; `finish_deltas` follows with the outputs."""

    def finish_deltas(self, x: torch.Tensor, layer: int,
                      outputs: Sequence[tuple[str, torch.Tensor]]) -> torch.Tensor | None:
        """For modules sharing the input x, whose outputs (module, out) are consecutive column
        ranges of one matrix [T, N], in order and covering it: either adds each module's LoRA
        delta for token t to out[t] and returns None, or returns the deltas as one [T, N]
        matrix for the caller's next kernel to add."""


@dataclass
class LayerWeights:
    input_norm: torch.Tensor
    qkv: torch.Tensor  # [q + 2 kv, hidden]
    qkv_bias: torch.Tensor | None
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    o: torch.Tensor
    o_bias: torch.Tensor | None
    post_norm: torch.Tensor
    gate_up: torch.Tensor  # [2 intermediate, hidden]
    gate_up_bias: torch.Tensor | None
    down: torch.Tensor
    down_bias: torch.Tensor | None


@dataclass
class ModelWeights:
    embed: torch.Tensor
    layers: list[LayerWeights]
    norm: torch.Tensor
    lm_head: torch.Tensor


def fuse_weights(config: ModelConfig, tensors: dict[str, torch.Tensor]) -> ModelWeights:
    """Checkpoint tensors by HF name -> fused per-layer weights (consumes `tensors`)."""
    layers = [_fuse_layer(config, tensors, f"model.layers.{i}.") for i in range(config.num_layers)]
    embed = tensors.pop("model.embed_tokens.weight")
    lm_head = embed if config.tie_word_embeddings else tensors.pop("lm_head.weight")
    return ModelWeights(embed=embed, layers=layers, norm=tensors.pop("model.norm.weight"), lm_head=lm_head)


def _fuse_layer(config: ModelConfig, tensors: dict[str, torch.Tensor], prefix: str) -> LayerWeights:
    def take(name: str) -> torch.Tensor | None:
        return tensors.pop(prefix + name, None)

    def cat(*names: str) -> torch.Tensor | None:
        parts = [take(n) for n in names]
        return None if parts[0] is None else torch.cat(parts)

    return LayerWeights(
        input_norm=take("input_layernorm.weight"),
        qkv=cat("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
        qkv_bias=cat("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"),
        q_norm=take("self_attn.q_norm.weight"),
        k_norm=take("self_attn.k_norm.weight"),
        o=take("self_attn.o_proj.weight"),
        o_bias=take("self_attn.o_proj.bias"),
        post_norm=take("post_attention_layernorm.weight"),
        gate_up=cat("mlp.gate_proj.weight", "mlp.up_proj.weight"),
        gate_up_bias=cat("mlp.gate_proj.bias", "mlp.up_proj.bias"),
        down=take("mlp.down_proj.weight"),
        down_bias=take("mlp.down_proj.bias"),
    )


class LlamaModel:
    def __init__(self, config: ModelConfig, weights: ModelWeights, device: torch.device,
                 tp: TensorParallel = TensorParallel()) -> None:
        """`config` and `weights` are this rank's part of the model (all of it without tensor parallelism)."""
        self.config = config
        self.weights = weights
        self.tp = tp
        self.rope = RotaryEmbedding(config, device)
        self.scale = config.head_dim**-0.5

    @property
    def dtype(self) -> torch.dtype:
        return self.weights.embed.dtype

    def forward(self, step: EagerStepTensors, kv_cache: PagedKVCache, lora: LoraHook) -> torch.Tensor:
        """Runs all layers over a ragged step (reference attention); returns final-normed hidden [T, hidden]."""
        masks = {w: [attention_mask(group, w) for group in step.attention] for w in set(self.config.sliding_windows)}

        def attend(index: int, q: torch.Tensor) -> torch.Tensor:
            mask = masks[self.config.sliding_windows[index]]
            return padded_group_attention(q, kv_cache.keys(index), kv_cache.values(index), step.attention, mask,
                                          self.scale)

        return self.forward_tokens(step.input_ids, step.positions, step.kv_write_index, kv_cache, lora, attend)

    def forward_tokens(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_write_index: torch.Tensor,
                       kv_cache: PagedKVCache, lora: LoraHook, attend: Attend) -> torch.Tensor:
        """All layers over flat tokens; `attend` is the attention back-end. Returns final-normed hidden."""
        hidden = self.tp.embed(self.weights.embed, input_ids)
        mlp_out = (None, None)  # the last MLP output and its LoRA deltas, added to hidden by the next norm's kernel
        cos, sin = self.rope.cos_sin(positions, self.dtype)
        for index, layer in enumerate(self.weights.layers):
            lora.before_layer(index)
            hidden, mlp_out = self._layer(index, layer, hidden, mlp_out, kv_write_index, kv_cache, lora, cos, sin,
                                          attend)
        return add_rms_norm(hidden, mlp_out[0], self.weights.norm, self.config.rms_norm_eps, mlp_out[1])[1]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.tp.gather_vocab(F.linear(hidden, self.weights.lm_head).float(), self.config.vocab_size)

    def _layer(self, index, layer: LayerWeights, hidden, mlp_out, kv_write_index, kv_cache, lora, cos, sin,
               attend) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor | None]]:
        """(residual stream, previous layer's MLP output and LoRA deltas or Nones) -> the same for
        the next layer: each residual add (and the LoRA deltas' add) is fused into the next norm."""
        eps = self.config.rms_norm_eps
        hidden, x = add_rms_norm(hidden, mlp_out[0], layer.input_norm, eps, mlp_out[1])
        attn_out, attn_lora = self._attention(index, layer, x, kv_write_index, kv_cache, lora, cos, sin, attend)
        hidden, x = add_rms_norm(hidden, attn_out, layer.post_norm, eps, attn_lora)
        return hidden, self._mlp(index, layer, x, lora)

    def _attention(self, index, layer: LayerWeights, x, kv_write_index, kv_cache, lora, cos, sin,
                   attend) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The o projection's output and its LoRA deltas if not added yet; writes k and v to the cache."""
        c = self.config
        lora.start_deltas(x, index, QKV_MODULES)
        qkv = F.linear(x, layer.qkv, layer.qkv_bias)
        qkv_lora = lora.finish_deltas(x, index, tuple(zip(QKV_MODULES, qkv.split((c.q_size, c.kv_size, c.kv_size), 1))))
        norms = (layer.q_norm, layer.k_norm) if c.qk_norm else (None, None)
        q = rope_and_cache_kv(qkv, qkv_lora, c.num_heads, c.num_kv_heads, c.head_dim, cos, sin, *norms,
                              c.rms_norm_eps, keys=kv_cache.keys(index), values=kv_cache.values(index),
                              write_index=kv_write_index)
        attn = attend(index, q).reshape(-1, c.q_size)
        lora.start_deltas(attn, index, O_MODULES)
        out = F.linear(attn, layer.o, layer.o_bias)
        return self._row_parallel_sum(out, lora.finish_deltas(attn, index, (("o_proj", out),)))

    def _mlp(self, index, layer: LayerWeights, x, lora) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The down projection's output and its LoRA deltas if not added yet."""
        i = self.config.intermediate_size
        lora.start_deltas(x, index, GATE_UP_MODULES)
        gate_up = F.linear(x, layer.gate_up, layer.gate_up_bias)
        gate_up_lora = lora.finish_deltas(x, index, tuple(zip(GATE_UP_MODULES, gate_up.split(i, 1))))
        h = silu_mul(gate_up, gate_up_lora)
        lora.start_deltas(h, index, DOWN_MODULES)
        out = F.linear(h, layer.down, layer.down_bias)
        return self._row_parallel_sum(out, lora.finish_deltas(h, index, (("down_proj", out),)))

    def _row_parallel_sum(self, out: torch.Tensor, deltas: torch.Tensor | None
                          ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A row-parallel module's output: each rank's partial sum, LoRA deltas included, summed over
        the ranks (without tensor parallelism, the deltas are left to the next norm's kernel to add)."""
        if not self.tp.enabled:
            return out, deltas
        if deltas is not None:
            out += deltas
        return self.tp.all_reduce(out), None
