"""A generation request as the scheduler tracks it."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from protos.loraserve.v1 import internal_pb2, serving_pb2


class Phase(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PAUSED = "paused"  # queued again for a slot, keeping its KV pages (slot preemption)
    FINISHED = "finished"


@dataclass(frozen=True)
class Sampling:
    """A request's sampling settings, and the part the worker needs, built once."""

    max_new_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    stop_token_ids: frozenset[int]
    ignore_eos: bool
    logprobs: bool
    worker_params: internal_pb2.SequenceSampling

    @classmethod
    def from_proto(cls, params: serving_pb2.SamplingParams) -> Sampling:
        worker_params = internal_pb2.SequenceSampling(
            temperature=params.temperature, top_p=params.top_p, top_k=params.top_k, logprobs=params.logprobs)
        if params.HasField("seed"):
            worker_params.seed = params.seed
        return cls(
            max_new_tokens=params.max_new_tokens,
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=params.top_k,
            seed=params.seed if params.HasField("seed") else None,
            stop_token_ids=frozenset(params.stop_token_ids),
            ignore_eos=params.ignore_eos,
            logprobs=params.logprobs,
            worker_params=worker_params,
        )


@dataclass
class Request:
    request_id: str
    client: bytes  # the frontend's ZeroMQ identity, where outputs go
    prompt: list[int]
    adapter: str  # "" for the base model
    sampling: Sampling
    arrival: float = field(default_factory=time.monotonic)
    phase: Phase = Phase.WAITING
    generated: list[int] = field(default_factory=list)
    pages: list[int] = field(default_factory=list)
    fed: int = 0  # tokens written to the KV cache by forwards sent (a token in flight counts once fed)
    tokens_in_flight: int = 0  # sampled by forwards in flight, not yet in `generated`
    slot: int = -1
    admitted_at: float | None = None
    adapter_ready_at: float | None = None
    first_token_at: float | None = None
    waiting_since: float | None = None  # the arrival, or the last pause
    waited_before_s: float = 0.0  # queued before the last admission or resumption, in all
    pauses: int = 0

    def __post_init__(self) -> None:
        if self.waiting_since is None:
            self.waiting_since = self.arrival

    def waited_s(self, now: float) -> float:
        """Time spent queued for a slot, before admission and while paused: what anti-starvation counts."""
        return self.waited_before_s + (now - self.waiting_since if self.phase is not Phase.RUNNING else 0.0)

    @property
    def tokens_left(self) -> int:
        return self.sampling.max_new_tokens - len(self.generated)

    @property
    def kv_tokens(self) -> int:
        """The prompt and every new token it may produce: what its KV pages are allocated for."""
        return len(self.prompt) + self.sampling.max_new_tokens

    @property
    def num_tokens(self) -> int:
        return len(self.prompt) + len(self.generated)

    def tokens_from(self, start: int, count: int) -> list[int]:
        """tokens[start:start + count] of prompt + generated, without concatenating them."""
        prompt_len = len(self.prompt)
        if start >= prompt_len:
            return self.generated[start - prompt_len:start - prompt_len + count]
        head = self.prompt[start:start + count]
        return head + self.generated[:count - len(head)]

    @property
    def in_prefill(self) -> bool:
        return self.fed < len(self.prompt)

    def timing(self, now: float) -> serving_pb2.Timing:
        def ms(since: float | None, until: float | None) -> float:
            return 0.0 if since is None or until is None else max(0.0, (until - since) * 1e3)

        return serving_pb2.Timing(
            queued_ms=ms(self.arrival, self.admitted_at),
            adapter_wait_ms=ms(self.arrival, self.adapter_ready_at),
            time_to_first_token_ms=ms(self.arrival, self.first_token_at),
            e2e_ms=ms(self.arrival, now),
        )
