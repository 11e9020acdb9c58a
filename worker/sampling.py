"""Token sampling: greedy, temperature, top-k, top-p, per-request seeds, logprobs.

A seeded request draws from a generator seeded by (seed, position of the new token), so
its output does not depend on what else is in the batch or how its prompt was chunked.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from worker.batch import SamplingParams
from worker.host_upload import index_tensor

_SEED_MIX = 0x9E3779B97F4A7C15  # golden-ratio constant: spreads (seed, position) over 64 bits
_MASK64 = (1 << 64) - 1


def validate_sampling(params: SamplingParams) -> None:
    if params.temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {params.temperature}")
    if not 0 < params.top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {params.top_p}")
    if params.top_k < -1 or params.top_k == 0:
        raise ValueError(f"top_k must be -1 (off) or >= 1, got {params.top_k}")


@dataclass(frozen=True)
class DeviceSample:
    """Sampled tokens on the device, and their copies on their way to pinned host memory.

    The copies are queued right behind the sampling, so once the stream has passed them the
    host can read this forward's tokens without waiting for a forward queued after it (a
    plain `.tolist()` would wait for everything on the stream)."""

    token_ids: torch.Tensor  # [N] int64
    logprobs: torch.Tensor | None  # [len(logprob_rows)] float32
    logprob_rows: list[int]
    host_token_ids: torch.Tensor
    host_logprobs: torch.Tensor | None


def sample_on_device(logits: torch.Tensor, params: Sequence[SamplingParams], positions: Sequence[int]) -> DeviceSample:
    """logits: [N, vocab] float32, one row per sampled sequence; positions of the new tokens.
    Launches the sampling without waiting for it (no host sync)."""
    chosen = torch.argmax(logits, dim=-1)
    for row, (p, position) in enumerate(zip(params, positions)):
        if not p.greedy:
            chosen[row] = _sample_row(logits[row], p, position)
    wanted = [i for i, p in enumerate(params) if p.logprobs]
    logprobs = None
    if wanted:
        rows = index_tensor(wanted, logits.device)
        logprobs = torch.log_softmax(logits[rows], dim=-1).gather(1, chosen[rows, None]).squeeze(1)
    host_logprobs = None if logprobs is None else _copy_to_host(logprobs)
    return DeviceSample(chosen, logprobs, wanted, _copy_to_host(chosen), host_logprobs)


def _copy_to_host(values: torch.Tensor) -> torch.Tensor:
    if values.device.type != "cuda":
        return values
    host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
    return host.copy_(values, non_blocking=True)


def to_host(sampled: DeviceSample) -> tuple[list[int], list[float | None]]:
    """The host copies as lists; the stream must have passed the copies (an event, or a sync)."""
    token_ids = sampled.host_token_ids.tolist()
    logprobs: list[float | None] = [None] * len(token_ids)
    if sampled.host_logprobs is not None:
        for row, value in zip(sampled.logprob_rows, sampled.host_logprobs.tolist()):
            logprobs[row] = value
    return token_ids, logprobs


def sample(
    logits: torch.Tensor, params: Sequence[SamplingParams], positions: Sequence[int]
) -> tuple[list[int], list[float | None]]:
    """`sample_on_device`, then waits for the tokens."""
    sampled = sample_on_device(logits, params, positions)
    if logits.device.type == "cuda":
        torch.cuda.current_stream(logits.device).synchronize()
    return to_host(sampled)


def _sample_row(logits: torch.Tensor, params: SamplingParams, position: int) -> torch.Tensor:
    scaled = logits / params.temperature
    if params.top_k > 0:
        kth = torch.topk(scaled, min(params.top_k, scaled.numel())).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    if params.top_p < 1:
        probs = _top_p(probs, params.top_p)
    return torch.multinomial(probs, 1, generator=_generator(params, position, logits.device)).squeeze(0)


def _top_p(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keeps the smallest set of most likely tokens whose mass reaches top_p."""
    sorted_probs, order = torch.sort(probs, descending=True)
    mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
    sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)
    return torch.zeros_like(probs).scatter_(0, order, sorted_probs)


def _generator(params: SamplingParams, position: int, device: torch.device) -> torch.Generator | None:
    if params.seed is None:
        return None
    seed = ((params.seed & _MASK64) * _SEED_MIX + position) & _MASK64
    return torch.Generator(device=device).manual_seed(seed % (1 << 63))
