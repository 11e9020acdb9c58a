"""The fused elementwise Triton kernels against their torch references, on CUDA.

Run on a GPU machine: `python -m pytest -m gpu tests/gpu/test_gpu_elementwise.py`. With
`TRITON_INTERPRET=1` the same tests also run the kernels on CPU tensors in Triton's interpreter.
"""

from __future__ import annotations

import os

import pytest
import torch

from worker.kernels.elementwise import (
    ACTIVATIONS,
    StagedDeltas,
    act_mul_reference,
    add_rms_norm_reference,
    rope_and_cache_kv_reference,
)

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # then CPU tensors run the kernels in the interpreter
DEVICES = ["cuda"] * torch.cuda.is_available() + ["cpu"] * INTERPRET
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not DEVICES, reason="needs a CUDA GPU (or TRITON_INTERPRET=1)"),
]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# float32: summation order (and exp's last bits); bfloat16: a rounding flipped by those, one ulp (2^-7 relative).
TOLERANCE = {"float32": 1e-5, "bfloat16": 1e-2}
# Norm weights in the model dtype (Llama) or float32 (Gemma's 1 + w: scaled before the one rounding).
NORM_WEIGHT_DTYPES = {"model": None, "float32": torch.float32}


@pytest.fixture(params=DEVICES)
def device(request, monkeypatch) -> str:
    if request.param == "cpu":
        round_like_the_gpu(monkeypatch)
    return request.param


