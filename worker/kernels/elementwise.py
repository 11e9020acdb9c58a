"""The elementwise work of a decoder layer, fused: a decode step would otherwise launch ~25
tiny kernels per layer (RMSNorm alone is ~7 torch ops), and at small batches it is bound by
their count, not by memory.

- `add_rms_norm`: the residual add and the next RMSNorm in one pass over the row:
  `h = hidden + delta` (in the model dtype), `normed = weight * (h32 * rsqrt(mean(h32^2) + eps)).to(dtype)`
  with `h32 = h.float()`, as HF's Llama. A float32 weight (Gemma's 1 + w, in a model of another
  dtype) scales before the one rounding instead, as HF's Gemma: `(h32 * rsqrt(...) * weight).to(dtype)`;
  in float32 models the two are the same. Shapes: hidden, delta [T, N]; weight [N].
- `rope_and_cache_kv`: q, k and v taken from the fused qkv matrix [T, (heads + 2 kv_heads) * D];
  q and k optionally RMS-normed per head over its D (Qwen3's and Gemma 3's q_norm/k_norm,
  weights as add_rms_norm's), then rotated with HF's rotate_half layout:
  `out = x * cos + cat(-x[D/2:], x[:D/2]) * sin`, every product and sum rounded to the model
  dtype as the torch ops do; cos, sin [T, 1, D] are those of
  `RotaryEmbedding.cos_sin`, already in the model dtype. k and v are written to the KV cache
  rows `write_index` [T] (keys, values [rows, kv_heads, D]); returns q [T, heads, D]. qkv
  itself is left as it is.
- `act_mul`: `act(gate) * up` from the fused gate_up matrix [T, 2I] -> [T, I], act one of
  `ACTIVATIONS`: silu (Llama's SwiGLU) or gelu with the tanh approximation (Gemma's GeGLU).

Each takes an optional `lora_delta` for the module output it reads (delta, qkv, gate_up), added
to that output first and rounded as the unfused `out += delta` would be, so that no separate add
kernel runs: either `StagedDeltas`, the deltas staged beside the base GEMM (rows of tokens without
an adapter were never written and are not read), or `FoldedDeltas`, the shrunk inputs the base
GEMM left in extra columns, which the reader expands itself (`_folded_readers_triton`).

Each public function runs one Triton kernel on CUDA tensors and the torch reference (the
code the model ran before, which CI covers) otherwise. The kernels round in the same places
as the references; what differs is only the order of the float32 sum of squares (and the last
bits of exp and tanh in the activations). Their grids depend only on the tensors' shapes, so
they replay in CUDA graphs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from worker.kernels.staged_deltas import FoldedDeltas, StagedDeltas

# A module output's LoRA deltas still to add: staged beside the GEMM, or folded into it.
LoraDeltas = StagedDeltas | FoldedDeltas


ACTIVATIONS = {"silu": F.silu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """As HF: normalise in float32, then Llama casts back and scales; Gemma (a float32 weight,
    its 1 + w) scales in float32 and casts back."""
    x32 = x.to(torch.float32)
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    if weight.dtype == torch.float32:
        return (x32 * weight).to(x.dtype)
    return weight * x32.to(x.dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, head_dim]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def add_rms_norm_reference(hidden: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float,
                           lora_delta: LoraDeltas | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    if lora_delta is not None:
        delta = delta + lora_delta.dense()
    if delta is not None:
        hidden = hidden + delta
    return hidden, rms_norm(hidden, weight, eps)


def rope_and_cache_kv_reference(qkv: torch.Tensor, lora_delta: LoraDeltas | None, heads: int, kv_heads: int,
                                head_dim: int, cos: torch.Tensor, sin: torch.Tensor, q_norm: torch.Tensor | None,
                                k_norm: torch.Tensor | None, eps: float, *, keys: torch.Tensor,
                                values: torch.Tensor, write_index: torch.Tensor) -> torch.Tensor:
    if lora_delta is not None:
        qkv = qkv + lora_delta.dense()
    q_end, kv_size = heads * head_dim, kv_heads * head_dim
    q = qkv[:, :q_end].view(-1, heads, head_dim)
    k = qkv[:, q_end:q_end + kv_size].view(-1, kv_heads, head_dim)
    if q_norm is not None:
        q = rms_norm(q, q_norm, eps)
        k = rms_norm(k, k_norm, eps)
    keys.index_copy_(0, write_index, rotate(k, cos, sin))
    values.index_copy_(0, write_index, qkv[:, q_end + kv_size:q_end + 2 * kv_size].view(-1, kv_heads, head_dim))
    return rotate(q, cos, sin)


def act_mul_reference(gate_up: torch.Tensor, lora_delta: LoraDeltas | None = None,
                      activation: str = "silu") -> torch.Tensor:
    if lora_delta is not None:
        gate_up = gate_up + lora_delta.dense()
    i = gate_up.shape[-1] // 2
    return ACTIVATIONS[activation](gate_up[:, :i]) * gate_up[:, i:]


def add_rms_norm(hidden: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float,
                 lora_delta: LoraDeltas | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden + (delta + lora_delta), its RMSNorm); delta None (the first norm): (hidden, its RMSNorm)."""
    if not hidden.is_cuda:
        return add_rms_norm_reference(hidden, delta, weight, eps, lora_delta)
    return _kernels(lora_delta).add_rms_norm(hidden, delta, weight, eps, lora_delta)


def rope_and_cache_kv(qkv: torch.Tensor, lora_delta: LoraDeltas | None, heads: int, kv_heads: int, head_dim: int,
                      cos: torch.Tensor, sin: torch.Tensor, q_norm: torch.Tensor | None, k_norm: torch.Tensor | None,
                      eps: float, *, keys: torch.Tensor, values: torch.Tensor,
                      write_index: torch.Tensor) -> torch.Tensor:
    """Rotated (and, with q_norm and k_norm, first per-head normed) q of qkv (+ lora_delta); its
    k (rotated likewise) and v written to the KV cache rows write_index."""
    if not qkv.is_cuda:
        return rope_and_cache_kv_reference(qkv, lora_delta, heads, kv_heads, head_dim, cos, sin, q_norm, k_norm,
                                           eps, keys=keys, values=values, write_index=write_index)
    return _kernels(lora_delta).rope_and_cache_kv(qkv, lora_delta, heads, kv_heads, head_dim, cos, sin, q_norm,
                                                  k_norm, eps, keys=keys, values=values, write_index=write_index)


def act_mul(gate_up: torch.Tensor, lora_delta: LoraDeltas | None = None, activation: str = "silu") -> torch.Tensor:
    """act(gate) * up of the fused [T, 2I] gate_up (+ lora_delta) -> [T, I]; `activation` names act."""
    if not gate_up.is_cuda:
        return act_mul_reference(gate_up, lora_delta, activation)
    return _kernels(lora_delta).act_mul(gate_up, lora_delta, activation)


def _kernels(lora_delta: LoraDeltas | None):
    """The Triton module of the readers: row by row, or a block of rows at a time for a folded expand."""
    if isinstance(lora_delta, FoldedDeltas):
        from worker.kernels import _folded_readers_triton

        return _folded_readers_triton
    from worker.kernels import _elementwise_triton

    return _elementwise_triton
