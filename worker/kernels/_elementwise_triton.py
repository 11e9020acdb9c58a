"""Triton kernels of `worker.kernels.elementwise` (imported only on CUDA machines).

Values are loaded in the model dtype, computed in float32 and rounded back to the model
dtype after each operation the torch reference does in that dtype, so the results match it
bit for bit but for the sum of squares' order (and the activations' exp and tanh). Launched
with enable_fp_fusion=False: a multiply-add contracted into an FMA would round once where
torch rounds twice.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from worker.kernels._triton_common import tanh
from worker.kernels.staged_deltas import StagedDeltas


@triton.jit
def _scale_by_weight(x, rstd, weight):
    """HF's RMSNorm tail: x (float32) * rstd rounded to the model dtype, times weight in that dtype
    (Llama); with a float32 weight (Gemma's 1 + w) all in float32, left to the caller to round."""
    normed = (x * rstd).to(weight.dtype).to(tl.float32)
    return (weight.to(tl.float32) * normed).to(weight.dtype)


@triton.jit
def _adapted(slots_ptr, row, HAS_LORA: tl.constexpr):
    """Whether the row's token has an adapter, so its staged LoRA delta was written."""
    if HAS_LORA:
        return tl.load(slots_ptr + row) >= 0
    return False


@triton.jit
def _load_plus_lora(x_ptr, lora_ptr, cols, ok, adapted, HAS_LORA: tl.constexpr):
    """A module's output with its staged LoRA delta added, rounded to the model dtype as the
    unfused `out += delta` is (a row without an adapter reads no delta)."""
    x = tl.load(x_ptr + cols, mask=ok, other=0.0)
    if HAS_LORA:
        delta = tl.load(lora_ptr + cols, mask=tl.where(adapted, ok, False), other=0.0)
        x = (x.to(tl.float32) + delta.to(tl.float32)).to(x.dtype)
    return x


@triton.jit
def _add_rms_norm_kernel(hidden_ptr, delta_ptr, lora_ptr, slots_ptr, weight_ptr, sum_ptr, normed_ptr, eps, size,
                         stride_h, stride_d, stride_l, stride_s, stride_n, BLOCK: tl.constexpr,
                         HAS_DELTA: tl.constexpr, HAS_LORA: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < size
    x = tl.load(hidden_ptr + row * stride_h + cols, mask=ok, other=0.0)
    if HAS_DELTA:
        delta = _load_plus_lora(delta_ptr + row * stride_d, lora_ptr + row * stride_l, cols, ok,
                                _adapted(slots_ptr, row, HAS_LORA), HAS_LORA)
        x = (x.to(tl.float32) + delta.to(tl.float32)).to(x.dtype)  # the residual add is in the model dtype
        tl.store(sum_ptr + row * stride_s + cols, x, mask=ok)
    x = x.to(tl.float32)
    rstd = tl.math.rsqrt(tl.sum(x * x, 0) / size + eps)
    weight = tl.load(weight_ptr + cols, mask=ok, other=0.0)
    normed = _scale_by_weight(x, rstd, weight).to(normed_ptr.dtype.element_ty)
    tl.store(normed_ptr + row * stride_n + cols, normed, mask=ok)


def _num_warps(block: int) -> int:
    return 4 if block <= 1024 else 8 if block <= 4096 else 16


def add_rms_norm(hidden: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float,
                 lora_delta: StagedDeltas | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    tokens, size = hidden.shape
    _check_norm_weight(hidden, weight)
    for addend in (delta, lora_delta and lora_delta.values):
        if addend is not None:
            _check(addend, hidden)
    if lora_delta is not None and delta is None:
        raise ValueError("a LoRA delta is added to a module's output (delta)")
    summed = torch.empty_like(hidden) if delta is not None else hidden
    normed = torch.empty_like(hidden)
    block = triton.next_power_of_2(size)
    delta_or_hidden = hidden if delta is None else delta
    lora_or_delta, slots = _lora_operands(lora_delta, delta_or_hidden)
    _add_rms_norm_kernel[(tokens,)](
        hidden, delta_or_hidden, lora_or_delta, slots, weight, summed, normed, eps, size,
        hidden.stride(0), delta_or_hidden.stride(0), lora_or_delta.stride(0), summed.stride(0), normed.stride(0),
        BLOCK=block, HAS_DELTA=delta is not None, HAS_LORA=lora_delta is not None, num_warps=_num_warps(block),
        enable_fp_fusion=False,
    )
    return summed, normed


@triton.jit
def _rope_head(x1, x2, cos_ptr, sin_ptr, out_ptr, norm_ptr, eps, dims, ok, HEAD_DIM: tl.constexpr,
               QK_NORM: tl.constexpr, AXIS: tl.constexpr = 0):
    """One head (its halves x1, x2) of one token ([half], AXIS 0) or of a block of tokens ([rows, half],
    AXIS 1, the pointers broadcast per row): the halves of head_dim are rotated into each other."""
    half: tl.constexpr = HEAD_DIM // 2
    dtype = x1.dtype
    if QK_NORM:  # the normed head is rounded to the model dtype before the rotation, as HF's is
        a, b = x1.to(tl.float32), x2.to(tl.float32)
        squares = tl.sum(a * a, AXIS, keep_dims=True) + tl.sum(b * b, AXIS, keep_dims=True)
        rstd = tl.math.rsqrt(squares / HEAD_DIM + eps)
        x1 = _scale_by_weight(a, rstd, tl.load(norm_ptr + dims, mask=ok, other=0.0)).to(dtype)
        x2 = _scale_by_weight(b, rstd, tl.load(norm_ptr + half + dims, mask=ok, other=0.0)).to(dtype)
    cos1 = tl.load(cos_ptr + dims, mask=ok, other=0.0).to(tl.float32)
    cos2 = tl.load(cos_ptr + half + dims, mask=ok, other=0.0).to(tl.float32)
    sin1 = tl.load(sin_ptr + dims, mask=ok, other=0.0).to(tl.float32)
    sin2 = tl.load(sin_ptr + half + dims, mask=ok, other=0.0).to(tl.float32)
    a, b = x1.to(tl.float32), x2.to(tl.float32)
    # x * cos + rotated * sin with rotated = (-x2, x1), each product rounded as torch does.
    out1 = (a * cos1).to(dtype).to(tl.float32) - (b * sin1).to(dtype).to(tl.float32)
    out2 = (b * cos2).to(dtype).to(tl.float32) + (a * sin2).to(dtype).to(tl.float32)
    tl.store(out_ptr + dims, out1.to(dtype), mask=ok)
    tl.store(out_ptr + half + dims, out2.to(dtype), mask=ok)


@triton.jit
def _rope_cache_kernel(qkv_ptr, lora_ptr, slots_ptr, cos_ptr, sin_ptr, q_ptr, keys_ptr, values_ptr, index_ptr, q_norm_ptr,
                       k_norm_ptr, eps, stride_x, stride_l, stride_c, stride_s, stride_q, stride_kv,
                       HEADS: tl.constexpr, KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                       BLOCK_HALF: tl.constexpr, QK_NORM: tl.constexpr, HAS_LORA: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)  # q heads, then k heads, then v heads, as in qkv's columns
    half: tl.constexpr = HEAD_DIM // 2
    dims = tl.arange(0, BLOCK_HALF)
    ok = dims < half
    column = head * HEAD_DIM
    adapted = _adapted(slots_ptr, token, HAS_LORA)
    x1 = _load_plus_lora(qkv_ptr + token * stride_x + column, lora_ptr + token * stride_l + column, dims, ok,
                         adapted, HAS_LORA)
    x2 = _load_plus_lora(qkv_ptr + token * stride_x + column + half, lora_ptr + token * stride_l + column + half,
                         dims, ok, adapted, HAS_LORA)
    cache_row = tl.load(index_ptr + token) * stride_kv
    if head < HEADS:
        _rope_head(x1, x2, cos_ptr + token * stride_c, sin_ptr + token * stride_s,
                   q_ptr + token * stride_q + column, q_norm_ptr, eps, dims, ok, HEAD_DIM, QK_NORM)
    elif head < HEADS + KV_HEADS:
        _rope_head(x1, x2, cos_ptr + token * stride_c, sin_ptr + token * stride_s,
                   keys_ptr + cache_row + (head - HEADS) * HEAD_DIM, k_norm_ptr, eps, dims, ok, HEAD_DIM, QK_NORM)
    else:
        v_ptr = values_ptr + cache_row + (head - HEADS - KV_HEADS) * HEAD_DIM
        tl.store(v_ptr + dims, x1, mask=ok)
        tl.store(v_ptr + half + dims, x2, mask=ok)


def rope_and_cache_kv(qkv: torch.Tensor, lora_delta: StagedDeltas | None, heads: int, kv_heads: int, head_dim: int,
                      cos: torch.Tensor, sin: torch.Tensor, q_norm: torch.Tensor | None, k_norm: torch.Tensor | None,
                      eps: float, *, keys: torch.Tensor, values: torch.Tensor,
                      write_index: torch.Tensor) -> torch.Tensor:
    tokens = qkv.shape[0]
    _check(qkv, cos)
    if cos.stride(-1) != 1 or sin.stride(-1) != 1:
        raise ValueError("rope_and_cache_kv needs cos and sin with a unit stride in the last dimension")
    if q_norm is not None:
        _check_norm_weight(qkv, q_norm)
        _check_norm_weight(qkv, k_norm)
    if lora_delta is not None:
        _check(lora_delta.values, qkv)
    for cache in (keys, values):
        _check(qkv, cache)
        if not cache.is_contiguous() or cache.shape[1:] != (kv_heads, head_dim):
            raise ValueError(f"the KV cache must be contiguous [rows, {kv_heads}, {head_dim}]")
    q = torch.empty(tokens, heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    qk_norm = q_norm is not None
    lora, slots = _lora_operands(lora_delta, qkv)
    _rope_cache_kernel[(tokens, heads + 2 * kv_heads)](
        qkv, lora, slots, cos, sin, q, keys, values, write_index, q_norm if qk_norm else qkv, k_norm if qk_norm else qkv,
        eps, qkv.stride(0), lora.stride(0), cos.stride(0), sin.stride(0), q.stride(0), keys.stride(0),
        HEADS=heads, KV_HEADS=kv_heads, HEAD_DIM=head_dim, BLOCK_HALF=triton.next_power_of_2(head_dim // 2),
        QK_NORM=qk_norm, HAS_LORA=lora_delta is not None, num_warps=1, enable_fp_fusion=False,
    )
    return q


ACTIVATIONS = ("silu", "gelu_pytorch_tanh")  # by the names of `worker.kernels.elementwise.ACTIVATIONS`


@triton.jit
def _act_mul_kernel(gate_up_ptr, lora_ptr, slots_ptr, out_ptr, size, stride_g, stride_l, stride_o, BLOCK: tl.constexpr,
                    HAS_LORA: tl.constexpr, ACTIVATION: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < size
    adapted = _adapted(slots_ptr, row, HAS_LORA)
    gate = _load_plus_lora(gate_up_ptr + row * stride_g, lora_ptr + row * stride_l, cols, ok, adapted, HAS_LORA)
    up = _load_plus_lora(gate_up_ptr + row * stride_g + size, lora_ptr + row * stride_l + size, cols, ok, adapted,
                         HAS_LORA)
    tl.store(out_ptr + row * stride_o + cols, _act_times(gate, up, ACTIVATION), mask=ok)


@triton.jit
def _act_times(gate, up, ACTIVATION: tl.constexpr):
    """act(gate) * up in the model dtype, the activation's output rounded as torch's is."""
    g = gate.to(tl.float32)
    if ACTIVATION == "gelu_pytorch_tanh":  # F.gelu(approximate="tanh")'s formula; sqrt(2 / pi) = 0.79788...
        act = 0.5 * g * (1.0 + tanh(0.7978845608028654 * (g + 0.044715 * g * g * g)))
    else:  # F.silu's formula
        act = g / (1.0 + tl.exp(-g))
    act = act.to(gate.dtype).to(tl.float32)
    return (act * up.to(tl.float32)).to(gate.dtype)


def act_mul(gate_up: torch.Tensor, lora_delta: StagedDeltas | None = None, activation: str = "silu") -> torch.Tensor:
    tokens, width = gate_up.shape
    if gate_up.stride(-1) != 1:
        raise ValueError("act_mul needs a unit stride in the last dimension")
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}")
    if lora_delta is not None:
        _check(lora_delta.values, gate_up)
    size = width // 2
    out = torch.empty(tokens, size, dtype=gate_up.dtype, device=gate_up.device)
    block = 1024
    lora, slots = _lora_operands(lora_delta, gate_up)
    _act_mul_kernel[(tokens, triton.cdiv(size, block))](
        gate_up, lora, slots, out, size, gate_up.stride(0), lora.stride(0), out.stride(0), BLOCK=block,
        HAS_LORA=lora_delta is not None, ACTIVATION=activation, num_warps=4, enable_fp_fusion=False,
    )
    return out


def _lora_operands(lora_delta: StagedDeltas | None, stand_in: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The deltas and token slots to pass a kernel (without LoRA, a tensor it does not read)."""
    if lora_delta is None:
        return stand_in, stand_in
    if lora_delta.token_slots.shape != lora_delta.values.shape[:1]:
        raise ValueError("staged LoRA deltas need one token slot per row")
    return lora_delta.values, lora_delta.token_slots


def _check_norm_weight(x: torch.Tensor, weight: torch.Tensor) -> None:
    """A norm weight is in x's dtype (Llama) or float32 (Gemma's 1 + w, scaling before the rounding)."""
    if x.stride(-1) != 1:
        raise ValueError("the elementwise kernels need a unit stride in the last dimension")
    if weight.dtype not in (x.dtype, torch.float32):
        raise ValueError(f"expected a norm weight in {x.dtype} or float32, got {weight.dtype}")


def _check(x: torch.Tensor, other: torch.Tensor) -> None:
    """The kernels round to x's dtype: torch would promote a weight (or cos) of another dtype instead."""
    if x.stride(-1) != 1:
        raise ValueError("the elementwise kernels need a unit stride in the last dimension")
    if other.dtype != x.dtype:
        raise ValueError(f"expected {x.dtype}, got {other.dtype}")
