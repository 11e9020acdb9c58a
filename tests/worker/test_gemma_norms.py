"""Gemma's RMSNorm in half precision: HF scales by (1 + w) in float32 and rounds once, where
Llama rounds the normalised row and then scales in the model dtype. In float32 the two agree,
so the float32 equivalence tests cannot tell them apart; these compare bit for bit in bfloat16."""

from __future__ import annotations

import pytest
import torch
from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from worker.kernels.elementwise import add_rms_norm_reference

EPS = 1e-6


def random(*shape: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale).to(torch.bfloat16)


@pytest.mark.parametrize("with_delta", [False, True])
def test_gemma_norm_rounds_as_hf_in_bfloat16(with_delta):
    hidden, delta, weight = random(37, 256, seed=0), random(37, 256, seed=1), random(256, seed=2, scale=0.5)
    hf_norm = Gemma3RMSNorm(256, eps=EPS).to(torch.bfloat16)
    hf_norm.weight.data.copy_(weight)
    summed, normed = add_rms_norm_reference(hidden, delta if with_delta else None, weight.float() + 1.0, EPS)
    expected_input = hidden + delta if with_delta else hidden
    assert torch.equal(summed, expected_input)
    assert normed.dtype == torch.bfloat16
    assert torch.equal(normed, hf_norm(expected_input))


def test_llama_norm_still_rounds_before_scaling():
    hidden, weight = random(37, 256, seed=3), random(256, seed=4, scale=0.1) + 1
    hf_norm = LlamaRMSNorm(256, eps=EPS).to(torch.bfloat16)
    hf_norm.weight.data.copy_(weight)
    assert torch.equal(add_rms_norm_reference(hidden, None, weight, EPS)[1], hf_norm(hidden))
