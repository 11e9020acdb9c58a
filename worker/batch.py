"""What one forward is asked to do: a ragged batch of sequences, in-process dataclasses."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

NO_ADAPTER = -1  # adapter slot of a request served by the base model


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 is greedy
    top_p: float = 1.0
    top_k: int = -1  # -1 keeps the whole vocabulary
    seed: int | None = None  # makes a sampled request reproducible
    logprobs: bool = False  # return the log-probability of each chosen token

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class SequenceInput:
    """One request's share of a forward: a prefill chunk or a decode token.

    `token_ids` are the new tokens; the first `context_len` tokens are already in the KV
    cache at the positions given by `page_table` (page ids owned by the caller), which must
    also cover the new tokens.
    """

    request_id: str
    token_ids: Sequence[int]
    context_len: int
    page_table: Sequence[int]
    adapter_slot: int = NO_ADAPTER
    sample: bool = True  # False for a prefill chunk that is not the prompt's last
    sampling: SamplingParams = field(default_factory=SamplingParams)
    # The one new token is the one this request sampled in the previous forward, still on the
    # GPU (token_ids holds a placeholder): the scheduler sent this step before seeing it.
    previous_token: bool = False

    @property
    def total_len(self) -> int:
        return self.context_len + len(self.token_ids)


@dataclass(frozen=True)
class SampledToken:
    request_id: str
    token_id: int
    logprob: float | None


@dataclass
class ForwardOutput:
    tokens: list[SampledToken]  # one per sequence with sample=True, in input order
    logits: dict[str, torch.Tensor] | None = None  # request_id -> [new tokens, vocab] when asked for
