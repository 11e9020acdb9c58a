"""The Llama family (Llama 2/3, Mistral, Qwen2, Qwen3), Gemma 2/3 and Phi-3 over a ragged batch.

One forward takes every token of every sequence flattened into [T]; q/k/v and gate/up
are fused into one matrix each; LoRA deltas are added per module through a `LoraHook`.
Gemma differs by the knobs of its `ModelConfig`: its RMSNorms scale by 1 + w (kept as a
float32 weight, see `worker.kernels.elementwise`), the attention and MLP outputs are
normed before their residual adds ("sandwich" norms), embeddings are scaled, GeGLU, a rope
per layer type, and soft-capped attention scores and logits. Phi-3 is this layer once the
loader has split its fused qkv_proj and gate_up_proj (`worker.model.weights`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from settings.config import MODULE_GROUPS
from worker.attention import attention_mask, padded_group_attention
from worker.kernels.elementwise import LoraDeltas, StagedDeltas, act_mul, add_rms_norm, rope_and_cache_kv
from worker.kv_cache import PagedKVCache
from worker.model.config import ModelConfig
from worker.model.rope import RotaryEmbedding
from worker.step_inputs import EagerStepTensors
from worker.tensor_parallel import EmbeddingReplace, TensorParallel


# (layer index, rotated queries [T, heads, head_dim]) -> attention output of the same shape,
# over that layer's KV cache, which already holds this forward's keys and values.
Attend = Callable[[int, torch.Tensor], torch.Tensor]


LORA_GROUPS = MODULE_GROUPS  # modules that share an input
QKV_MODULES, O_MODULES, GATE_UP_MODULES, DOWN_MODULES = LORA_GROUPS
# The LayerWeights field of each group's fused weight (and, with `_bias`, of its bias).
FUSED_FIELDS = {QKV_MODULES: "qkv", O_MODULES: "o", GATE_UP_MODULES: "gate_up", DOWN_MODULES: "down"}


class LoraHook(Protocol):
    def embedding_delta(self, ids: torch.Tensor, inside: torch.Tensor | None) -> torch.Tensor | None:
        """The embedding's LoRA delta of each token [T, hidden] (None: no adapter of the step has
        one); `ids` index this rank's vocabulary part, `inside` marks the tokens in it (None: all)."""

    def before_layer(self, layer: int) -> None:
        """Called before a layer's first use of adapter weights (a load may still be landing)."""

    def gemm_operands(self, layer: int, modules: Sequence[str], weight: torch.Tensor,
                      bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The weight and bias of the base product of `modules` (their fused `weight` and `bias`):
        those, or with LoRA folded in (`worker.lora.folded`), taller ones whose extra output
        columns, past `weight`'s rows, are the shrunk input that `finish_deltas` is given."""

    def start_deltas(self, x: torch.Tensor, layer: int, modules: Sequence[str]) -> None:
        """Called before the base product of `modules` (sharing the input x): the part of their
        deltas that needs x alone may start beside it; `finish_deltas` follows with the outputs."""

    def finish_deltas(self, x: torch.Tensor, layer: int, outputs: Sequence[tuple[str, torch.Tensor]],
                      shrunk: torch.Tensor | None = None) -> LoraDeltas | None:
        """For modules sharing the input x, whose outputs (module, out) are consecutive column
        ranges of one matrix [T, N], in order and covering it: either adds each module's LoRA
        delta for token t to out[t] and returns None, or returns the deltas for the caller's
        next kernel to add. `shrunk`: the product's extra columns, where `gemm_operands` folded."""

    # Swaps in the embedding tables of adapters that replace them (modules_to_save); None when no
    # adapter of the step does (always on the static path, which such steps do not take).
    saved_embeddings: EmbeddingReplace | None


# A module's output and its LoRA deltas if they are still to be added (by the next norm's kernel).
ModuleOutput = tuple[torch.Tensor, LoraDeltas | None]


@dataclass
class LayerWeights:
    input_norm: torch.Tensor
    qkv: torch.Tensor  # [q + 2 kv, hidden]
    qkv_bias: torch.Tensor | None
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    o: torch.Tensor
    o_bias: torch.Tensor | None
    attn_out_norm: torch.Tensor | None  # Gemma's post_attention_layernorm, of o's output
    mlp_norm: torch.Tensor  # of the MLP's input: Llama's post_attention_layernorm, Gemma's pre_feedforward
    mlp_out_norm: torch.Tensor | None  # Gemma's post_feedforward_layernorm, of down's output
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
    norm = _norm_weight(config, tensors.pop("model.norm.weight"))
    return ModelWeights(embed=embed, layers=layers, norm=norm, lm_head=lm_head)


def _norm_weight(config: ModelConfig, weight: torch.Tensor | None) -> torch.Tensor | None:
    """Gemma's 1 + w in float32 (HF computes it so at every call): the norm kernels then scale
    in float32 and round once, as HF's Gemma RMSNorm does."""
    if weight is None or not config.norm_weight_offset:
        return weight
    return weight.float() + config.norm_weight_offset


def _fuse_layer(config: ModelConfig, tensors: dict[str, torch.Tensor], prefix: str) -> LayerWeights:
    def take(name: str) -> torch.Tensor | None:
        return tensors.pop(prefix + name, None)

    def norm(name: str) -> torch.Tensor | None:
        return _norm_weight(config, take(name + ".weight"))

    def cat(*names: str) -> torch.Tensor | None:
        parts = [take(n) for n in names]
        return None if parts[0] is None else torch.cat(parts)

    if config.sandwich_norms:
        attn_out_norm, mlp_norm = norm("post_attention_layernorm"), norm("pre_feedforward_layernorm")
        mlp_out_norm = norm("post_feedforward_layernorm")
    else:
        attn_out_norm, mlp_norm, mlp_out_norm = None, norm("post_attention_layernorm"), None
    return LayerWeights(
        input_norm=norm("input_layernorm"),
        qkv=cat("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
        qkv_bias=cat("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"),
        q_norm=norm("self_attn.q_norm"),
        k_norm=norm("self_attn.k_norm"),
        o=take("self_attn.o_proj.weight"),
        o_bias=take("self_attn.o_proj.bias"),
        attn_out_norm=attn_out_norm,
        mlp_norm=mlp_norm,
        mlp_out_norm=mlp_out_norm,
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
        self.ropes = {key: RotaryEmbedding(config, device, key) for key in set(config.layer_ropes)}
        self.scale = config.attention_scale
        # HF rounds the scale to the model dtype before multiplying.
        self.embed_scale = (None if config.embed_scale is None
                            else torch.tensor(config.embed_scale).to(device=device, dtype=self.dtype))

    @property
    def dtype(self) -> torch.dtype:
        return self.weights.embed.dtype

    def forward(self, step: EagerStepTensors, kv_cache: PagedKVCache, lora: LoraHook) -> torch.Tensor:
        """Runs all layers over a ragged step (reference attention); returns final-normed hidden [T, hidden]."""
        masks = {w: [attention_mask(group, w) for group in step.attention] for w in set(self.config.sliding_windows)}

        def attend(index: int, q: torch.Tensor) -> torch.Tensor:
            mask = masks[self.config.sliding_windows[index]]
            return padded_group_attention(q, kv_cache.keys(index), kv_cache.values(index), step.attention, mask,
                                          self.scale, self.config.attn_logit_softcap)

        return self.forward_tokens(step.input_ids, step.positions, step.kv_write_index, kv_cache, lora, attend)

    def forward_tokens(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_write_index: torch.Tensor,
                       kv_cache: PagedKVCache, lora: LoraHook, attend: Attend) -> torch.Tensor:
        """All layers over flat tokens; `attend` is the attention back-end. Returns final-normed hidden."""
        ropes = {key: rope.cos_sin(positions, self.dtype) for key, rope in self.ropes.items()}
        # The embedding's LoRA is copied with layer 0's: layer 0's wait comes before the embedding.
        lora.before_layer(0)
        hidden = self.tp.embed(self.weights.embed, input_ids, lora.embedding_delta, lora.saved_embeddings)
        if self.embed_scale is not None:  # PEFT scales the LoRA delta too
            hidden = hidden * self.embed_scale
        mlp_out = (None, None)  # the last MLP output and its LoRA deltas, added to hidden by the next norm's kernel
        for index, layer in enumerate(self.weights.layers):
            if index:
                lora.before_layer(index)
            cos, sin = ropes[self.config.layer_ropes[index]]
            hidden, mlp_out = self._layer(index, layer, hidden, mlp_out, kv_write_index, kv_cache, lora, cos, sin,
                                          attend)
        return add_rms_norm(hidden, mlp_out[0], self.weights.norm, self.config.rms_norm_eps, mlp_out[1])[1]

    def logits(self, hidden: torch.Tensor, lora: Callable[[torch.Tensor], torch.Tensor] | None = None,
               saved: Callable[[torch.Tensor, torch.Tensor], None] | None = None) -> torch.Tensor:
        """Logits of final-normed hidden states; `lora` gives their LM-head LoRA deltas (this rank's
        vocabulary part), added before the soft cap as PEFT's wrapped lm_head does; `saved(logits,
        hidden)` overwrites the rows of adapters with their own LM head (modules_to_save)."""
        logits = F.linear(hidden, self.weights.lm_head)
        if saved is not None:
            saved(logits, hidden)
        if lora is not None:
            logits += lora(hidden)
        cap = self.config.final_logit_softcap
        if cap:  # in the model dtype, as HF
            logits = torch.tanh(logits / cap) * cap
        return self.tp.gather_vocab(logits.float(), self.config.vocab_size)

    def _layer(self, index, layer: LayerWeights, hidden, mlp_out: ModuleOutput, kv_write_index, kv_cache, lora,
               cos, sin, attend) -> tuple[torch.Tensor, ModuleOutput]:
        """(residual stream, previous layer's MLP output) -> the same for the next layer: each
        residual add (and the LoRA deltas' add) is fused into the next norm."""
        eps = self.config.rms_norm_eps
        hidden, x = add_rms_norm(hidden, mlp_out[0], layer.input_norm, eps, mlp_out[1])
        attn_out = self._attention(index, layer, x, kv_write_index, kv_cache, lora, cos, sin, attend)
        attn_out, attn_lora = self._output_norm(attn_out, layer.attn_out_norm)
        hidden, x = add_rms_norm(hidden, attn_out, layer.mlp_norm, eps, attn_lora)
        return hidden, self._output_norm(self._mlp(index, layer, x, lora), layer.mlp_out_norm)

    def _output_norm(self, out: ModuleOutput, weight: torch.Tensor | None) -> ModuleOutput:
        """Gemma's norm of a module's output (its LoRA deltas added first) before the residual add."""
        if weight is None:
            return out
        module_out, deltas = out
        return add_rms_norm(module_out, None if deltas is None else deltas.dense(), weight, self.config.rms_norm_eps)[1], None

    def _attention(self, index, layer: LayerWeights, x, kv_write_index, kv_cache, lora, cos, sin,
                   attend) -> ModuleOutput:
        """The o projection's output and its LoRA deltas if not added yet; writes k and v to the cache."""
        c = self.config
        qkv, shrunk = _split_shrunk(self._base_product(index, QKV_MODULES, x, layer.qkv, layer.qkv_bias, lora),
                                    layer.qkv)
        qkv_lora = lora.finish_deltas(x, index, tuple(zip(QKV_MODULES, qkv.split((c.q_size, c.kv_size, c.kv_size), 1))),
                                      shrunk)
        norms = (layer.q_norm, layer.k_norm) if c.qk_norm else (None, None)
        q = rope_and_cache_kv(qkv, qkv_lora, c.num_heads, c.num_kv_heads, c.head_dim, cos, sin, *norms,
                              c.rms_norm_eps, keys=kv_cache.keys(index), values=kv_cache.values(index),
                              write_index=kv_write_index)
        attn = attend(index, q).reshape(-1, c.q_size)
        product = self._base_product(index, O_MODULES, attn, layer.o, layer.o_bias, lora)
        out, shrunk = _split_shrunk(product, layer.o)
        return self._row_parallel_sum(product, out, lora.finish_deltas(attn, index, (("o_proj", out),), shrunk))

    def _mlp(self, index, layer: LayerWeights, x, lora) -> ModuleOutput:
        """The down projection's output and its LoRA deltas if not added yet."""
        i = self.config.intermediate_size
        gate_up, shrunk = _split_shrunk(
            self._base_product(index, GATE_UP_MODULES, x, layer.gate_up, layer.gate_up_bias, lora), layer.gate_up)
        gate_up_lora = lora.finish_deltas(x, index, tuple(zip(GATE_UP_MODULES, gate_up.split(i, 1))), shrunk)
        h = act_mul(gate_up, gate_up_lora, self.config.activation)
        product = self._base_product(index, DOWN_MODULES, h, layer.down, layer.down_bias, lora)
        out, shrunk = _split_shrunk(product, layer.down)
        return self._row_parallel_sum(product, out, lora.finish_deltas(h, index, (("down_proj", out),), shrunk))

    @staticmethod
    def _base_product(index: int, modules: Sequence[str], x: torch.Tensor, weight: torch.Tensor,
                      bias: torch.Tensor | None, lora: LoraHook) -> torch.Tensor:
        """x's product with a group's fused weight, with the shrunk input as extra columns if the
        hook folded LoRA in (`_split_shrunk`)."""
        lora.start_deltas(x, index, modules)
        return F.linear(x, *lora.gemm_operands(index, modules, weight, bias))

    def _row_parallel_sum(self, product: torch.Tensor, out: torch.Tensor, deltas: LoraDeltas | None) -> ModuleOutput:
        """A row-parallel module's output: each rank's partial sum, LoRA deltas included, summed over
        the ranks (without tensor parallelism, the deltas are left to the next norm's kernel to add).
        Folded, the shrunk columns are partial sums too: one all-reduce over the product sums both,
        and the next norm's kernel adds the deltas."""
        if not self.tp.enabled:
            return out, deltas
        if isinstance(deltas, StagedDeltas):
            out += deltas.dense()
            deltas = None
        self.tp.all_reduce(product)
        return out, deltas


def _split_shrunk(product: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A base product's output (a column per row of the fused `weight`) and its extra columns, the
    shrunk input of a folded LoRA (None if the product has none): views of the product."""
    rows = weight.shape[0]
    return product[:, :rows], product[:, rows:] if product.shape[1] > rows else None