def round_like_the_gpu(monkeypatch) -> None:
    """Triton's interpreter truncates float32 -> bfloat16 where the GPU rounds to nearest even: round
    as the GPU does, or every bf16 rounding the kernels share with torch would differ."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    truncate = interpreter.InterpreterBuilder.create_fp_trunc

    def create_fp_trunc(self, src, dst_type):
        if src.dtype.scalar != tl.float32 or dst_type.scalar != tl.bfloat16:
            return truncate(self, src, dst_type)
        rounded = torch.from_numpy(np.ascontiguousarray(src.data)).to(torch.bfloat16).view(torch.int16)
        return interpreter.TensorHandle(rounded.numpy().view(np.uint16), tl.bfloat16)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_fp_trunc", create_fp_trunc)


def kernels():
    from worker.kernels import _elementwise_triton

    return _elementwise_triton


def randn(*shape: int, dtype: torch.dtype, device: str, seed: int, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale).to(dtype).to(device)


def staged_deltas(tokens: int, width: int, *, dtype: torch.dtype, device: str, seed: int,
                  scale: float = 1.0) -> StagedDeltas:
    """LoRA deltas as a step stages them: rows of tokens without an adapter (every third, slot -1)
    were never written (NaN here) and must read as zero."""
    values = randn(tokens, width, dtype=dtype, device=device, seed=seed, scale=scale)
    token_slots = torch.tensor([-1 if t % 3 == 0 else t % 4 for t in range(tokens)], device=device)
    values[token_slots < 0] = float("nan")
    return StagedDeltas(values, token_slots)


def assert_matches(out: torch.Tensor, expected: torch.Tensor, dtype: str) -> None:
    assert out.dtype == expected.dtype and out.shape == expected.shape
    torch.testing.assert_close(out.float(), expected.float(), atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("tokens", [1, 5, 37])
@pytest.mark.parametrize("size", [72, 4096])
@pytest.mark.parametrize("addends", ["none", "delta", "delta+lora"])
@pytest.mark.parametrize("norm_weight", list(NORM_WEIGHT_DTYPES))
def test_add_rms_norm_matches_reference(device, dtype, tokens, size, addends, norm_weight):
    hidden = randn(tokens, size, dtype=DTYPES[dtype], device=device, seed=0)
    delta = randn(tokens, size, dtype=DTYPES[dtype], device=device, seed=1) if addends != "none" else None
    lora_delta = staged_deltas(tokens, size, dtype=DTYPES[dtype], device=device, seed=7) \
        if addends == "delta+lora" else None
    weight = randn(size, dtype=NORM_WEIGHT_DTYPES[norm_weight] or DTYPES[dtype], device=device, seed=2, scale=0.1) + 1
    summed, normed = kernels().add_rms_norm(hidden, delta, weight, 1e-6, lora_delta)
    expected_sum, expected_normed = add_rms_norm_reference(hidden, delta, weight, 1e-6, lora_delta)
    assert torch.equal(summed, expected_sum), "the residual add is exact"
    assert delta is not None or summed is hidden
    assert_matches(normed, expected_normed, dtype)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("tokens", [1, 5, 37])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(32, 8, 128), (4, 4, 64), (8, 2, 16)])
@pytest.mark.parametrize("qk_norm", [None, *NORM_WEIGHT_DTYPES])
@pytest.mark.parametrize("with_lora", [False, True])
def test_rope_and_cache_kv_matches_reference(device, dtype, tokens, heads, kv_heads, head_dim, qk_norm, with_lora):
    """q, k and v come from a fused qkv (plus staged LoRA deltas), which the kernel leaves
    unchanged; k and v land in the cache rows named (padding rows share the scratch row, which
    is not compared), and no other row changes."""
    torch_dtype = DTYPES[dtype]
    qkv = randn(tokens, (heads + 2 * kv_heads) * head_dim, dtype=torch_dtype, device=device, seed=3)
    lora_delta = staged_deltas(*qkv.shape, dtype=torch_dtype, device=device, seed=8, scale=0.1) if with_lora else None
    before = qkv.clone()
    positions = torch.randint(0, 100_000, (tokens,), generator=torch.Generator().manual_seed(4))
    inv_freq = 1.0 / (500000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = (f(emb).to(torch_dtype).to(device)[:, None, :] for f in (torch.cos, torch.sin))
    norm_dtype = NORM_WEIGHT_DTYPES.get(qk_norm) or torch_dtype
    norms = [randn(head_dim, dtype=norm_dtype, device=device, seed=5 + i, scale=0.1) + 1 for i in range(2)]
    q_norm, k_norm = norms if qk_norm else (None, None)
    rows = 2 * tokens + 1
    scratch = rows - 1
    write_index = torch.randperm(rows - 1, generator=torch.Generator().manual_seed(9))[:tokens].to(device)
    if tokens > 1:
        write_index[-1] = scratch  # a padding row
    caches = []
    for _ in range(2):
        keys, values = (randn(rows, kv_heads, head_dim, dtype=torch_dtype, device=device, seed=10 + i)
                        for i in range(2))
        caches.append({"keys": keys, "values": values, "write_index": write_index})
    q = kernels().rope_and_cache_kv(qkv, lora_delta, heads, kv_heads, head_dim, cos, sin, q_norm, k_norm, 1e-6,
                                    **caches[0])
    expected_q = rope_and_cache_kv_reference(qkv, lora_delta, heads, kv_heads, head_dim, cos, sin, q_norm, k_norm,
                                             1e-6, **caches[1])
    assert torch.equal(qkv, before)
    assert_matches(q, expected_q, dtype)
    assert_matches(caches[0]["keys"][:scratch], caches[1]["keys"][:scratch], dtype)
    assert torch.equal(caches[0]["values"][:scratch], caches[1]["values"][:scratch]), "v is copied exactly"


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("tokens", [1, 5, 37])
@pytest.mark.parametrize("size", [72, 1100, 14336])
@pytest.mark.parametrize("with_lora", [False, True])
@pytest.mark.parametrize("activation", list(ACTIVATIONS))
def test_act_mul_matches_reference(device, dtype, tokens, size, with_lora, activation):
    gate_up = randn(tokens, 2 * size, dtype=DTYPES[dtype], device=device, seed=6, scale=3.0)
    lora_delta = staged_deltas(tokens, 2 * size, dtype=DTYPES[dtype], device=device, seed=7) if with_lora else None
    assert_matches(kernels().act_mul(gate_up, lora_delta, activation),
                   act_mul_reference(gate_up, lora_delta, activation), dtype)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="dispatch to Triton happens on CUDA only")
def test_public_functions_dispatch_to_triton_on_cuda(monkeypatch):
    """On CUDA the model's calls reach the kernels (a torch fallback would hide a slow path)."""
    from worker.kernels import elementwise

    calls = []
    for name in ("add_rms_norm", "rope_and_cache_kv", "act_mul"):
        original = getattr(kernels(), name)
        monkeypatch.setattr(kernels(), name,
                            lambda *args, _f=original, _n=name, **kwargs: calls.append(_n) or _f(*args, **kwargs))
    x = torch.randn(3, 64, device="cuda")
    cos, sin = torch.ones(3, 1, 16, device="cuda"), torch.zeros(3, 1, 16, device="cuda")
    cache = torch.zeros(4, 1, 16, device="cuda")
    elementwise.add_rms_norm(x, x, torch.ones(64, device="cuda"), 1e-6)
    elementwise.rope_and_cache_kv(x[:, :48], None, 1, 1, 16, cos, sin, None, None, 1e-6, keys=cache,
                                  values=cache.clone(), write_index=torch.arange(3, device="cuda"))
    elementwise.act_mul(x)
    assert calls == ["add_rms_norm", "rope_and_cache_kv", "act_mul"]
